"""img2dataset WebDataset folders: one input shard per NNNNN.tar, the failed downloads its NNNNN.parquet lists,
and what each sample's .json says about the stored download (sizes, saved additional columns)."""

from __future__ import annotations

import json
from typing import Any

from grit_pipeline.inputs.base import InputSample, InputShard, ShardContents
from grit_pipeline.inputs.tar import TarGroup, image_of, is_safe_member_name, iter_tar_groups, json_member
from grit_pipeline.records import DropReason
from grit_pipeline.stages.frames import DownloadInfo, Size
from grit_pipeline.storage import Folder, open_location, parent_and_name

# Metadata columns img2dataset writes itself; every other .json field is a saved additional column.
_IMG2DATASET_META = frozenset(
    "key url caption status error_message width height original_width original_height exif sha256".split()
)


def tar_names(files: dict[str, Any]) -> list[str]:
    """The tar names of a folder listing (`Folder.files`), in order; hidden files are not shards."""
    return sorted(name for name in files if name.endswith(".tar") and not name.startswith("."))


def read_img2dataset_shard(shard: InputShard) -> ShardContents:
    """The samples of one img2dataset tar, plus the failed downloads its NNNNN.parquet lists (image_missing)."""
    errors: list[str] = []
    seen: set[str] = set()
    with open_location(shard.path, shard.storage_options) as handle:
        samples = [_sample_from_group(group, seen) for group in iter_tar_groups(handle, errors)]
    folder, name = parent_and_name(shard.path, shard.storage_options)
    samples.extend(_failed_downloads(folder, name.removesuffix(".tar") + ".parquet", seen, errors))
    return ShardContents(samples, errors)


def _sample_from_group(group: TarGroup, seen: set[str]) -> InputSample:
    meta, meta_problem = json_member(group.members.get("json"))
    text = group.members.get("txt")
    caption = text.decode("utf-8", errors="replace") if text is not None else meta.get("caption")
    image, image_error = image_of(group.members)
    sample = InputSample(
        source_key=group.key,
        caption=caption if isinstance(caption, str) else None,
        image=image,
        image_error=image_error,
        url=meta.get("url") if isinstance(meta.get("url"), str) else None,
        fields=_decoded_entry_columns({k: v for k, v in meta.items() if k not in ("key", "caption", "url")}),
        member=group.key,
        download=download_info(meta),
    )
    problems = list(group.problems) + ([meta_problem] if meta_problem else [])
    if not is_safe_member_name(group.key):
        problems.append(f"unsafe member name {group.key!r}")
        sample.caption = None
    elif group.key in seen:
        problems.append(f"duplicate key {group.key!r} in the shard")
        sample.caption = None
    seen.add(group.key)
    sample.error_message = "; ".join(problems) or None
    return sample


def _decoded_entry_columns(fields: dict[str, Any]) -> dict[str, Any]:
    """noun_chunks/ref_exps given as JSON text parsed to lists (text that is not JSON stays, and is malformed).

    img2dataset 1.25 cannot save list columns (pandas hands it numpy arrays, which its json.dumps rejects, and
    every sample is lost), so a GRIT-20M download saves them as JSON strings: docs/output-format.md.
    """
    for name in ("noun_chunks", "ref_exps"):
        if isinstance(fields.get(name), str):
            try:
                fields[name] = json.loads(fields[name])
            except ValueError:
                pass
    return fields


def download_info(meta: dict[str, Any]) -> DownloadInfo | None:
    """The stored and original sizes img2dataset's .json gives (None when it gives neither)."""
    stored = size_of(meta.get("width"), meta.get("height"))
    original = size_of(meta.get("original_width"), meta.get("original_height"))
    return None if stored is None and original is None else DownloadInfo(stored, original)


def size_of(width: Any, height: Any) -> Size | None:
    """A Size from two positive whole numbers (ints or integral floats), else None."""
    def whole(value: Any) -> int | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value <= 0:
            return None
        return int(value) if float(value).is_integer() else None

    w, h = whole(width), whole(height)
    return Size(w, h) if w is not None and h is not None else None


def _failed_downloads(folder: Folder, parquet: str, seen: set[str], errors: list[str]) -> list[InputSample]:
    """Rows of img2dataset's per-shard parquet whose download failed: samples without an image."""
    if not folder.is_file(parquet):
        return []
    try:
        import pyarrow.parquet as pq

        with folder.open(parquet) as handle:
            rows = pq.read_table(handle).to_pylist()
    except Exception as exc:  # any pyarrow failure on a damaged file: record it and keep the tar's samples
        errors.append(f"{parquet}: unreadable: {type(exc).__name__}: {exc}")
        return []
    failed = []
    for row in rows:
        key = row.get("key")
        if row.get("status") in (None, "success") or key is None or str(key) in seen:
            continue
        seen.add(str(key))
        caption = row.get("caption")
        failed.append(InputSample(
            source_key=str(key), caption=caption if isinstance(caption, str) else None,
            image_error=DropReason.IMAGE_MISSING, error_message=f"img2dataset: {row.get('error_message')}",
            url=row.get("url") if isinstance(row.get("url"), str) else None,
            fields={k: v for k, v in row.items() if k not in _IMG2DATASET_META},
        ))
    return failed
