"""The CLIP similarity stage: the column a model fills, the threshold drop, GRIT-20M inputs' own columns,
the missing-model exit, and `grit bench clip`, all with tiny random CLIPs built here."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from grit_pipeline.build import run_build
from grit_pipeline.config import build_config
from grit_pipeline.fixtures.clip import build_tiny_clip
from grit_pipeline.fixtures.img2dataset import scene_samples, write_img2dataset_folder
from grit_pipeline.fixtures.synthetic import generate_scenes, write_scene_folder
from grit_pipeline.stages.clip import CLIP_VITB32, CLIP_VITL14, similarity_column
from grit_pipeline.stages.stage_list import build_stages


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("clip")
    return {"vitb32": str(build_tiny_clip(root / "tiny-clip-vit-base-patch32")),
            "other": str(build_tiny_clip(root / "Tiny-CLIP.v2", patch_size=16))}


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> str:
    return str(write_scene_folder(generate_scenes(8, seed=3, size=(96, 96)), tmp_path_factory.mktemp("in") / "s").parent)


def _build(inputs: str, out: Path, **options):
    config = build_config((inputs,), str(out), grounder="annotations", runner="local", samples_per_shard=4, **options)
    result = run_build(config, stream=io.StringIO())
    assert result.ok
    return result.manifest


def _jsons(out: Path) -> list[dict]:
    rows = []
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            rows += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    return rows


def _parquet(out: Path) -> list[dict]:
    return [row for path in sorted((out / "shards").glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


def test_the_column_follows_the_model():
    assert similarity_column("openai/clip-vit-base-patch32", 32, 768) == CLIP_VITB32
    assert similarity_column("/models/whatever", 14, 1024) == CLIP_VITL14
    assert similarity_column("/models/clip-vit-large-patch14-tiny", 14, 32) == CLIP_VITL14
    assert similarity_column("/models/clip-vit-large-patch14-tiny", 32, 32) == "clip_similarity_clip_vit_large_patch14_tiny"
    assert similarity_column("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", 14, 1280) == \
        "clip_similarity_clip_vit_h_14_laion2b_s32b_b79k"


def test_off_without_a_model(tmp_path):
    config = build_config(("x",), str(tmp_path), grounder="annotations")
    assert "clip" not in [s.name for s in build_stages(config)]
    with_clip = build_config(("x",), str(tmp_path), grounder="annotations", clip_model="m")
    names = [s.name for s in build_stages(with_clip)]
    assert names.index("clip") == names.index("phrases") + 1 < names.index("ground")
    assert config.fingerprint() != with_clip.fingerprint()


def test_vitb32_fills_its_column_in_json_and_parquet(models, captions, tmp_path):
    _build(captions, tmp_path / "out", clip_model=models["vitb32"])
    rows = _jsons(tmp_path / "out")
    assert len(rows) == 8
    assert all(-1.0 <= r[CLIP_VITB32] <= 1.0 and r[CLIP_VITB32] != -1.0 for r in rows)
    assert all(r[CLIP_VITL14] == -1.0 for r in rows)
    table = {r["key"]: r for r in _parquet(tmp_path / "out")}
    assert all(table[r["key"]][CLIP_VITB32] == pytest.approx(r[CLIP_VITB32]) for r in rows)
    assert all(table[r["key"]][CLIP_VITL14] is None for r in rows)


def test_another_model_fills_a_column_named_after_it(models, captions, tmp_path):
    _build(captions, tmp_path / "out", clip_model=models["other"])
    column = "clip_similarity_tiny_clip_v2"
    rows = _jsons(tmp_path / "out")
    assert rows and all(-1.0 <= r[column] <= 1.0 for r in rows)
    assert all(r[CLIP_VITB32] == -1.0 for r in rows)
    assert all(set(r) == set(rows[0]) for r in rows)
    parquet = _parquet(tmp_path / "out")
    assert all(row[column] is not None for row in parquet)


def test_min_similarity_drops_with_its_reason_and_counts(models, captions, tmp_path):
    _build(captions, tmp_path / "all", clip_model=models["vitb32"])
    scores = sorted(r[CLIP_VITB32] for r in _jsons(tmp_path / "all"))
    threshold = (scores[3] + scores[4]) / 2
    manifest = _build(captions, tmp_path / "cut", clip_model=models["vitb32"], min_clip_similarity=threshold)
    kept = _jsons(tmp_path / "cut")
    assert len(kept) == 4 and all(r[CLIP_VITB32] >= threshold for r in kept)
    assert manifest["totals"]["drop_reasons"].get("clip_similarity_too_low") == 4
    dropped = [r for r in _parquet(tmp_path / "cut") if r["status"] == "dropped"]
    assert {r["drop_reason"] for r in dropped} == {"clip_similarity_too_low"}
    assert all(r[CLIP_VITB32] < threshold for r in dropped)


def test_grit_inputs_keep_their_column_unless_recomputed(models, tmp_path):
    downloads = write_img2dataset_folder([scene_samples(generate_scenes(4, seed=5, size=(96, 96)))], tmp_path / "i2d")
    _build(str(downloads), tmp_path / "kept", clip_model=models["vitb32"])
    assert [r[CLIP_VITB32] for r in _jsons(tmp_path / "kept")] == [0.3] * 4
    _build(str(downloads), tmp_path / "re", clip_model=models["vitb32"], recompute_clip=True)
    recomputed = [r[CLIP_VITB32] for r in _jsons(tmp_path / "re")]
    assert len(recomputed) == 4 and all(v != 0.3 for v in recomputed)
    assert [r[CLIP_VITL14] for r in _jsons(tmp_path / "re")] == [0.3] * 4  # another model's column is left alone


def test_a_missing_clip_model_exits_2_before_writing(captions, tmp_path):
    from grit_pipeline.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", captions, "--out", str(out), "--grounder", "annotations",
                                       "--runner", "local", "--clip-model", str(tmp_path / "no-such-clip")])
    assert result.exit_code == 2, result.output
    assert "no-such-clip" in result.output and not out.exists()


def test_bench_clip_runs():
    from grit_pipeline.benchmarks.clip import bench_clip_stage

    report = bench_clip_stage(None, n_images=8, images_per_forward=4, device="cpu", repeats=1)
    assert report["stage_pairs_per_s"] > 0 and report["bare_processor_forward_pairs_per_s"] > 0
    assert report["ratio"] > 0
