"""`grit export --format mdetr`: COCO-style JSON laid out like MDETR's pre-processed Flickr30k Entities files
(one images[] entry per caption, annotations[] with COCO xywh pixel boxes and their `tokens_positive`)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, TextIO

from grit_pipeline.export.reader import (
    ExportResult,
    KeptSample,
    Region,
    check_targets,
    default_images_dir,
    image_prefix,
    incomplete_shards,
    iter_kept_samples,
    open_build,
    regions_of,
    serialize_mode,
    staged_folder,
    write_image,
)
from grit_pipeline.io import atomic_path

CATEGORIES = [{"supercategory": "object", "id": 1, "name": "object"}]
DATASET_NAME = "grit"


def mdetr_image(sample: KeptSample, regions: list[Region], file_name: str, image_id: int) -> dict[str, Any]:
    """The images[] entry of one sample (MDETR's Flickr fields; height/width are the stored image's)."""
    return {
        "file_name": file_name,
        "height": sample.stored_height,
        "width": sample.stored_width,
        "id": image_id,
        "caption": sample.record.caption,
        "dataset_name": DATASET_NAME,
        "tokens_positive_eval": [[[region.start, region.end]] for region in regions],
        "sentence_id": 0,
        "original_img_id": int(sample.key) if sample.key.isdigit() else image_id,
    }


def mdetr_annotations(regions: list[Region], image_id: int, first_id: int) -> list[dict[str, Any]]:
    """The annotations[] entries of one sample: one per box, COCO xywh pixels, numbered from `first_id`."""
    annotations = []
    for region in regions:
        for x1, y1, x2, y2 in region.boxes:
            w, h = round(x2 - x1, 3), round(y2 - y1, 3)
            annotations.append({
                "area": round(w * h, 3),
                "bbox": [x1, y1, w, h],
                "category_id": 1,
                "id": first_id + len(annotations),
                "image_id": image_id,
                "iscrowd": 0,
                "tokens_positive": [[region.start, region.end]],
            })
    return annotations


def export_mdetr(out: str | Path, to: str | Path, images_dir: str | Path | None = None) -> ExportResult:
    """Write OUT's kept samples as one MDETR-style COCO JSON file, images to `images_dir` (default `<stem>_images`).

    Streams: images[] entries go straight into the temporary target, annotations[] into a second temporary
    file that is appended after them; nothing holds more than one sample.
    """
    folder, manifest = open_build(out)
    target = Path(to)
    images = Path(images_dir) if images_dir is not None else default_images_dir(target)
    check_targets(folder, target, images)
    mode = serialize_mode(manifest)
    prefix = image_prefix(images, target.parent)
    result = ExportResult(target, "mdetr", images_dir=images, warnings=incomplete_shards(manifest))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, spool_name = tempfile.mkstemp(prefix=f".{target.name}.annotations.", dir=target.parent)
    try:
        with (
            atomic_path(target) as tmp,
            open(tmp, "w", encoding="utf-8") as handle,
            open(fd, "w+", encoding="utf-8") as spool,
            staged_folder(images) as staged,
        ):
            handle.write('{"categories": ' + json.dumps(CATEGORIES) + ', "images": [')
            next_annotation = 1
            for sample in iter_kept_samples(folder, manifest):
                regions = regions_of(sample, mode)
                if not regions:
                    result.skipped += 1
                    continue
                image_id = result.samples + 1
                write_image(staged, sample.key, sample.image)
                entry = mdetr_image(sample, regions, f"{prefix}{sample.key}.jpg", image_id)
                handle.write(("" if result.samples == 0 else ", ") + json.dumps(entry, ensure_ascii=False))
                for annotation in mdetr_annotations(regions, image_id, next_annotation):
                    spool.write(("" if next_annotation == 1 else ", ") + json.dumps(annotation))
                    next_annotation += 1
                result.samples += 1
            result.boxes = next_annotation - 1
            handle.write('], "annotations": [')
            _copy(spool, handle)
            handle.write("]}\n")
    finally:
        if os.path.exists(spool_name):
            os.unlink(spool_name)
    return result


def _copy(source: TextIO, target: TextIO, chunk: int = 1 << 20) -> None:
    source.flush()
    source.seek(0)
    while data := source.read(chunk):
        target.write(data)
