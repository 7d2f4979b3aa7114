"""GRIT-20M parquet files: one input shard per `samples_per_shard` rows, each row's image looked up by id
(then url) in an img2dataset folder."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grit_pipeline.inputs.base import InputError, InputKind, InputSample, InputShard, ShardContents
from grit_pipeline.inputs.img2dataset import download_info, size_of, tar_files
from grit_pipeline.inputs.tar import image_of, iter_tar_groups, json_member
from grit_pipeline.records import DropReason
from grit_pipeline.stages.frames import DownloadInfo, SourceFrame


def grit_parquet_shards(path: Path, samples_per_shard: int, images_dir: str | None) -> list[InputShard]:
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(path).metadata.num_rows
    images = resolve_images_dir(path, images_dir)
    return [
        InputShard(InputKind.GRIT_PARQUET, str(path), f"{path.name}[{start}:{min(start + samples_per_shard, rows)}]",
                   start, min(start + samples_per_shard, rows), str(images) if images else None)
        for start in range(0, max(rows, 1), samples_per_shard)
    ]


def resolve_images_dir(parquet: Path, images_dir: str | None) -> Path | None:
    """Where the images of a GRIT-20M parquet are: `--images`, else `STEM/` or `STEM_images/` next to it, else
    the parquet's own folder when it holds img2dataset tars; None when there is none (samples lack images)."""
    if images_dir is not None:
        folder = Path(images_dir).resolve()
        if not folder.is_dir() or not tar_files(folder):
            raise InputError(f"--images {images_dir}: not an img2dataset folder with NNNNN.tar files")
        return folder
    for candidate in (parquet.with_suffix(""), parquet.with_name(parquet.stem + "_images"), parquet.parent):
        if candidate.is_dir() and tar_files(candidate):
            return candidate
    return None


@functools.lru_cache(maxsize=4)
def image_index(folder: str) -> dict[str, tuple[str, str]]:
    """Where each image of an img2dataset folder is: "id:ID" and "url:URL" -> (tar path, member key).

    Built from the folder's per-shard parquet files when present (cheap), else from the tars' .json members;
    cached per process, since every shard of a parquet input needs it.
    """
    index: dict[str, tuple[str, str]] = {}
    for tar in tar_files(Path(folder)):
        for key, meta in _index_rows(tar):
            for name in ("id", "url"):
                if meta.get(name) is not None:
                    index.setdefault(f"{name}:{meta[name]}", (str(tar), key))
    return index


def _index_rows(tar: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    parquet = tar.with_suffix(".parquet")
    if parquet.is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(parquet)
        columns = [c for c in ("key", "id", "url", "status") if c in table.column_names]
        for row in table.select(columns).to_pylist():
            if row.get("key") is not None and row.get("status", "success") == "success":
                yield str(row["key"]), row
        return
    for group in iter_tar_groups(str(tar), []):
        yield group.key, json_member(group.members.get("json"))[0]


def read_grit_parquet_shard(shard: InputShard) -> ShardContents:
    """Rows [start, stop) of a GRIT-20M parquet, each with its image looked up by id (then url)."""
    errors: list[str] = []
    table_rows = read_parquet_rows(shard.path, shard.start, shard.stop)
    index = image_index(shard.images) if shard.images else {}
    locations = [_locate(row, index) for row in table_rows]
    wanted: dict[str, set[str]] = {}
    for location in locations:
        if location is not None:
            wanted.setdefault(location[0], set()).add(location[1])
    images = {(tar, group.key): (image_of(group.members)[0], download_info(json_member(group.members.get("json"))[0]))
              for tar, keys in sorted(wanted.items())
              for group in iter_tar_groups(tar, errors, frozenset(keys))}
    found = [images.get(location, (None, None)) if location else (None, None) for location in locations]
    samples = [_grit_row_sample(row, image, download, shard.images)
               for row, (image, download) in zip(table_rows, found, strict=True)]
    return ShardContents(samples, errors)


def read_parquet_rows(path: str, start: int, stop: int | None) -> list[dict[str, Any]]:
    """Rows [start, stop) of a parquet file, reading only the row groups that hold them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    stop = parquet.metadata.num_rows if stop is None else stop
    groups, first_row, offset = [], None, 0
    for number in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(number).num_rows
        if offset < stop and offset + size > start:
            groups.append(number)
            first_row = offset if first_row is None else first_row
        offset += size
    if not groups:
        return []
    table = pa.concat_tables([parquet.read_row_group(g) for g in groups])
    return table.slice(start - first_row, stop - start).to_pylist()


def _locate(row: dict[str, Any], index: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    for name in ("id", "url"):
        if row.get(name) is not None and f"{name}:{row[name]}" in index:
            return index[f"{name}:{row[name]}"]
    return None


def _grit_row_sample(row: dict[str, Any], image: bytes | None, download: DownloadInfo | None,
                     images: str | None) -> InputSample:
    caption = row.get("caption")
    missing = "no image folder found for this parquet" if images is None else "image not found by id or url"
    return InputSample(
        source_key=str(row.get("key")),
        caption=caption if isinstance(caption, str) else None,
        image=image,
        image_error=None if image is not None else DropReason.IMAGE_MISSING,
        error_message=None if image is not None else missing,
        url=row.get("url") if isinstance(row.get("url"), str) else None,
        fields={k: v for k, v in row.items() if k not in ("key", "caption", "url")},
        frame=SourceFrame(size_of(row.get("width"), row.get("height"))),
        download=download,
    )
