"""A build is read unchanged, with default settings, by the readers trainers use: webdataset (WebDataset and a
2-worker WebLoader), brace-expanded URLs, Ray Data, Hugging Face datasets (webdataset and parquet builders)
and open_clip's loader logic. The build mixes a captions.jsonl folder and an img2dataset folder, and its
FIRST shard keeps nothing."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from grit_pipeline.build import run_build
from grit_pipeline.config import BuildConfig
from grit_pipeline.fixtures.img2dataset import scene_samples, write_img2dataset_folder
from grit_pipeline.fixtures.synthetic import generate_scenes, write_scene_folder
from grit_pipeline.manifests.audit import audit_build
from grit_pipeline.manifests.manifest import load_manifest

pytestmark = pytest.mark.integration  # starts Ray, Hugging Face datasets and multi-worker loaders

KEPT = 9


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readers")
    scenes = generate_scenes(12, seed=11, size=(64, 64))
    jsonl = write_scene_folder(scenes[:6], root / "captions")
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for line in lines[:3]:  # the first captions shard: nothing to ground its phrases with
        line["annotations"] = []
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    downloads = write_img2dataset_folder([scene_samples(scenes[6:9]), scene_samples(scenes[9:])], root / "i2d")
    out = root / "out"
    config = BuildConfig(inputs=(str(root / "captions"), str(downloads)), out_dir=str(out), grounder="annotations",
                         runner="local", samples_per_shard=3)
    result = run_build(config)
    assert result.ok and result.manifest["totals"]["kept"] == KEPT
    return out


def _tars(out: Path) -> list[str]:
    import braceexpand

    return [str(out / url) for url in braceexpand.braceexpand(load_manifest(out)["webdataset_urls"])]


def test_a_shard_that_kept_nothing_has_no_tar_but_is_known_to_manifest_audit_and_resume(build: Path) -> None:
    manifest = load_manifest(build)
    first = manifest["shards"][0]
    assert first["status"] == "complete" and first["tar"] is None and first["counts"]["input"] == 3
    assert not (build / "shards" / "00000.tar").exists() and (build / "shards" / "00000_stats.json").is_file()
    assert manifest["webdataset_urls"] == "shards/{00001..00003}.tar"
    assert json.loads((build / "shards" / "sizes.json").read_text()) == {"00001.tar": 3, "00002.tar": 3,
                                                                         "00003.tar": 3}
    assert audit_build(build).ok
    config = BuildConfig.from_dict(json.loads((build / "config.json").read_text())["config"])
    assert run_build(config).skipped == 4  # resume: the empty shard counts as done


def test_every_json_has_the_same_keys_and_types_and_no_null(build: Path) -> None:
    import webdataset as wds

    shapes = set()
    for sample in wds.WebDataset(_tars(build), shardshuffle=False):
        meta = json.loads(sample["json"])
        shapes.add(json.dumps({k: type(v).__name__ for k, v in sorted(meta.items())}))
        assert None not in meta.values() and None not in meta["provenance"]["source"].values()
    assert len(shapes) == 1


def test_webdataset_and_a_two_worker_webloader(build: Path) -> None:
    import webdataset as wds

    dataset = wds.WebDataset(_tars(build), shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json")
    samples = list(dataset)
    assert len(samples) == KEPT and all(image.size == (meta["stored_width"], meta["stored_height"])
                                        for image, _text, meta in samples)
    loader = wds.WebLoader(wds.WebDataset(_tars(build), shardshuffle=False).decode("pil").to_tuple("jpg", "txt"),
                           num_workers=2, batch_size=None)
    assert len(list(loader)) == KEPT


def test_brace_expanded_urls(build: Path) -> None:
    import webdataset as wds

    pattern = str(build / load_manifest(build)["webdataset_urls"])
    assert "{" in pattern and len(list(wds.WebDataset(pattern, shardshuffle=False))) == KEPT


def test_hugging_face_datasets_webdataset_and_parquet_builders(build: Path, tmp_path: Path) -> None:
    import datasets

    datasets.disable_progress_bars()
    cache = str(tmp_path / "hf-cache")
    tars = datasets.load_dataset("webdataset", data_files={"train": str(build / "shards" / "*.tar")},
                                 split="train", cache_dir=cache)
    assert len(tars) == KEPT
    ids = sorted(row["json"]["id"] for row in tars)
    assert ids[:3] == [-1, -1, -1] and all(i >= 0 for i in ids[3:])  # captions rows have no id, downloads do
    assert all(isinstance(row["json"]["clip_similarity_vitb32"], float) for row in tars)
    rows = datasets.load_dataset("parquet", data_files={"train": str(build / "shards" / "*.parquet")},
                                 split="train", cache_dir=cache)
    assert len(rows) == 12 and sum(r == "kept" for r in rows["status"]) == KEPT


def test_open_clip_dataset_size_and_loader(build: Path) -> None:
    """open_clip_train.data cannot be imported here (it imports torchvision, which does not load with this
    torch): its `get_dataset_size` and its non-resampled webdataset pipeline are reproduced (open_clip's log_and_continue handler is wds.warn_and_continue here)."""
    import braceexpand
    import webdataset as wds

    shards = str(build / load_manifest(build)["webdataset_urls"])
    shards_list = list(braceexpand.braceexpand(shards))  # open_clip's expand_urls
    dir_path = os.path.dirname(shards_list[0])
    sizes = json.load(open(os.path.join(dir_path, "sizes.json")))
    total_size = sum(int(sizes[os.path.basename(shard)]) for shard in shards_list)
    assert total_size == KEPT
    pipeline = [wds.SimpleShardList(shards), wds.split_by_node, wds.split_by_worker,
                wds.tarfile_to_samples(handler=wds.warn_and_continue),
                wds.select(lambda s: ("txt" in s) and any(k in s for k in ("jpg", "png", "jpeg", "webp"))),
                wds.decode("pilrgb", handler=wds.warn_and_continue), wds.to_tuple("jpg;png;jpeg;webp", "txt")]
    workers = 2
    per_worker = math.ceil(total_size / workers)  # open_clip: with_epoch(num_worker_batches)
    loader = wds.WebLoader(wds.DataPipeline(*pipeline).with_epoch(per_worker), batch_size=None, num_workers=workers)
    samples = list(loader)  # a worker whose shards held nothing would loop here for ever
    assert len(samples) == workers * per_worker and all(text.startswith("<grounding>") for _, text in samples)


def test_ray_data_read_webdataset(build: Path) -> None:
    import ray

    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        rows = ray.data.read_webdataset(_tars(build)).take_all()
    finally:
        ray.shutdown()
    assert len(rows) == KEPT and all(row["json"]["stored_width"] > 0 for row in rows)
