"""`grit export`: a real build exported as ODVG, MDETR COCO-style JSON and GRIT-20M parquet, each parsed the
way its consumer parses it, with boxes checked against the synthetic scenes' ground truth. The build mixes a
captions folder (stored size = original size) and an img2dataset folder resized with keep_ratio (stored
48x32, original 96x64), and drops one sample, so kept < input and stored != original size."""

from __future__ import annotations

import io
import json
import os.path as osp
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from grit_pipeline.build import run_build
from grit_pipeline.cli import main as cli_main
from grit_pipeline.config import build_config
from grit_pipeline.export import ExportError, export_build
from grit_pipeline.export.reader import KeptSample, regions_of
from grit_pipeline.fixtures.img2dataset import (
    Img2DatasetSample,
    resize_like_img2dataset,
    write_img2dataset_folder,
)
from grit_pipeline.fixtures.synthetic import COLOURS, generate_scenes, write_scene_folder
from grit_pipeline.manifests.manifest import load_manifest
from grit_pipeline.records import GRIT20M_SCHEMA, Box, GritRecord, GroundedSpan, Span

SIZE = (96, 64)
RESIZED = (48, 32)


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> tuple[Path, dict[str, tuple]]:
    """The build folder and, by caption, (scene, stored width, stored height) for every kept sample."""
    root = tmp_path_factory.mktemp("export")
    scenes = generate_scenes(10, seed=5, size=SIZE)
    assert len({s.caption for s in scenes}) == len(scenes)
    jsonl = write_scene_folder(scenes[:6], root / "captions")
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    lines[1]["annotations"] = []  # nothing to ground it with: dropped
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    samples = []
    for number, scene in enumerate(scenes[6:]):
        buffer = io.BytesIO()
        resize_like_img2dataset(scene.image, "keep_ratio", min(RESIZED)).save(buffer, format="JPEG", quality=95)
        row = scene.to_record().to_row()
        samples.append(Img2DatasetSample(scene.caption, f"https://example.com/{scene.key}.jpg", buffer.getvalue(),
                                         *RESIZED, {"id": number, "noun_chunks": row["noun_chunks"],
                                                    "ref_exps": row["ref_exps"]},
                                         original_width=SIZE[0], original_height=SIZE[1]))
    downloads = write_img2dataset_folder([samples], root / "i2d")
    config = build_config((str(root / "captions"), str(downloads)), str(root / "out"), grounder="annotations",
                          runner="local", samples_per_shard=3)
    result = run_build(config)
    assert result.ok and result.manifest["totals"]["kept"] == 9
    truth = {s.caption: (s, *SIZE) for i, s in enumerate(scenes[:6]) if i != 1}
    truth.update({s.caption: (s, *RESIZED) for s in scenes[6:]})
    return root / "out", truth


def _pixels(box: Box, width: int, height: int) -> list[float]:
    return [round(v, 3) for v in box.to_pixels(width, height)]


def _close(a: list[float], b: list[float], tol: float = 1e-3) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def _nearest_colour(rgb: tuple[int, int, int]) -> str:
    return min(COLOURS, key=lambda name: sum((c - v) ** 2 for c, v in zip(COLOURS[name], rgb, strict=True)))


def _assert_on_the_shape(image_path: str, box: list[float], colour: str) -> None:
    """The centre of the box is the shape's colour in the exported image: the box is on the right pixels."""
    with Image.open(image_path) as image:
        rgb = image.convert("RGB").getpixel((int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)))
    assert _nearest_colour(rgb) == colour


# ---- mmdetection's ODVG reader, replicated -------------------------------------------------------------------
def odvg_load_data_list(ann_file: str, data_prefix_img: str) -> list[dict]:
    """ODVGDataset.load_data_list in VG mode, mirrored line by line from open-mmlab/mmdetection
    mmdet/datasets/odvg.py (commit 091ae036e6f2, lines 30-101)."""
    with open(ann_file) as f:
        data_list = [json.loads(line) for line in f]  # l.33-34: json.loads per line
    out_data_list = []
    for data in data_list:
        data_info = {}
        img_path = osp.join(data_prefix_img, data["filename"])  # l.39: img path = data_prefix['img'] + filename
        data_info["img_path"] = img_path
        data_info["height"] = data["height"]  # l.41-42: height/width as given
        data_info["width"] = data["width"]
        anno = data["grounding"]  # l.68-70: caption -> text, regions
        data_info["text"] = anno["caption"]
        regions = anno["regions"]
        instances = []
        phrases = {}
        for i, region in enumerate(regions):  # l.74-77
            bbox = region["bbox"]
            phrase = region["phrase"]
            tokens_positive = region["tokens_positive"]
            if not isinstance(bbox[0], list):  # l.78-79: a single box or a list of boxes
                bbox = [bbox]
            for box in bbox:  # l.80-88: drop boxes outside the image, or under 1 px wide or high
                instance = {}
                x1, y1, x2, y2 = box
                inter_w = max(0, min(x2, data["width"]) - max(x1, 0))
                inter_h = max(0, min(y2, data["height"]) - max(y1, 0))
                if inter_w * inter_h == 0:
                    continue
                if (x2 - x1) < 1 or (y2 - y1) < 1:
                    continue
                instance["ignore_flag"] = 0  # l.89-97: label = region index; tokens_positive per label
                instance["bbox"] = box
                instance["bbox_label"] = i
                phrases[i] = {"phrase": phrase, "tokens_positive": tokens_positive}
                instances.append(instance)
        data_info["instances"] = instances
        data_info["phrases"] = phrases
        out_data_list.append(data_info)
    return out_data_list


def test_odvg_parses_under_mmdetections_rules_with_boxes_on_the_stored_pixels(build, tmp_path) -> None:
    out, truth = build
    target = tmp_path / "export" / "grit.jsonl"
    result = export_build(out, "odvg", target)
    assert result.samples == 9 and result.images_dir == tmp_path / "export" / "grit_images"
    raw = [json.loads(line) for line in target.read_text().splitlines()]
    infos = odvg_load_data_list(str(target), str(target.parent))  # data_root + data_prefix img ''
    assert len(infos) == 9
    written = sum(len(r["bbox"]) for d in raw for r in d["grounding"]["regions"])
    assert sum(len(info["instances"]) for info in infos) == written == result.boxes  # the reader drops none
    for info in infos:
        scene, width, height = truth[info["text"]]
        with Image.open(info["img_path"]) as image:
            assert image.size == (info["width"], info["height"]) == (width, height)  # stored size
        assert set(info["phrases"]) == {inst["bbox_label"] for inst in info["instances"]}
        for phrase in info["phrases"].values():
            for start, end in phrase["tokens_positive"]:
                assert 0 <= start < end <= len(info["text"]) and info["text"][start:end] == phrase["phrase"]
        boxes = [(inst["bbox"], info["phrases"][inst["bbox_label"]]) for inst in info["instances"]]
        assert len(boxes) == len(scene.objects)
        for obj in scene.objects:
            expected = _pixels(obj.box, width, height)
            match = [p for box, p in boxes if _close(box, expected)]
            assert match, (expected, boxes)
            start, end = match[0]["tokens_positive"][0]
            assert start <= obj.span.start and obj.span.end <= end  # the region's span names the object
            _assert_on_the_shape(info["img_path"], expected, obj.colour)


def test_mdetr_json_reads_like_mdetrs_coco_loader(build, tmp_path) -> None:
    out, truth = build
    target = tmp_path / "final_grit_train.json"
    result = export_build(out, "mdetr", target, images_dir=tmp_path / "imgs")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the annotations spool is gone
    data = json.loads(target.read_text())
    assert data["categories"] == [{"supercategory": "object", "id": 1, "name": "object"}]
    images = {image["id"]: image for image in data["images"]}  # pycocotools COCO.createIndex
    assert len(images) == len(data["images"]) == result.samples == 9
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"]) == result.boxes
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        assert ann["image_id"] in images and ann["category_id"] == 1 and ann["iscrowd"] == 0
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image_id, image in images.items():
        assert image["sentence_id"] == 0 and isinstance(image["original_img_id"], int)
        assert image["dataset_name"] == "grit"
        caption, w, h = image["caption"], image["width"], image["height"]
        scene, width, height = truth[caption]
        path = tmp_path / image["file_name"]  # torchvision CocoDetection: root / file_name
        with Image.open(path) as pil:
            assert pil.size == (w, h) == (width, height)
        anns = by_image[image_id]
        for ann in anns:
            x, y, bw, bh = ann["bbox"]
            # datasets/coco.py ConvertCocoPolysToMask: xywh -> xyxy, clamp to the image, keep x2 > x1 and y2 > y1
            x1, y1, x2, y2 = max(0, min(x, w)), max(0, min(y, h)), max(0, min(x + bw, w)), max(0, min(y + bh, h))
            assert (x1, y1, x2, y2) == (x, y, x + bw, y + bh) and x2 > x1 and y2 > y1
            assert abs(ann["area"] - bw * bh) < 1e-2
            for start, end in ann["tokens_positive"]:
                assert 0 <= start < end <= len(caption)
        assert sorted(map(str, image["tokens_positive_eval"])) == sorted(
            {str(a["tokens_positive"]) for a in anns})
        for obj in scene.objects:
            x1, y1, x2, y2 = _pixels(obj.box, width, height)
            assert any(_close(a["bbox"], [x1, y1, round(x2 - x1, 3), round(y2 - y1, 3)]) for a in anns)
        assert len(anns) == len(scene.objects)


def test_grit20m_has_exactly_the_grit20m_columns_and_the_kept_rows(build, tmp_path) -> None:
    import pyarrow.parquet as pq

    out, truth = build
    target = tmp_path / "grit.parquet"
    export_build(out, "grit20m", target)
    table = pq.read_table(target)
    assert table.schema.equals(GRIT20M_SCHEMA)
    assert table.num_rows == load_manifest(out)["totals"]["kept"] == 9
    rows = table.to_pylist()
    assert {r["caption"] for r in rows} == set(truth)
    for row in rows:
        GritRecord.from_row(row).validate()
        assert (row["width"], row["height"]) == SIZE  # the ORIGINAL size, as in GRIT-20M


def test_regions_group_a_spans_boxes_follow_the_mode_and_drop_subpixel_boxes() -> None:
    caption = "a cat and a dog"
    cat, dog = Span(0, 5), Span(10, 15)
    boxes = [Box(0.1, 0.1, 0.5, 0.5), Box(0.5, 0.5, 0.9, 0.9), Box(0.1, 0.1, 0.102, 0.9)]
    record = GritRecord("00000000000", caption,
                        noun_chunks=[GroundedSpan(cat, boxes[0], 1), GroundedSpan(cat, boxes[1], 1),
                                     GroundedSpan(dog, boxes[2], 1)],
                        ref_exps=[GroundedSpan(Span(0, 15), b, 1) for b in boxes])
    sample = KeptSample("00000000000", record, b"", 100, 50)
    phrase = regions_of(sample, "phrase")
    assert [(r.phrase, r.boxes) for r in phrase] == [("a cat", [[10.0, 5.0, 50.0, 25.0], [50.0, 25.0, 90.0, 45.0]])]
    expression = regions_of(sample, "expression")
    assert [(r.start, r.end, len(r.boxes)) for r in expression] == [(0, 15, 2)]


def test_a_failed_export_leaves_no_file_and_keeps_the_previous_one(build, tmp_path, monkeypatch) -> None:
    out, _ = build
    target = tmp_path / "grit.jsonl"
    export_build(out, "odvg", target)
    before = target.read_bytes()
    images = sorted(p.name for p in (tmp_path / "grit_images").iterdir())

    import grit_pipeline.export.odvg as odvg

    calls = []

    def failing(folder: Path, key: str, data: bytes) -> None:
        calls.append(key)
        if len(calls) == 3:
            raise OSError("disk full")
        (folder / f"{key}.jpg").write_bytes(data)

    monkeypatch.setattr(odvg, "write_image", failing)
    with pytest.raises(OSError):
        export_build(out, "odvg", target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "grit_images").iterdir()) == images
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grit.jsonl", "grit_images"]  # no temporaries
    calls.clear()
    with pytest.raises(OSError):
        export_build(out, "odvg", tmp_path / "new.jsonl")
    assert not (tmp_path / "new.jsonl").exists() and not (tmp_path / "new_images").exists()


@pytest.mark.parametrize("fmt", ["odvg", "mdetr", "grit20m"])
def test_cli_exports_and_refuses_a_folder_without_a_build_in_one_line(build, tmp_path, fmt) -> None:
    out, _ = build
    runner = CliRunner()
    ok = runner.invoke(cli_main, ["export", str(out), "--format", fmt, "--to", str(tmp_path / f"x.{fmt}")])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith(f"wrote {tmp_path / f'x.{fmt}'} ({fmt}): 9 samples")
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        res = runner.invoke(cli_main, ["export", str(bad), "--format", fmt, "--to", str(tmp_path / "y")])
        assert res.exit_code == 1
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and str(bad) in lines[0]
        assert not (tmp_path / "y").exists()


def test_an_images_folder_with_foreign_files_is_refused(build, tmp_path) -> None:
    out, _ = build
    (tmp_path / "grit_images").mkdir()
    (tmp_path / "grit_images" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a previous export"):
        export_build(out, "odvg", tmp_path / "grit.jsonl")
    assert (tmp_path / "grit_images" / "notes.txt").read_text() == "mine"
