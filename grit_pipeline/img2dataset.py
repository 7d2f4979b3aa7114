"""Write folders in img2dataset's WebDataset output layout (for tests, benchmarks and demos; no img2dataset).

The layout, as img2dataset writes it: `NNNNN.tar` holding `KEY.jpg`, `KEY.txt` (the caption) and `KEY.json`
(url, key, status, sizes, plus any `--save_additional_columns`), `NNNNN.parquet` with one row per input
row including failed downloads, and `NNNNN_stats.json`. Keys are `shard * 10**4 + index`, zero-padded.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class Img2DatasetSample:
    """One row as img2dataset saw it: the image bytes (None for a failed download) and the extra columns."""

    caption: str
    url: str
    image: bytes | None
    width: int | None = None
    height: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    error_message: str | None = None
    original_width: int | None = None
    original_height: int | None = None


def write_img2dataset_folder(shards: Sequence[Sequence[Img2DatasetSample]], folder: str | Path,
                             key_digits: int = 4) -> Path:
    """Write one NNNNN.tar/.parquet/_stats.json triple per list of samples; returns the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for shard_index, samples in enumerate(shards):
        _write_shard(out, shard_index, samples, key_digits)
    return out


def _write_shard(out: Path, shard_index: int, samples: Sequence[Img2DatasetSample], key_digits: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    with tarfile.open(out / f"{shard_index:05d}.tar", "w") as tar:
        for index, sample in enumerate(samples):
            key = f"{shard_index * 10**key_digits + index:0{5 + key_digits}d}"
            meta = {"url": sample.url, "key": key, "caption": sample.caption,
                    "status": "success" if sample.image is not None else "failed_to_download",
                    "error_message": sample.error_message, "width": sample.width, "height": sample.height,
                    "original_width": sample.original_width or sample.width,
                    "original_height": sample.original_height or sample.height, **sample.extra}
            rows.append(meta)
            if sample.image is None:
                continue
            for name, data in ((f"{key}.jpg", sample.image), (f"{key}.txt", sample.caption.encode()),
                               (f"{key}.json", json.dumps(meta).encode())):
                add_member(tar, name, data)
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k not in ("noun_chunks", "ref_exps")}
                                         for r in rows]), out / f"{shard_index:05d}.parquet")
    successes = sum(1 for s in samples if s.image is not None)
    stats = {"count": len(samples), "successes": successes, "failed_to_download": len(samples) - successes}
    (out / f"{shard_index:05d}_stats.json").write_text(json.dumps(stats))


def resize_like_img2dataset(image: Any, mode: str, image_size: int) -> Any:
    """A PIL image resized as img2dataset's resizer does with `--resize_mode mode --image_size image_size`
    (resize_only_if_bigger off): albumentations' SmallestMaxSize/LongestMaxSize rounding, CenterCrop with
    floored offsets, PadIfNeeded with white and the odd pixel bottom/right. EXIF is ignored, as OpenCV's
    IMREAD_UNCHANGED does; only the geometry is img2dataset's (PIL resamples, not OpenCV)."""
    from PIL import Image

    width, height = image.size
    if mode == "no":
        return image
    longest = mode in ("keep_ratio_largest", "border")
    scale = image_size / (max(width, height) if longest else min(width, height))
    resized = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)
    if mode == "center_crop":
        left, top = (resized.width - image_size) // 2, (resized.height - image_size) // 2
        return resized.crop((left, top, left + image_size, top + image_size))
    if mode == "border":
        canvas = Image.new(resized.mode, (image_size, image_size), (255, 255, 255))
        canvas.paste(resized, ((image_size - resized.width) // 2, (image_size - resized.height) // 2))
        return canvas
    if mode in ("keep_ratio", "keep_ratio_largest"):
        return resized
    raise ValueError(f"unknown img2dataset resize mode {mode!r}")


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a regular file member `name` with `data` to an open tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def scene_samples(scenes: Sequence[Any], grit_columns: bool = True) -> list[Img2DatasetSample]:
    """img2dataset samples of synthetic scenes (grit_pipeline.synthetic); with `grit_columns`, each .json
    carries the GRIT-20M id, noun_chunks and ref_exps as a GRIT-20M download does."""
    samples = []
    for number, scene in enumerate(scenes):
        buffer = io.BytesIO()
        scene.image.save(buffer, format="JPEG", quality=90)
        extra: dict[str, Any] = {}
        if grit_columns:
            row = scene.to_record().to_row()
            extra = {"id": number, "noun_chunks": row["noun_chunks"], "ref_exps": row["ref_exps"],
                     "clip_similarity_vitb32": 0.3, "clip_similarity_vitl14": 0.3}
        samples.append(Img2DatasetSample(scene.caption, f"https://example.com/{scene.key}.jpg", buffer.getvalue(),
                                         scene.width, scene.height, extra))
    return samples
