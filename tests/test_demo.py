"""The demo: the whole main job offline (build, audit, gallery) on the bundled photos and synthetic scenes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grit_pipeline.demo import GPU_COMMAND, PHOTOS_DIR, DemoConfig, main, run_quietly


def test_bundled_photos_are_small_licensed_and_annotated_on_their_noun_chunks(extractor) -> None:
    from PIL import Image

    licences = (PHOTOS_DIR / "LICENSES.md").read_text()
    entries = [json.loads(line) for line in (PHOTOS_DIR / "captions.jsonl").read_text().splitlines()]
    assert len(entries) >= 4
    captions = [e["caption"] for e in entries]
    for entry, phrases in zip(entries, extractor(captions), strict=True):
        path = PHOTOS_DIR / entry["image"]
        assert path.stat().st_size <= 100_000 and entry["image"] in licences
        with Image.open(path) as image:
            assert image.format == "JPEG"
        chunks = [p.chunk for p in phrases.phrases]
        for annotation in entry["annotations"]:
            start, end = annotation["span"]
            x1, y1, x2, y2 = annotation["box"]
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
            # every box is bound to exactly one noun chunk that spaCy finds in the caption
            assert [(c.start, c.end) for c in chunks if c.start < end and start < c.end] == [(start, end)], entry


def test_demo_builds_audits_and_writes_the_gallery(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--synthetic", "6", "--samples-per-shard", "8"]) == 0
    printed = capsys.readouterr().out
    assert "audit:   OK" in printed and GPU_COMMAND in printed
    manifest = json.loads((out / "build" / "manifest.json").read_text())
    totals = manifest["totals"]
    photos = len((PHOTOS_DIR / "captions.jsonl").read_text().splitlines())
    assert totals["input_samples"] == photos + 6 + 6
    assert totals["drop_reasons"] == {"no_noun_chunks": 2, "image_missing": 1, "image_truncated": 1,
                                      "no_matching_annotation": 1}  # fmt: skip
    assert totals["kept"] == photos + 6 + 1
    report = (out / "report.html").read_text()
    assert report.count('<div class="card">') == totals["kept"]
    noisy_shard = (out / "build" / "shards" / "00002.tar").read_bytes().decode("utf-8", "replace")
    assert "‹grounding›" in noisy_shard  # the caption with literal control tokens was kept, escaped


def test_rerun_replaces_the_previous_demo(tmp_path: Path) -> None:
    config = DemoConfig(out_dir=str(tmp_path / "demo"), synthetic_scenes=2, samples_per_shard=8)
    first, _ = run_quietly(config)
    second, log = run_quietly(DemoConfig(out_dir=config.out_dir, synthetic_scenes=3, samples_per_shard=8))
    assert first.ok and second.ok, log
    manifest = json.loads((second.build_dir / "manifest.json").read_text())
    assert manifest["totals"]["input_samples"] == len((PHOTOS_DIR / "captions.jsonl").read_text().splitlines()) + 3 + 6


@pytest.mark.slow
@pytest.mark.integration  # starts Ray
def test_demo_on_ray_writes_the_same_shards_as_the_local_runner(tmp_path: Path) -> None:
    def shard_digests(runner: str) -> list[str]:
        config = DemoConfig(out_dir=str(tmp_path / "demo"), synthetic_scenes=8, runner=runner)
        result, log = run_quietly(config)
        assert result.ok, log
        manifest = json.loads((result.build_dir / "manifest.json").read_text())
        return [entry["sha256"] for entry in manifest["shards"]]

    on_ray = shard_digests("ray")
    assert len(on_ray) == 3 and shard_digests("local") == on_ray
