"""Boxes that arrive with the input land on their object in the STORED pixels: every EXIF orientation, every
img2dataset resize mode, rows that say which frame their boxes are in and rows that do not."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from grit_pipeline.fixtures.img2dataset import (
    Img2DatasetSample,
    resize_like_img2dataset,
    write_img2dataset_folder,
)
from grit_pipeline.fixtures.square_scenes import (
    CAPTION,
    COLOURS,
    RED,
    SPANS,
    box_near,
    colour_box,
    grit_entries,
    jpeg_bytes,
    square_scene,
)
from grit_pipeline.records import Box
from grit_pipeline.stages.frames import (
    BoxFrame,
    DownloadInfo,
    FrameConfig,
    FrameMismatchError,
    ResizeMode,
    Size,
    SourceFrame,
    orient_box,
    resolve_frame,
    same_aspect,
)


def _normalized(box: tuple[int, int, int, int], width: int, height: int) -> list[float]:
    return list(Box.from_pixels(*box, width, height).as_tuple())


# ---------------------------------------------------------------------------------------------- unit


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_box_moves_a_box_with_the_pixels_as_exif_transpose_does(orientation: int) -> None:
    raw = square_scene(90, 60, {"red": (10, 5, 30, 20)})
    image = Image.open(io.BytesIO(jpeg_bytes(raw, orientation)))
    upright = ImageOps.exif_transpose(image)
    moved = orient_box(Box.from_pixels(10, 5, 30, 20, 90, 60), orientation)
    assert box_near(moved, colour_box(upright, RED), upright)


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (257, 255), (641, 480), (100, 401)])
@pytest.mark.parametrize("mode", ["border", "center_crop"])
def test_placements_match_img2dataset_geometry(size: tuple[int, int], mode: str) -> None:
    width, height = size
    side = max(40, width // 5)  # at least 8 stored pixels: resampling blurs a pixel at each edge
    square = (width // 3, height // 3, width // 3 + side, height // 3 + side)
    stored = resize_like_img2dataset(square_scene(width, height, {"red": square}), mode, 128)
    frame_map = resolve_frame(SourceFrame(), DownloadInfo(Size(128, 128), Size(width, height)), Size(128, 128), 1,
                              FrameConfig(resize_mode=ResizeMode(mode)))
    mapped = frame_map.map_box(Box.from_pixels(*square, width, height))
    assert mapped is not None and box_near(mapped, colour_box(stored, RED), stored, pixels=1.5)


def test_same_aspect_allows_one_pixel_of_rounding_only() -> None:
    assert same_aspect(Size(1000, 750), Size(256, 192))
    assert same_aspect(Size(1000, 751), Size(256, 192))
    assert same_aspect(Size(341, 256), Size(1000, 750))
    assert not same_aspect(Size(1000, 750), Size(256, 200))
    assert not same_aspect(Size(300, 200), Size(200, 300))


def test_the_pixels_tell_border_from_center_crop() -> None:
    original = Size(300, 200)
    for mode in ("border", "center_crop"):
        stored = resize_like_img2dataset(square_scene(300, 200, {}), mode, 128)
        frame_map = resolve_frame(SourceFrame(), DownloadInfo(Size(128, 128), original), Size(128, 128), 1,
                                  FrameConfig(), raw_pixels=stored)
        assert frame_map.placement.mode == mode


def test_sizes_no_mode_explains_are_a_frame_mismatch() -> None:
    with pytest.raises(FrameMismatchError, match="fit no resize mode"):
        resolve_frame(SourceFrame(), DownloadInfo(Size(128, 100), Size(300, 100)), Size(128, 100), 1, FrameConfig())
    with pytest.raises(FrameMismatchError, match="says 120x90"):  # the .json does not describe these pixels
        resolve_frame(SourceFrame(), DownloadInfo(Size(120, 90), Size(300, 200)), Size(128, 128), 1, FrameConfig())
    with pytest.raises(FrameMismatchError, match="neither frame"):
        resolve_frame(SourceFrame(Size(100, 100)), None, Size(300, 200), 1, FrameConfig())


def test_a_turned_row_size_on_a_reencoded_download_cannot_be_placed() -> None:
    # img2dataset re-encoded a resized copy without EXIF: which way the original was turned is unknown
    download = DownloadInfo(Size(150, 100), Size(600, 400))
    with pytest.raises(FrameMismatchError, match="orientation is unknown"):
        resolve_frame(SourceFrame(Size(400, 600)), download, Size(150, 100), 1, FrameConfig())
    assert resolve_frame(SourceFrame(Size(600, 400)), download, Size(150, 100), 1,
                         FrameConfig()).source_frame is BoxFrame.RAW


def test_center_crop_drops_a_box_left_with_too_little_of_its_area() -> None:
    frame_map = resolve_frame(SourceFrame(), DownloadInfo(Size(128, 128), Size(300, 200)), Size(128, 128), 1,
                              FrameConfig(resize_mode=ResizeMode.CENTER_CROP, min_cropped_box_fraction=0.5))
    assert frame_map.map_box(Box.from_pixels(0, 50, 40, 90, 300, 200)) is None  # wholly in the cut-off strip
    half = frame_map.map_box(Box.from_pixels(30, 50, 90, 90, 300, 200))  # 20 of its 60 px are cut off
    assert half is not None and half.x1 == 0.0


# ---------------------------------------------------------------------------------------------- builds


def _captions_folder(folder: Path) -> dict[str, dict]:
    """One image per EXIF orientation and row-size convention; returns what each sample should show."""
    folder.mkdir(parents=True)
    lines, expected = [], {}
    squares = {"red": (12, 8, 52, 38), "blue": (80, 40, 110, 70)}
    for orientation in range(1, 9):
        raw = square_scene(140, 90, squares)
        data = jpeg_bytes(raw, orientation)
        upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        conventions = {"none": None, "raw": (140, 90)}
        if orientation in (5, 6, 7, 8):
            conventions["upright"] = (upright.width, upright.height)
        for convention, size in conventions.items():
            key = f"o{orientation}-{convention}"
            (folder / f"{key}.jpg").write_bytes(data)
            if convention == "upright":  # boxes measured on the upright image, as its size says
                boxes = {n: list(colour_box(upright, COLOURS[n]).as_tuple()) for n in squares}
            else:
                boxes = {n: _normalized(b, 140, 90) for n, b in squares.items()}
            line = {"key": key, "image": f"{key}.jpg", "caption": CAPTION,
                    "annotations": [{"category": "square", "box": boxes[n], "span": list(SPANS[n])} for n in squares]}
            if size is not None:
                line["width"], line["height"] = size
            lines.append(json.dumps(line))
            expected[key] = {"kept": set(squares)}
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return expected


def _img2dataset_folder(folder: Path) -> dict[str, dict]:
    """GRIT-20M rows downloaded by img2dataset in every resize mode, plus EXIF and mismatch cases."""
    samples, expected = [], {}
    for mode in ("no", "keep_ratio", "keep_ratio_largest", "border", "center_crop"):
        for width, height in ((300, 200), (180, 260)):
            squares = {"red": (width // 3, height // 3, width // 3 + 50, height // 3 + 50),
                       "blue": (0, height // 2 + 30, 30, height // 2 + 70)}  # left edge: cut from landscapes
            original = square_scene(width, height, squares)
            stored = resize_like_img2dataset(original, mode, 128)
            boxes = {n: _normalized(b, width, height) for n, b in squares.items()}
            extra = {"id": len(samples), "noun_chunks": grit_entries(boxes), "ref_exps": grit_entries(boxes)}
            cropped = mode == "center_crop" and width > height
            samples.append(Img2DatasetSample(CAPTION, f"https://example.com/{mode}-{width}.jpg", jpeg_bytes(stored),
                                             stored.width, stored.height, extra, None, width, height))
            expected[f"{mode}-{width}"] = {"kept": {"red"} if cropped else {"red", "blue"},
                                                    "cropped_out": 1 if cropped else 0}
    # the original bytes kept by img2dataset (resize_mode no, skip_reencode): EXIF 6 stored upright
    squares = {"red": (20, 10, 60, 40), "blue": (100, 50, 130, 80)}
    raw = square_scene(160, 100, squares)
    boxes = {n: _normalized(b, 160, 100) for n, b in squares.items()}
    samples.append(Img2DatasetSample(CAPTION, "https://example.com/exif6.jpg", jpeg_bytes(raw, 6), 160, 100,
                                     {"id": 90, "noun_chunks": grit_entries(boxes), "ref_exps": grit_entries(boxes)},
                                     None, 160, 100))
    expected["exif6"] = {"kept": {"red", "blue"}}
    # a .json whose original size fits no resize mode
    stored = resize_like_img2dataset(raw, "keep_ratio", 128)
    samples.append(Img2DatasetSample(CAPTION, "https://example.com/mismatch.jpg", jpeg_bytes(stored), stored.width,
                                     stored.height, {"id": 91, "noun_chunks": grit_entries(boxes),
                                                     "ref_exps": grit_entries(boxes)}, None, 300, 100))
    expected["mismatch"] = {"dropped": "frame_mismatch"}
    write_img2dataset_folder([samples], folder)
    return expected


def test_every_kept_box_lies_on_its_square_in_the_stored_pixels(tmp_path: Path) -> None:
    from grit_pipeline.build import run_build
    from grit_pipeline.config import BuildConfig

    expected_captions = _captions_folder(tmp_path / "captions")
    expected_downloads = _img2dataset_folder(tmp_path / "downloads")
    config = BuildConfig(inputs=(str(tmp_path / "captions"), str(tmp_path / "downloads")),
                         out_dir=str(tmp_path / "out"), grounder="annotations", runner="local")
    result = run_build(config)
    assert result.ok

    rows = {}
    for shard in ("00000", "00001"):
        for row in pq.read_table(tmp_path / "out" / "shards" / f"{shard}.parquet").to_pylist():
            rows[row["url"] or row["source_key"]] = row
    samples = {}
    for tar_path in sorted((tmp_path / "out" / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name.removesuffix(".json")
                samples[key] = (json.loads(data), Image.open(io.BytesIO(members[f"{key}.jpg"])))

    def check(label: str, row: dict, want: dict) -> None:
        if "dropped" in want:
            assert row["status"] == "dropped" and row["drop_reason"] == want["dropped"], label
            return
        assert row["status"] == "kept", (label, row["drop_reason"], row["error_message"])
        meta, image = samples[row["key"]]
        assert (meta["stored_width"], meta["stored_height"]) == image.size
        seen = set()
        for start, end, *box, _score in meta["noun_chunks"]:
            name = "red" if (start, end) == SPANS["red"] else "blue"
            seen.add(name)
            truth = colour_box(image, COLOURS[name])
            assert box_near(Box(*box), truth, image), (label, name, box, truth)
        assert seen == want["kept"], label
        drops = json.loads(row["span_drops"] or "{}")
        assert drops.get("box_cropped_out", 0) == want.get("cropped_out", 0), label

    for key, want in expected_captions.items():
        check(key, rows[key], want)
    by_url = {url.rsplit("/", 1)[1].removesuffix(".jpg"): row for url, row in rows.items() if url.startswith("http")}
    for label, want in expected_downloads.items():
        check(label, by_url[label], want)
    border = by_url["border-300"]
    assert (border["width"], border["height"]) == (300, 200)
    assert (border["stored_width"], border["stored_height"]) == (128, 128)
    assert result.manifest["totals"]["drop_reasons"] == {"frame_mismatch": 1}
    assert result.manifest["totals"]["span_drop_reasons"]["box_cropped_out"] == 1


def test_grit_parquet_rows_with_border_resized_downloads(tmp_path: Path) -> None:
    """The GRIT-20M parquet route: the row's width/height (the original, turned for one row) and the
    download's .json together place the boxes."""
    import pyarrow as pa

    from grit_pipeline.build import run_build
    from grit_pipeline.config import BuildConfig

    squares = {"red": (40, 30, 90, 80), "blue": (150, 100, 190, 140)}
    raw = square_scene(240, 160, squares)
    boxes = {n: _normalized(b, 240, 160) for n, b in squares.items()}
    stored = resize_like_img2dataset(raw, "border", 128)
    samples = [Img2DatasetSample(CAPTION, f"https://example.com/{i}.jpg", jpeg_bytes(stored), 128, 128, {"id": i},
                                 None, 240, 160) for i in range(2)]
    write_img2dataset_folder([samples], tmp_path / "images")
    rows = [{"key": str(i), "id": i, "url": f"https://example.com/{i}.jpg", "caption": CAPTION,
             "width": size[0], "height": size[1], "noun_chunks": grit_entries(boxes), "ref_exps": grit_entries(boxes),
             "clip_similarity_vitb32": 0.3, "clip_similarity_vitl14": 0.3}
            for i, size in enumerate(((480, 320), (320, 480)))]  # the original at twice the size; then turned
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "grit.parquet")
    config = BuildConfig(inputs=(str(tmp_path / "grit.parquet"),), out_dir=str(tmp_path / "out"),
                         images_dir=str(tmp_path / "images"), grounder="annotations", runner="local")
    assert run_build(config).ok
    out = pq.read_table(tmp_path / "out" / "shards" / "00000.parquet").to_pylist()
    assert [r["status"] for r in out] == ["kept", "dropped"] and out[1]["drop_reason"] == "frame_mismatch"
    assert (out[0]["width"], out[0]["height"], out[0]["stored_width"]) == (480, 320, 128)
    with tarfile.open(tmp_path / "out" / "shards" / "00000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    image = Image.open(io.BytesIO(members[f"{out[0]['key']}.jpg"]))
    for start, end, *box, _score in json.loads(members[f"{out[0]['key']}.json"])["noun_chunks"]:
        colour = "red" if (start, end) == SPANS["red"] else "blue"
        assert box_near(Box(*box), colour_box(image, COLOURS[colour]), image)


def test_the_frame_options_of_grit_build_reach_the_saved_config(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from grit_pipeline.cli import main

    _captions_folder(tmp_path / "in")
    result = CliRunner().invoke(main, ["build", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--runner",
                                       "local", "--grounder", "annotations", "--box-frame", "upright",
                                       "--img2dataset-resize-mode", "border", "--min-cropped-box-fraction", "0.25"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["config"]["frames"]
    assert saved == {"box_frame": "upright", "resize_mode": "border", "min_cropped_box_fraction": 0.25}
    rows = pq.read_table(tmp_path / "out" / "shards" / "00000.parquet").to_pylist()
    # taken as upright, boxes of rows without a size now land off their squares under EXIF 5-8: still kept,
    # since nothing can tell; rows whose size says raw keep being mapped as raw
    assert all(r["status"] == "kept" for r in rows)


def test_grit_ground_puts_supplied_boxes_in_the_stored_frame_too(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from grit_pipeline.cli import main

    expected = _captions_folder(tmp_path / "in")
    result = CliRunner().invoke(main, ["ground", str(tmp_path / "in"), str(tmp_path / "in" / "captions.jsonl"),
                                       "--grounder", "annotations"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["source_key"] for r in rows) == sorted(expected)
    for row in rows:
        image = ImageOps.exif_transpose(Image.open(tmp_path / "in" / f"{row['source_key']}.jpg"))
        assert (row["stored_width"], row["stored_height"]) == image.size
        for start, end, *box, _score in row["noun_chunks"]:
            colour = "red" if (start, end) == SPANS["red"] else "blue"
            assert box_near(Box(*box), colour_box(image, COLOURS[colour]), image), (row["key"], colour)


def test_grit_ground_prints_exactly_the_records_grit_build_writes(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from grit_pipeline.build import run_build
    from grit_pipeline.cli import main
    from grit_pipeline.config import build_config

    _captions_folder(tmp_path / "in")
    result = CliRunner().invoke(main, ["ground", str(tmp_path / "in"), str(tmp_path / "in" / "captions.jsonl"),
                                       "--grounder", "annotations"])
    assert result.exit_code == 0, result.output
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert run_build(build_config((str(tmp_path / "in"),), str(tmp_path / "out"), grounder="annotations",
                                  runner="local")).ok
    with tarfile.open(tmp_path / "out" / "shards" / "00000.tar") as tar:
        written = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert printed == written and len(printed) == 20
