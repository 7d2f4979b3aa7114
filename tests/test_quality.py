"""Box-quality filters (stages/quality.py): each filter's counted effect in the parquet, the shard stats and
the manifest; the strict preset; the score distributions of the manifest; `grit inspect --sort` and filters."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from grit_pipeline.build import run_build
from grit_pipeline.config import build_config
from grit_pipeline.distributions import row_distributions
from grit_pipeline.fixtures.synthetic import generate_scenes
from grit_pipeline.stages.quality import STRICT, QualityConfig

HUGE = [0.0, 0.0, 1.0, 1.0]
CLIPS = {"a_huge": 0.31, "b_tiny": 0.12, "c_many": 0.27, "d_only_huge": 0.40, "e_small": 0.05}


def _extra_boxes(scene: Any) -> list[dict[str, Any]]:
    """Five 20 px boxes, scores 0.70..0.90, side by side along the top (no overlap), for the first shape."""
    span = scene.objects[0].span.as_list()
    return [{"category": scene.objects[0].shape, "span": span, "score": 0.70 + 0.05 * i,
             "box": [(4 + 22 * i) / scene.width, 2 / scene.height, (24 + 22 * i) / scene.width, 22 / scene.height]}
            for i in range(5)]


def _write_inputs(folder: Path) -> Path:
    from grit_pipeline.fixtures.synthetic import write_scene_folder

    big = generate_scenes(4, seed=5, size=(240, 224))
    small = generate_scenes(1, seed=6, size=(96, 80))
    names = ["a_huge", "b_tiny", "c_many", "d_only_huge"]
    scenes = [dataclasses.replace(s, key=k) for s, k in zip(big, names, strict=True)]
    scenes.append(dataclasses.replace(small[0], key="e_small"))
    jsonl = write_scene_folder(scenes, folder)
    lines = []
    for scene, line in zip(scenes, jsonl.read_text().splitlines(), strict=True):
        entry = json.loads(line)
        first = scene.objects[0]
        if scene.key == "a_huge":
            entry["annotations"].append({"category": first.shape, "box": HUGE, "span": first.span.as_list(),
                                         "score": 0.8})
        elif scene.key == "b_tiny":
            entry["annotations"].append({"category": first.shape, "span": first.span.as_list(), "score": 0.8,
                                         "box": [0.5, 0.5, 0.5 + 4 / 240, 0.5 + 4 / 224]})
        elif scene.key == "c_many":
            entry["annotations"] += _extra_boxes(scene)
        elif scene.key == "d_only_huge":
            entry["annotations"] = [{**a, "box": HUGE} for a in entry["annotations"][:1]]
        entry["clip_similarity_vitb32"] = CLIPS[scene.key]
        lines.append(json.dumps(entry))
    jsonl.write_text("".join(line + "\n" for line in lines))
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_inputs(tmp_path_factory.mktemp("quality-inputs"))


def _build(inputs: Path, out: Path, **options: Any) -> dict[str, Any]:
    config = build_config((str(inputs),), str(out), grounder="annotations", runner="local", nms_iou="off",
                          samples_per_shard=2, **options)
    result = run_build(config)
    assert result.ok
    return result.manifest


def _rows(out: Path) -> dict[str, dict[str, Any]]:
    rows = [r for p in sorted((out / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    return {r["source_key"]: r for r in rows}


def _stats_sum(out: Path, field: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for path in sorted((out / "shards").glob("*_stats.json")):
        for reason, n in json.loads(path.read_text())[field].items():
            total[reason] = total.get(reason, 0) + n
    return total


@pytest.fixture(scope="module")
def plain(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "out"
    _build(inputs, out)
    return out


@pytest.fixture(scope="module")
def filtered(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("filtered") / "out"
    _build(inputs, out, max_box_area_fraction=0.9, min_box_side=16, max_boxes_per_phrase=3, min_image_side=100)
    return out


def _boxes_of(row: dict[str, Any]) -> list[list[float]]:
    return [entry[2:7] for entry in row["noun_chunks"]]


def test_defaults_change_nothing(plain: Path) -> None:
    rows = _rows(plain)
    assert all(r["status"] == "kept" for r in rows.values())
    assert any(b[:4] == HUGE for b in _boxes_of(rows["a_huge"]))
    assert len(_boxes_of(rows["c_many"])) >= 6
    spans = _stats_sum(plain, "span_drop_reasons")
    assert not {"box_too_large", "box_too_small", "too_many_boxes"} & set(spans)


def test_each_filter_is_counted_in_parquet_stats_and_manifest(plain: Path, filtered: Path) -> None:
    before, rows = _rows(plain), _rows(filtered)
    # whole-image box removed, the rest kept
    assert rows["a_huge"]["status"] == "kept"
    assert not any(b[:4] == HUGE for b in _boxes_of(rows["a_huge"]))
    assert len(_boxes_of(rows["a_huge"])) == len(_boxes_of(before["a_huge"])) - 1
    assert json.loads(rows["a_huge"]["span_drops"])["box_too_large"] == 1
    # a 4 px box removed
    assert len(_boxes_of(rows["b_tiny"])) == len(_boxes_of(before["b_tiny"])) - 1
    assert json.loads(rows["b_tiny"]["span_drops"])["box_too_small"] == 1
    # six boxes on one phrase: the three best kept
    assert json.loads(rows["c_many"]["span_drops"])["too_many_boxes"] == 3
    first_span = before["c_many"]["noun_chunks"][0][:2]
    scores = sorted(e[6] for e in rows["c_many"]["noun_chunks"] if e[:2] == first_span)
    assert scores == pytest.approx([0.85, 0.9, 1.0])
    # a sample left without a box, and a too small image: sample drops with their own reasons
    assert rows["d_only_huge"]["status"] == "dropped"
    assert rows["d_only_huge"]["drop_reason"] == "no_box_after_quality_filters"
    assert rows["e_small"]["drop_reason"] == "image_too_small_for_quality"

    spans = _stats_sum(filtered, "span_drop_reasons")
    assert (spans["box_too_large"], spans["box_too_small"], spans["too_many_boxes"]) == (2, 1, 3)
    drops = _stats_sum(filtered, "drop_reasons")
    assert drops == {"no_box_after_quality_filters": 1, "image_too_small_for_quality": 1}
    manifest = json.loads((filtered / "manifest.json").read_text())
    totals = manifest["totals"]
    assert {k: totals["span_drop_reasons"][k] for k in spans if k in ("box_too_large", "box_too_small",
                                                                        "too_many_boxes")} == \
        {"box_too_large": 2, "box_too_small": 1, "too_many_boxes": 3}
    assert totals["drop_reasons"] == drops
    assert sum(e["span_drop_reasons"].get("too_many_boxes", 0) for e in manifest["shards"]) == 3
    assert manifest["config"]["quality"] == {"max_box_area_fraction": 0.9, "min_box_side_px": 16,
                                             "max_boxes_per_phrase": 3, "min_image_side_px": 100}


def test_gallery_drop_chart_shows_the_quality_reasons(filtered: Path, tmp_path: Path) -> None:
    from grit_pipeline.manifests.gallery import write_gallery

    page = tmp_path / "g.html"
    write_gallery(filtered, page, count=5)
    text = page.read_text()
    for reason in ("box_too_large", "box_too_small", "too_many_boxes", "image_too_small_for_quality",
                   "no_box_after_quality_filters"):
        assert reason in text


def test_strict_preset_and_overrides(tmp_path: Path) -> None:
    make = lambda **o: build_config(("x",), str(tmp_path), grounder="annotations", **o).quality  # noqa: E731
    assert make() == QualityConfig() and not make().active
    assert make(quality="strict") == STRICT
    assert make(quality="strict", max_boxes_per_phrase=5) == dataclasses.replace(STRICT, max_boxes_per_phrase=5)
    assert make(quality="off", min_box_side=3) == QualityConfig(min_box_side_px=3)
    with pytest.raises(ValueError):
        make(quality="lenient")
    assert QualityConfig.from_dict(STRICT.to_dict()) == STRICT


def test_strict_build_drops_the_small_image_and_the_noisy_boxes(inputs: Path, tmp_path: Path) -> None:
    _build(inputs, tmp_path / "out", quality="strict")
    rows = _rows(tmp_path / "out")
    assert rows["e_small"]["drop_reason"] == "image_too_small_for_quality"
    assert rows["d_only_huge"]["drop_reason"] == "no_box_after_quality_filters"
    assert rows["a_huge"]["status"] == rows["b_tiny"]["status"] == rows["c_many"]["status"] == "kept"


def test_manifest_distributions_merge_the_shards_exactly(filtered: Path) -> None:
    manifest = json.loads((filtered / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3
    kept = [r for r in _rows(filtered).values() if r["status"] == "kept"]
    totals = manifest["totals"]["distributions"]
    assert totals == row_distributions(kept)  # merged per-shard histograms == one pass over every kept row
    assert set(totals) == {"clip_similarity_vitb32", "box_score", "boxes_per_sample"}
    assert totals["boxes_per_sample"]["count"] == len(kept) == 3
    assert totals["box_score"]["count"] == sum(len(r["noun_chunks"]) for r in kept)
    assert totals["clip_similarity_vitb32"]["quantiles"]["p01"] == 0.12
    assert totals["clip_similarity_vitb32"]["quantiles"]["p99"] == 0.31
    assert totals["box_score"]["min"] == pytest.approx(0.85)  # the 0.8 boxes were filtered out
    stats = json.loads((filtered / "shards" / "00000_stats.json").read_text())
    assert stats["distributions"] == manifest["shards"][0]["distributions"]
    assert "clip_similarity_vitl14" not in totals  # absent when no sample has it


def test_inspect_sorts_and_filters_lowest_first(plain: Path, tmp_path: Path) -> None:
    from grit_pipeline.cli import main

    def shown(*args: str) -> list[tuple[str, dict[str, str]]]:
        result = CliRunner().invoke(main, ["inspect", str(plain), "--html", str(tmp_path / "g.html"), *args])
        assert result.exit_code == 0, result.output
        lines = [line.split("\t") for line in result.output.splitlines() if "\tclip=" in line]
        return [(parts[0], dict(p.split("=") for p in parts[1:])) for parts in lines]

    keys = {r["key"]: name for name, r in _rows(plain).items()}
    by_clip = shown("--sort", "clip")
    assert [keys[k] for k, _ in by_clip] == sorted(CLIPS, key=CLIPS.get)
    by_boxes = [int(m["boxes"]) for _, m in shown("--sort", "boxes")]
    assert by_boxes == sorted(by_boxes)
    low = shown("--sort", "clip", "--max-clip", "0.2", "--n", "10")
    assert [keys[k] for k, _ in low] == ["e_small", "b_tiny"]
    assert "lowest clip first, clip &lt;= 0.2" in (tmp_path / "g.html").read_text()
    many = shown("--min-boxes", "6")
    assert [keys[k] for k, _ in many] == ["c_many"]
    by_score = [float(m["box_score"]) for _, m in shown("--sort", "box_score")]
    assert by_score == sorted(by_score) and by_score[0] == pytest.approx(0.7)
