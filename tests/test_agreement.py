"""Cross-detector agreement: a box is kept only when a second detector confirms it (GranD's rule)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from grit_pipeline.build import run_build
from grit_pipeline.config import build_config
from grit_pipeline.fixtures.detector import build_tiny_grounding_dino
from grit_pipeline.fixtures.digests import shard_digests
from grit_pipeline.fixtures.synthetic import generate_scenes, write_scene_folder
from grit_pipeline.records import Box, DropReason
from grit_pipeline.stages.agreement import confirmed
from grit_pipeline.stages.grounding import GroundingResult, ScoredBox


def test_confirmed_keeps_only_boxes_the_second_detector_finds_for_the_same_phrase() -> None:
    a, b, c = Box(0.1, 0.1, 0.5, 0.5), Box(0.6, 0.6, 0.9, 0.9), Box(0.12, 0.1, 0.5, 0.52)
    first = GroundingResult(boxes=[[ScoredBox(a, 0.9), ScoredBox(b, 0.8)], [ScoredBox(b, 0.7)]])
    second = GroundingResult(boxes=[[ScoredBox(c, 0.7)], [ScoredBox(a, 0.9)]])  # b is found for phrase 0 only
    result, removed = confirmed(first, second, 0.65)
    assert [[s.box for s in boxes] for boxes in result.boxes] == [[a], []] and removed == 2
    assert result.dropped[DropReason.BOX_NOT_CONFIRMED] == 2 and result.drop_reason is None
    nothing, _ = confirmed(first, GroundingResult(boxes=[[], []]), 0.65)
    assert nothing.drop_reason is DropReason.NO_BOX_CONFIRMED


@pytest.fixture(scope="module")
def detectors(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("agreement")
    folder = write_scene_folder(generate_scenes(6, seed=4, size=(96, 96)), root / "in").parent
    return (folder, build_tiny_grounding_dino(root / "first", seed=0), build_tiny_grounding_dino(root / "other", seed=7))


def _build(folder: Path, out: Path, detector: Path, agreement: Path | None):
    config = build_config((str(folder),), str(out), grounder="grounding-dino", runner="local", detector=str(detector),
                          box_threshold=0.2, device="cpu", agreement_detector=str(agreement) if agreement else None)
    result = run_build(config)
    assert result.ok
    return result


def _digests(out: Path) -> dict[str, str]:
    return {name: digest for name, digest in shard_digests(out).items() if name[:1].isdigit()}


def test_a_detector_that_agrees_with_itself_changes_nothing_and_another_removes_boxes(detectors, tmp_path) -> None:
    folder, first, other = detectors
    alone = _build(folder, tmp_path / "alone", first, None)
    itself = _build(folder, tmp_path / "itself", first, first)
    assert _digests(tmp_path / "alone") == _digests(tmp_path / "itself")
    assert itself.manifest["totals"]["spans"] == alone.manifest["totals"]["spans"] > 0
    checked = _build(folder, tmp_path / "other", first, other)
    removed = checked.manifest["totals"]["span_drop_reasons"].get("box_not_confirmed", 0)
    rows = pq.read_table(tmp_path / "other" / "shards" / "00000.parquet").to_pylist()
    assert removed > 0  # two random detectors rarely agree at IoU 0.65
    assert sum(r["n_spans"] for r in rows) <= alone.manifest["totals"]["spans"]
    assert all(r["drop_reason"] in (None, "no_box_confirmed", "no_box_above_threshold") for r in rows)
    assert checked.manifest["config"]["agreement"] == {"detector": str(other), "iou": 0.65}


def test_a_missing_agreement_detector_exits_2_before_anything_is_written(detectors, tmp_path) -> None:
    from click.testing import CliRunner

    from grit_pipeline.cli import main

    folder, first, _ = detectors
    result = CliRunner().invoke(main, ["build", str(folder), "--out", str(tmp_path / "out"), "--runner", "local",
                                       "--detector", str(first), "--agreement-detector", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "nope" in result.output and not (tmp_path / "out").exists()
