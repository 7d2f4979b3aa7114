"""GRIT-20M parquet files: one input shard per `samples_per_shard` rows, each row's image looked up by id
(then url) in an img2dataset folder, one tar's columns at a time (`locate_images`): no index of the whole
folder is ever held in memory."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from grit_pipeline.inputs.base import InputError, InputKind, InputSample, InputShard, ShardContents
from grit_pipeline.inputs.img2dataset import download_info, size_of, tar_names
from grit_pipeline.inputs.tar import image_of, iter_tar_groups, json_member
from grit_pipeline.records import DropReason
from grit_pipeline.stages.frames import DownloadInfo, SourceFrame
from grit_pipeline.storage import Folder, open_location, parent_and_name


def grit_parquet_shards(location: str, samples_per_shard: int, images_dir: str | None,
                        storage_options: dict[str, Any] | None = None) -> list[InputShard]:
    """A shard per `samples_per_shard` rows of the GRIT-20M parquet at `location` (its footer gives the rows)."""
    import pyarrow.parquet as pq

    with open_location(location, storage_options) as handle:
        rows = pq.ParquetFile(handle).metadata.num_rows
    images = resolve_images_dir(location, images_dir, storage_options)
    name = location.rsplit("/", 1)[-1]
    return [
        InputShard(InputKind.GRIT_PARQUET, location, f"{name}[{start}:{min(start + samples_per_shard, rows)}]",
                   start, min(start + samples_per_shard, rows), images.url if images else None,
                   storage_options=dict(storage_options or {}))
        for start in range(0, max(rows, 1), samples_per_shard)
    ]


def resolve_images_dir(parquet: str, images_dir: str | None, storage_options: dict[str, Any] | None = None
                       ) -> Folder | None:
    """Where the images of a GRIT-20M parquet are: `--images`, else `STEM/` or `STEM_images/` next to it, else
    the parquet's own folder when it holds img2dataset tars; None when there is none (samples lack images)."""
    if images_dir is not None:
        folder = Folder(images_dir, storage_options)
        if not tar_names(folder.files()):
            raise InputError(f"--images {images_dir}: not an img2dataset folder with NNNNN.tar files")
        return folder
    parent, name = parent_and_name(parquet, storage_options)
    stem = name.removesuffix(".parquet")
    for candidate in (parent.child(stem), parent.child(stem + "_images"), parent):
        if tar_names(candidate.files()):
            return candidate
    return None


@dataclass(frozen=True, slots=True)
class ImageLocation:
    """Where a GRIT-20M row's image is: a tar of the images folder and its member key; or, for a download
    img2dataset lists as failed, why there is no image (`failure`)."""

    tar: str
    key: str
    failure: str | None = None


def locate_images(images: Folder, rows: list[dict[str, Any]], first_row: int) -> list[ImageLocation | None]:
    """Each row's image location (by id, then url), found without an index of the whole images folder.

    img2dataset keeps its input's order, so row r of the parquet is in tar r // (rows per tar) when the
    folder was downloaded from this parquet: the search starts there and reads one tar's id/url/key columns
    (its .parquet, ~1 MB for 10,000 rows) at a time, until every row is found. Memory is one tar's columns
    plus this shard's rows; a row that no tar lists costs a scan of every tar's columns.
    """
    tars, rows_per_tar = tar_layout(images)
    wanted: dict[str, list[int]] = {}
    for position, row in enumerate(rows):
        for name in ("id", "url"):
            if row.get(name) is not None:
                wanted.setdefault(f"{name}:{row[name]}", []).append(position)
    found: list[ImageLocation | None] = [None] * len(rows)
    missing = len(rows)
    if not tars or not wanted:
        return found
    start = min(first_row // max(1, rows_per_tar), len(tars) - 1)
    for tar in tars[start:] + tars[:start]:
        for key, meta in _tar_index(images, tar):
            for name in ("id", "url"):
                for position in wanted.pop(f"{name}:{meta.get(name)}", ()):
                    if found[position] is None:
                        found[position] = ImageLocation(tar, key, meta.get("failure"))
                        missing -= 1
        if missing == 0:
            break
    return found


@functools.lru_cache(maxsize=8)
def tar_layout(images: Folder) -> tuple[list[str], int]:
    """The images folder's tars and the rows img2dataset put in each (its first tar's), listed once per
    process: every shard of a parquet input needs them, and the folder does not change during a build."""
    tars = tar_names(images.files())
    return tars, _rows_per_tar(images, tars[0]) if tars else 0


def _rows_per_tar(images: Folder, tar: str) -> int:
    import pyarrow.parquet as pq

    parquet = tar.removesuffix(".tar") + ".parquet"
    if not images.is_file(parquet):
        return 10_000  # img2dataset's default number_sample_per_shard
    with images.open(parquet) as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def _tar_index(images: Folder, tar: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(member key, {id, url, failure}) of every sample img2dataset tried for one tar: from its .parquet
    (failed downloads included), else from the tar's .json members."""
    parquet = tar.removesuffix(".tar") + ".parquet"
    if images.is_file(parquet):
        import pyarrow.parquet as pq

        with images.open(parquet) as handle:
            table = pq.read_table(handle)
        columns = [c for c in ("key", "id", "url", "status", "error_message") if c in table.column_names]
        for row in table.select(columns).to_pylist():
            if row.get("key") is not None:
                failed = row.get("status", "success") != "success"
                yield str(row["key"]), {**row, "failure": f"img2dataset: {row.get('error_message')}" if failed else None}
        return
    with images.open(tar) as handle:
        for group in iter_tar_groups(handle, []):
            yield group.key, json_member(group.members.get("json"))[0]


def read_grit_parquet_shard(shard: InputShard) -> ShardContents:
    """Rows [start, stop) of a GRIT-20M parquet, each with its image looked up by id (then url)."""
    errors: list[str] = []
    table_rows = read_parquet_rows(shard.path, shard.start, shard.stop, shard.storage_options)
    images = Folder(shard.images, shard.storage_options) if shard.images else None
    locations = locate_images(images, table_rows, shard.start) if images else [None] * len(table_rows)
    wanted: dict[str, set[str]] = {}
    for location in locations:
        if location is not None and location.failure is None:
            wanted.setdefault(location.tar, set()).add(location.key)
    found: dict[tuple[str, str], tuple[bytes | None, DownloadInfo | None]] = {}
    for tar, keys in sorted(wanted.items()):
        assert images is not None
        with images.open(tar) as handle:
            for group in iter_tar_groups(handle, errors, frozenset(keys)):
                found[(tar, group.key)] = (image_of(group.members)[0],
                                           download_info(json_member(group.members.get("json"))[0]))
    samples = []
    for row, location in zip(table_rows, locations, strict=True):
        image, download = found.get((location.tar, location.key), (None, None)) if location else (None, None)
        samples.append(_grit_row_sample(row, image, download, shard.images, location))
    return ShardContents(samples, errors)


def read_parquet_rows(path: str, start: int, stop: int | None,
                      storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows [start, stop) of a parquet file (a path or URL), reading only the row groups that hold them."""
    with open_location(path, storage_options) as handle:
        return _rows_of(handle, start, stop)


def _rows_of(handle: Any, start: int, stop: int | None) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(handle)
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


def _grit_row_sample(row: dict[str, Any], image: bytes | None, download: DownloadInfo | None,
                     images: str | None, location: ImageLocation | None) -> InputSample:
    caption = row.get("caption")
    missing = "no image folder found for this parquet" if images is None else "image not found by id or url"
    if location is not None and location.failure is not None:
        missing = location.failure
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
