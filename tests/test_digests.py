"""Shard digests of the demo inputs and a mixed test input, pinned: a refactor must not change one byte.

The bytes depend on the pinned package versions (pillow's JPEG encoder, pyarrow's parquet writer, spaCy's
model). When requirements/constraints.txt changes on purpose, rerun with GRIT_PRINT_DIGESTS=1 and paste.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from grit_pipeline.build import run_build
from grit_pipeline.config import BuildConfig
from grit_pipeline.demo import PHOTOS_DIR, write_noisy_folder
from grit_pipeline.fixtures.img2dataset import scene_samples, write_img2dataset_folder
from grit_pipeline.fixtures.synthetic import generate_scenes, write_scene_folder

PINNED: dict[str, str] = {
    "00000.parquet": "cdb4cf5ed118856c",
    "00000.tar": "fbca6dca4df613c2",
    "00001.parquet": "65141e44f2eaecff",
    "00001.tar": "3164d51e7a0456bc",
    "00002.parquet": "c0102bc0bda62691",
    "00002.tar": "c4402e089b79f61c",
    "00003.parquet": "dff41b7d5d6620b6",
    "00003.tar": "13ea59ae28ba1539",
    "00004.parquet": "3989a4de650929b9",  # the noisy captions that keep nothing: no tar
    "00005.parquet": "3c314b89ced10752",
    "00005.tar": "e35a086079e3d448",
    "00006.parquet": "b51bb2acd8ce0a2a",
    "00006.tar": "f81a45e25a596733",
    "00007.parquet": "e0b261a6eba710cb",
    "00007.tar": "8b572fe8ee5c06cb",
}


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted((out / "shards").iterdir()) if p.suffix in (".tar", ".parquet")}


def test_shard_bytes_of_the_demo_and_test_inputs_are_pinned(tmp_path: Path) -> None:
    # KEY.json names its input folder, so the inputs live at one fixed path, not in pytest's numbered folders
    inputs = Path(tempfile.gettempdir()) / f"grit-digest-inputs-{os.getuid()}"
    shutil.rmtree(inputs, ignore_errors=True)
    photos = shutil.copytree(PHOTOS_DIR, inputs / "photos")  # the checkout's own path would differ
    scenes = generate_scenes(10, seed=3, size=(96, 80))
    synthetic = write_scene_folder(scenes[:6], inputs / "synthetic").parent
    downloads = write_img2dataset_folder([scene_samples(scenes[6:8]), scene_samples(scenes[8:])], inputs / "i2d")
    noisy = write_noisy_folder(inputs / "noisy", seed=1)
    config = BuildConfig(inputs=(str(photos), str(synthetic), str(noisy), str(downloads)),
                         out_dir=str(tmp_path / "out"), grounder="annotations", runner="local", samples_per_shard=4)
    assert run_build(config).ok
    digests = _digests(tmp_path / "out")
    if os.environ.get("GRIT_PRINT_DIGESTS"):
        print(json.dumps(digests, indent=4))
    assert digests == PINNED
