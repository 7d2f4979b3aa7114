"""Inputs of `grit build`: img2dataset WebDataset folders, image folders with captions.jsonl, GRIT-20M parquet.

Every input becomes an ordered list of `InputShard`s; the global position of a shard in the list of all
inputs is the number of the output shard it becomes. Reading a shard yields `InputSample`s: a caption, the
image bytes (or why there are none), the url and the source metadata. A sample that cannot be read is
still a sample, with a drop reason, so that the output parquet lists every input sample.

Input files are untrusted: tar member names and image paths are only ever read, never used to name an
output file, and a member name that is absolute or climbs out with `..` makes its sample malformed.
"""

from __future__ import annotations

import enum
import functools
import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from grit_pipeline.records import DropReason
from grit_pipeline.stages.frames import DownloadInfo, Size, SourceFrame

CAPTIONS_FILE = "captions.jsonl"
# A larger member is not read into memory: no real web image is this big.
MAX_MEMBER_BYTES = 256 * 1024 * 1024
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Metadata columns img2dataset writes itself; every other .json field is a saved additional column.
_IMG2DATASET_META = frozenset(
    "key url caption status error_message width height original_width original_height exif sha256".split()
)


class InputKind(str, enum.Enum):
    """The three input layouts `grit build` reads."""

    IMG2DATASET = "img2dataset"
    CAPTIONS = "captions"
    GRIT_PARQUET = "grit-parquet"


class InputError(ValueError):
    """An input path that `grit build` cannot read at all (not a folder or parquet it understands)."""


@dataclass(slots=True)
class InputSample:
    """One input image-text pair as read, before any stage; `image` is None when `image_error` says why."""

    source_key: str
    caption: str | None
    image: bytes | None = None
    image_error: DropReason | None = None
    error_message: str | None = None
    url: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    member: str | None = None
    frame: SourceFrame = field(default_factory=SourceFrame)
    download: DownloadInfo | None = None

    def has_grit_entries(self) -> bool:
        """True when the source already carries GRIT-20M noun_chunks (a GRIT-20M download)."""
        return bool(self.fields.get("noun_chunks"))


@dataclass(slots=True)
class ShardContents:
    """The samples of one input shard and the read errors met on the way (a truncated tar, a bad line)."""

    samples: list[InputSample]
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class InputShard:
    """A unit of input: one img2dataset tar, a range of captions.jsonl lines, or a range of parquet rows."""

    kind: InputKind
    path: str
    name: str
    start: int = 0
    stop: int | None = None
    images: str | None = None
    byte_offset: int = 0  # where line `start` begins, for captions.jsonl shards

    def read(self) -> ShardContents:
        """Read every sample of the shard; read errors are collected, never raised."""
        reader = {InputKind.IMG2DATASET: read_img2dataset_shard, InputKind.CAPTIONS: read_captions_shard,
                  InputKind.GRIT_PARQUET: read_grit_parquet_shard}[self.kind]
        return reader(self)

    def describe(self) -> dict[str, Any]:
        """The shard's source, for stats files and the manifest."""
        return {"kind": self.kind.value, "path": self.path, "name": self.name, "start": self.start, "stop": self.stop,
                "images": self.images}


# ---------------------------------------------------------------------------------------------- discovery


def discover_shards(inputs: Sequence[str], samples_per_shard: int = 10_000,
                    images_dir: str | None = None) -> list[InputShard]:
    """All input shards of `inputs`, in argument order then file order (deterministic)."""
    shards: list[InputShard] = []
    for raw in inputs:
        path = Path(raw).resolve()
        if path.is_file() and path.suffix == ".parquet":
            shards.extend(_grit_parquet_shards(path, samples_per_shard, images_dir))
        elif path.is_dir() and (path / CAPTIONS_FILE).is_file():
            shards.extend(_captions_shards(path / CAPTIONS_FILE, samples_per_shard))
        elif path.is_dir() and _tar_files(path):
            shards.extend(InputShard(InputKind.IMG2DATASET, str(tar), tar.name) for tar in _tar_files(path))
        else:
            raise InputError(
                f"{raw}: not an img2dataset folder (NNNNN.tar files), a folder with {CAPTIONS_FILE}, "
                f"or a GRIT-20M .parquet file"
            )
    return shards


def fingerprint_inputs(inputs: Sequence[str]) -> list[dict[str, Any]]:
    """Name and size of every file an input consists of: enough to notice a changed input cheaply."""
    prints = []
    for raw in inputs:
        path = Path(raw).resolve()
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        prints.append({"input": str(path), "files": len(files), "bytes": sum(f.stat().st_size for f in files),
                       "names": [f.name for f in files][:1000]})
    return prints


def _tar_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".tar" and not p.name.startswith("."))


def _captions_shards(jsonl: Path, samples_per_shard: int) -> list[InputShard]:
    offsets = [0]  # byte offset of every shard's first line, so a shard is read without the lines before it
    lines, position = 0, 0
    with open(jsonl, "rb") as handle:
        for line in handle:
            lines += 1
            position += len(line)
            if lines % samples_per_shard == 0:
                offsets.append(position)
    return [
        InputShard(InputKind.CAPTIONS, str(jsonl), f"{CAPTIONS_FILE}[{start}:{min(start + samples_per_shard, lines)}]",
                   start, min(start + samples_per_shard, lines), str(jsonl.parent), offsets[number])
        for number, start in enumerate(range(0, max(lines, 1), samples_per_shard))
    ]


def _grit_parquet_shards(path: Path, samples_per_shard: int, images_dir: str | None) -> list[InputShard]:
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
        if not folder.is_dir() or not _tar_files(folder):
            raise InputError(f"--images {images_dir}: not an img2dataset folder with NNNNN.tar files")
        return folder
    for candidate in (parquet.with_suffix(""), parquet.with_name(parquet.stem + "_images"), parquet.parent):
        if candidate.is_dir() and _tar_files(candidate):
            return candidate
    return None


# ---------------------------------------------------------------------------------------------- tar reading


def is_safe_member_name(name: str) -> bool:
    """False for absolute names, names that climb with `..`, and names with NUL or backslashes."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        return False
    return ".." not in PurePosixPath(name).parts


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension) the way webdataset splits: the key is everything before the first dot of the basename."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


@dataclass(slots=True)
class _TarGroup:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def iter_tar_groups(path: str, errors: list[str], wanted: frozenset[str] | None = None) -> Iterator[_TarGroup]:
    """Consecutive members sharing a key, as webdataset groups them; read errors go to `errors`, never raise.

    A truncated or corrupt tar yields what was readable before the damage. Only regular files are read.
    """
    group: _TarGroup | None = None
    count = 0
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                count += 1
                key, ext = split_member_name(member.name)
                if group is not None and key != group.key:
                    yield group
                    group = None
                if wanted is not None and key not in wanted:
                    continue
                if group is None:
                    group = _TarGroup(key)
                _add_member(tar, member, ext, group)
    except (tarfile.TarError, EOFError, OSError, zlib_error()) as exc:
        errors.append(f"{Path(path).name}: unreadable after {count} members: {type(exc).__name__}: {exc}")
    if group is not None:
        yield group


def zlib_error() -> type[Exception]:
    """zlib.error (a compressed tar with a bad stream), importable without naming zlib everywhere."""
    import zlib

    return zlib.error


def _add_member(tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, group: _TarGroup) -> None:
    if member.isdir():
        return
    if not member.isfile():
        group.problems.append(f"non-regular member {member.name!r} ignored")
        return
    if ext in group.members:
        group.problems.append(f"duplicate member {member.name!r} ignored")
        return
    if member.size > MAX_MEMBER_BYTES:
        group.problems.append(f"member {member.name!r} of {member.size} bytes is too large")
        return
    handle = tar.extractfile(member)
    data = handle.read() if handle is not None else b""
    if len(data) != member.size:
        raise EOFError(f"member {member.name!r} truncated ({len(data)} of {member.size} bytes)")
    group.members[ext] = data


def _image_of(members: dict[str, bytes]) -> tuple[bytes | None, DropReason | None]:
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            return members[ext], None
    return None, DropReason.IMAGE_MISSING


def _sample_from_group(group: _TarGroup, seen: set[str]) -> InputSample:
    meta, meta_problem = _json_member(group.members.get("json"))
    text = group.members.get("txt")
    caption = text.decode("utf-8", errors="replace") if text is not None else meta.get("caption")
    image, image_error = _image_of(group.members)
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


def _json_member(data: bytes | None) -> tuple[dict[str, Any], str | None]:
    if data is None:
        return {}, None
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        return {}, f"bad .json member: {exc}"
    return (meta, None) if isinstance(meta, dict) else ({}, "the .json member is not an object")


def read_img2dataset_shard(shard: InputShard) -> ShardContents:
    """The samples of one img2dataset tar, plus the failed downloads its NNNNN.parquet lists (image_missing)."""
    errors: list[str] = []
    seen: set[str] = set()
    samples = [_sample_from_group(group, seen) for group in iter_tar_groups(shard.path, errors)]
    samples.extend(_failed_downloads(Path(shard.path).with_suffix(".parquet"), seen, errors))
    return ShardContents(samples, errors)


def _failed_downloads(parquet: Path, seen: set[str], errors: list[str]) -> list[InputSample]:
    """Rows of img2dataset's per-shard parquet whose download failed: samples without an image."""
    if not parquet.is_file():
        return []
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table(parquet).to_pylist()
    except Exception as exc:  # any pyarrow failure on a damaged file: record it and keep the tar's samples
        errors.append(f"{parquet.name}: unreadable: {type(exc).__name__}: {exc}")
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


# ---------------------------------------------------------------------------------------------- captions.jsonl


def read_captions_shard(shard: InputShard) -> ShardContents:
    """Lines [start, stop) of a captions.jsonl, each with its image file read from the folder."""
    errors: list[str] = []
    samples = []
    root = Path(shard.images or Path(shard.path).parent).resolve()
    with open(shard.path, "rb") as handle:
        handle.seek(shard.byte_offset)
        for number, line in enumerate(handle, start=shard.start):
            if shard.stop is not None and number >= shard.stop:
                break
            samples.append(_caption_line_sample(number, line, root))
    return ShardContents(samples, errors)


def _caption_line_sample(number: int, line: bytes, root: Path) -> InputSample:
    try:
        entry = json.loads(line)
        if not isinstance(entry, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        return InputSample(str(number), None, image_error=DropReason.IMAGE_MISSING,
                           error_message=f"line {number + 1}: {exc}")
    caption = entry.get("caption")
    sample = InputSample(
        source_key=str(entry.get("key", number)),
        caption=caption if isinstance(caption, str) else None,
        url=entry.get("url") if isinstance(entry.get("url"), str) else None,
        fields={k: v for k, v in entry.items() if k not in ("key", "caption", "url", "image")},
        member=entry.get("image") if isinstance(entry.get("image"), str) else None,
        frame=SourceFrame(size_of(entry.get("width"), entry.get("height"))),
    )
    sample.image, sample.image_error, sample.error_message = _read_image_file(root, entry.get("image"))
    return sample


def _read_image_file(root: Path, relative: Any) -> tuple[bytes | None, DropReason | None, str | None]:
    """The bytes of `root/relative`, refusing paths that leave `root`."""
    if not isinstance(relative, str) or not is_safe_member_name(relative):
        return None, DropReason.IMAGE_MISSING, f"image path {relative!r} is missing or unsafe"
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        return None, DropReason.IMAGE_MISSING, f"image path {relative!r} leaves the input folder"
    try:
        if path.stat().st_size > MAX_MEMBER_BYTES:
            return None, DropReason.IMAGE_TOO_LARGE, f"{relative}: file too large"
        return path.read_bytes(), None, None
    except OSError as exc:
        return None, DropReason.IMAGE_MISSING, f"{relative}: {exc.strerror or exc}"


# ---------------------------------------------------------------------------------------------- GRIT-20M parquet


@functools.lru_cache(maxsize=4)
def image_index(folder: str) -> dict[str, tuple[str, str]]:
    """Where each image of an img2dataset folder is: "id:ID" and "url:URL" -> (tar path, member key).

    Built from the folder's per-shard parquet files when present (cheap), else from the tars' .json members;
    cached per process, since every shard of a parquet input needs it.
    """
    index: dict[str, tuple[str, str]] = {}
    for tar in _tar_files(Path(folder)):
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
        yield group.key, _json_member(group.members.get("json"))[0]


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
    images = {(tar, group.key): (_image_of(group.members)[0], download_info(_json_member(group.members.get("json"))[0]))
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
