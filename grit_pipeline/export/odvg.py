"""`grit export --format odvg`: MM-Grounding-DINO's grounding records (mmdet/datasets/odvg.py reads them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def odvg_record(sample: KeptSample, regions: list[Region], filename: str) -> dict[str, Any]:
    """One ODVG grounding line: stored image size, caption and one region per span (all its xyxy pixel boxes)."""
    return {
        "filename": filename,
        "height": sample.stored_height,
        "width": sample.stored_width,
        "grounding": {
            "caption": sample.record.caption,
            "regions": [
                {"bbox": region.boxes, "phrase": region.phrase, "tokens_positive": [[region.start, region.end]]}
                for region in regions
            ],
        },
    }


def export_odvg(out: str | Path, to: str | Path, images_dir: str | Path | None = None) -> ExportResult:
    """Write OUT's kept samples as ODVG JSON lines to `to`, images to `images_dir` (default `<stem>_images`)."""
    folder, manifest = open_build(out)
    target = Path(to)
    images = Path(images_dir) if images_dir is not None else default_images_dir(target)
    check_targets(folder, target, images)
    mode = serialize_mode(manifest)
    prefix = image_prefix(images, target.parent)
    result = ExportResult(target, "odvg", images_dir=images, warnings=incomplete_shards(manifest))
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as handle, staged_folder(images) as staged:
        for sample in iter_kept_samples(folder, manifest):
            regions = regions_of(sample, mode)
            if not regions:
                result.skipped += 1
                continue
            write_image(staged, sample.key, sample.image)
            filename = f"{prefix}{sample.key}.jpg"
            handle.write(json.dumps(odvg_record(sample, regions, filename), ensure_ascii=False) + "\n")
            result.samples += 1
            result.boxes += sum(len(region.boxes) for region in regions)
    return result
