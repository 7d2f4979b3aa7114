"""`grit inspect`: the HTML gallery renders (non-blank, boxes visible) in headless Chromium; --png draws one sample."""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from grit_pipeline.demo import DemoConfig, run_quietly
from grit_pipeline.manifests.gallery import PALETTE, find_sample, write_gallery
from grit_pipeline.manifests.sample_png import render_sample_png

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's build: real photos, synthetic scenes and dropped web noise, through the real `grit build`."""
    result, log = run_quietly(DemoConfig(out_dir=str(tmp_path_factory.mktemp("gallery") / "demo"),
                                         synthetic_scenes=6, samples_per_shard=8))  # fmt: skip
    assert result.ok, log
    return result.build_dir


def _first_keys(out: Path, shard: str = "00000.tar") -> list[str]:
    with tarfile.open(out / "shards" / shard) as tar:
        return sorted({m.name.split(".")[0] for m in tar.getmembers()})


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))


def _pixels_near(image, colour: tuple[int, int, int], tolerance: int = 12) -> int:
    import numpy as np

    pixels = np.asarray(image.convert("RGB")).astype(int)
    return int(np.all(np.abs(pixels - np.array(colour)) <= tolerance, axis=-1).sum())


def test_gallery_html_is_self_contained_with_boxes_spans_and_chart(built: Path, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    assert write_gallery(built, page, count=5) == 5
    text = page.read_text()
    assert text.count('<div class="card">') == 5
    assert text.count("data:image/jpeg;base64,") == 5
    assert "<script" not in text and not re.search(r"(src|href)=\"https?://", text)
    first_colour = PALETTE[0]
    assert f'stroke="{first_colour}"' in text and f"border-bottom:3px solid {first_colour}" in text
    sample = find_sample(built, _first_keys(built)[0])
    assert f">{sample.entities[0].span.text(sample.record.caption)}<sup>1</sup></mark>" in text
    assert "00002.tar" in text  # the shard table lists every shard
    for reason in ("no_noun_chunks", "image_missing", "contained_span"):  # both drop charts
        assert f'text-anchor="end">{reason}</text>' in text


def _chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


@pytest.mark.integration  # runs headless Chromium
def test_gallery_renders_non_blank_in_headless_chromium(built: Path, tmp_path: Path) -> None:
    from PIL import Image

    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    write_gallery(built, page, count=8)
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,1400",
        page.as_uri(),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    with Image.open(shot) as image:
        assert image.size == (1280, 1400)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 200, "screenshot has almost no distinct colours"
        assert max(count for count, _ in colours) < 0.9 * image.width * image.height, "screenshot is one colour"
        # the first two box colours are drawn as SVG rectangles and caption marks
        assert _pixels_near(image, _rgb(PALETTE[0])) > 200
        assert _pixels_near(image, _rgb(PALETTE[1])) > 200


def test_png_draws_boxes_in_their_colours(built: Path, tmp_path: Path) -> None:
    from PIL import Image

    key = _first_keys(built)[2]  # the coffee photo: five spans, boxes of five colours
    sample = find_sample(built, key)
    assert len(sample.entities) >= 3
    target = render_sample_png(built, key, tmp_path / "one.png", side=400)
    with Image.open(target) as image:
        width, height = 400, round(400 * sample.record.height / sample.record.width)
        assert image.format == "PNG" and image.width == width and image.height > height
        rgb = image.convert("RGB")
        for entity in sample.entities:
            box = entity.boxes[0][0]
            x1, y1, x2, y2 = box.to_pixels(width, height)
            left_edge_mid = rgb.getpixel((int(x1) + 1, int((y1 + y2) / 2)))
            assert max(abs(a - b) for a, b in zip(left_edge_mid, _rgb(entity.colour), strict=True)) <= 8


def test_inspect_cli_writes_html_and_png_and_rejects_unknown_key(built: Path, tmp_path: Path) -> None:
    from grit_pipeline.cli import main

    runner = CliRunner()
    page, png = tmp_path / "g.html", tmp_path / "k.png"
    result = runner.invoke(main, ["inspect", str(built), "--n", "3", "--html", str(page)])
    assert result.exit_code == 0, result.output
    assert "3 samples" in result.output and page.read_text().count('<div class="card">') == 3
    result = runner.invoke(main, ["inspect", str(built), "--png", _first_keys(built)[3], "--png-out", str(png)])
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 1000
    missing = runner.invoke(main, ["inspect", str(built), "--png", "999999999", "--png-out", str(png)])
    assert missing.exit_code != 0 and "999999999" in missing.output


def test_samples_are_spread_over_every_shard(built: Path, tmp_path: Path) -> None:
    from grit_pipeline.manifests.gallery import pick_samples

    shards = sorted(p.name for p in (built / "shards").glob("*.tar"))
    picked = pick_samples(built, len(shards))
    assert [s.shard for s in picked] == shards
    assert len(pick_samples(built, 1000)) == sum(len(_first_keys(built, name)) for name in shards)


def test_caption_text_is_escaped_and_spans_keep_their_colour() -> None:
    from grit_pipeline.manifests.gallery import ShownEntity, highlight_caption
    from grit_pipeline.records import Span

    caption = "<script>x</script> a dog & a cat"
    entities = (ShownEntity(Span(19, 24), (), PALETTE[0]), ShownEntity(Span(27, 32), (), PALETTE[1]))
    page = highlight_caption(caption, entities)
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert f"solid {PALETTE[0]}\">a dog<sup>1</sup></mark> &amp; <mark" in page
    assert f"solid {PALETTE[1]}\">a cat<sup>2</sup></mark>" in page


def test_control_token_caption_is_shown_as_text(built: Path, tmp_path: Path) -> None:
    page = tmp_path / "all.html"
    write_gallery(built, page, count=1000)
    text = page.read_text()
    assert "&lt;grounding&gt; an icon:" in text and "<grounding>" not in text
