"""The output shard writer: OUT/shards/NNNNN.tar, NNNNN.parquet and, last, NNNNN_stats.json.

Everything written here is a pure function of the samples: tar members are in key order with a fixed
mtime, owner and mode, JSON is key-sorted, the parquet schema is fixed. A shard rewritten after a crash is
therefore byte-identical to one written in an uninterrupted run. Each file is written under a temporary
name and committed (renamed, or uploaded whole to an object store); the stats file is committed last and is
the shard's completion marker.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from grit_pipeline.io import atomic_path, file_sha256
from grit_pipeline.records import GRIT20M_SCHEMA, DropReason
from grit_pipeline.storage import Folder, as_folder

SHARDS_DIR = "shards"
SHARD_NAME_DIGITS = 5
# Fixed tar header fields: nothing about the machine or the moment of writing leaks into the shard.
_TAR_MTIME = 0
_TAR_MODE = 0o644

KEPT = "kept"
DROPPED = "dropped"
FAILED = "failed"

METADATA_SCHEMA = pa.schema(
    list(GRIT20M_SCHEMA)
    + [
        pa.field("stored_width", pa.int64()),
        pa.field("stored_height", pa.int64()),
        pa.field("source_key", pa.string()),
        pa.field("status", pa.string()),
        pa.field("drop_reason", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("n_spans", pa.int64()),
        pa.field("span_drops", pa.string()),
    ]
)


def shard_name(index: int) -> str:
    """The zero-padded name of output shard `index` ("00042")."""
    return f"{index:0{SHARD_NAME_DIGITS}d}"


def sample_key(shard_index: int, position: int, key_digits: int) -> str:
    """The output key of the sample at `position` of input shard number `shard_index`: digits only, unique in
    the output."""
    if position >= 10**key_digits:
        raise ValueError(f"shard {shard_index} has more than 10**{key_digits} samples; raise key_digits")
    return f"{shard_index * 10**key_digits + position:0{SHARD_NAME_DIGITS + key_digits}d}"


UNKNOWN_ID = -1
UNKNOWN_SIMILARITY = -1.0


def _known(value: Any, default: Any) -> Any:
    return default if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


@dataclass(slots=True)
class OutputSample:
    """One input sample's outcome: kept (image, grounded text, GRIT-20M row) or dropped with a reason."""

    key: str
    source_key: str
    row: dict[str, Any]
    status: str = KEPT
    drop_reason: DropReason | None = None
    error_message: str | None = None
    image: bytes | None = None
    text: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    n_spans: int = 0
    span_drops: Counter[DropReason] = field(default_factory=Counter)
    stored_width: int | None = None
    stored_height: int | None = None

    @property
    def kept(self) -> bool:
        """True when the sample goes into the tar."""
        return self.status == KEPT

    def json_member(self) -> dict[str, Any]:
        """KEY.json: the GRIT-20M fields, the stored size, the source key and provenance, in fixed JSON types.

        No value is ever null and every sample has the same keys: readers that infer a schema from the first
        samples they see (Hugging Face datasets) then read any build, whatever its first shard holds. What a
        source does not know is `id` -1, `url` "", a CLIP similarity -1.0 (the parquet keeps these as null).
        """
        row, source = self.row, self.provenance.get("source") or {}
        return {
            "key": self.key,
            "source_key": self.source_key,
            "id": _known(row.get("id"), UNKNOWN_ID),
            "url": row.get("url") or "",
            "caption": row.get("caption") or "",
            "width": _known(row.get("width"), self.stored_width),
            "height": _known(row.get("height"), self.stored_height),
            "stored_width": self.stored_width,
            "stored_height": self.stored_height,
            "noun_chunks": row.get("noun_chunks") or [],
            "ref_exps": row.get("ref_exps") or [],
            "clip_similarity_vitb32": float(_known(row.get("clip_similarity_vitb32"), UNKNOWN_SIMILARITY)),
            "clip_similarity_vitl14": float(_known(row.get("clip_similarity_vitl14"), UNKNOWN_SIMILARITY)),
            **{name: float(_known(row.get(name), UNKNOWN_SIMILARITY)) for name in extra_clip_columns(row)},
            "provenance": {
                "source": {name: str(source.get(name) or "") for name in ("input", "shard", "member")},
                "grounder": str(self.provenance.get("grounder") or ""),
            },
        }

    def metadata_row(self) -> dict[str, Any]:
        """The row of the shard's parquet (every sample, kept or not)."""
        return {
            **{name: self.row.get(name) for name in GRIT20M_SCHEMA.names},
            **{name: self.row.get(name) for name in extra_clip_columns(self.row)},
            "stored_width": self.stored_width,
            "stored_height": self.stored_height,
            "key": self.key,
            "source_key": self.source_key,
            "status": self.status,
            "drop_reason": self.drop_reason.value if self.drop_reason else None,
            "error_message": self.error_message,
            "n_spans": self.n_spans,
            "span_drops": canonical_json(_counter_dict(self.span_drops)) if self.span_drops else None,
        }


@dataclass(frozen=True, slots=True)
class ShardPaths:
    """The names of output shard `index`'s three files in the shards folder (OUT/shards)."""

    folder: Folder
    index: int

    @property
    def tar(self) -> str:
        """NNNNN.tar."""
        return f"{shard_name(self.index)}.tar"

    @property
    def parquet(self) -> str:
        """NNNNN.parquet."""
        return f"{shard_name(self.index)}.parquet"

    @property
    def stats(self) -> str:
        """NNNNN_stats.json, the completion marker."""
        return f"{shard_name(self.index)}_stats.json"

    def complete_stats(self, listing: dict[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """The stats of a complete shard, None when the shard is not complete.

        Complete: the stats file (written after the tar and the parquet) exists, and so does every file it
        lists, with the size it records, so a file replaced after the stats were written is noticed without
        reading it. `listing` is the shards folder's listing (`Folder.files`) when the caller has one: one
        LIST request for all shards instead of a request per file on an object store.

        A shard that kept no sample has no tar (an empty tar breaks Hugging Face datasets and hangs open_clip's
        loader); its stats say so with `files.tar` null.
        """
        listing = self.folder.files() if listing is None else listing
        if self.stats not in listing:
            return None
        stats = self.folder.read_json(self.stats)
        if not isinstance(stats, dict) or not isinstance(stats.get("files"), dict):
            return None
        for recorded in stats["files"].values():
            if recorded is None:
                continue
            info = listing.get(recorded.get("name"))
            if info is None or info.get("size") != recorded.get("bytes"):
                return None
        return stats

    def is_complete(self) -> bool:
        """True when the shard is complete (see `complete_stats`)."""
        return self.complete_stats() is not None


def canonical_json(obj: Any) -> str:
    """Compact, key-sorted JSON with non-finite floats as null: the same object always gives the same text."""
    return json.dumps(_finite(obj), sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _counter_dict(counter: Counter[Any]) -> dict[str, int]:
    return {getattr(k, "value", str(k)): v for k, v in sorted(counter.items(), key=lambda kv: str(kv[0]))}


def tar_member(name: str, data: bytes) -> tarfile.TarInfo:
    """A tar header with the fixed owner, mode and mtime of every output member."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _TAR_MTIME
    info.mode = _TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# Offsets of the USTAR header fields that differ between our members (the rest is the same for all).
_NAME_END = 100
_SIZE_FIELD = slice(124, 136)
_CHKSUM_FIELD = slice(148, 156)
_MAX_USTAR_SIZE = 8**11  # 11 octal digits
_ZEROS = memoryview(bytes(tarfile.RECORDSIZE + 2 * tarfile.BLOCKSIZE))  # the longest padding: the end of the archive
_WRITE_BATCH_BUFFERS = 768  # under IOV_MAX (1024): one writev per this many buffers
_WRITE_BATCH_BYTES = 8 << 20


@functools.cache
def _header_template() -> bytes:
    """tarfile's own USTAR header of an output member with an empty name and size 0 (fields fixed per member)."""
    return tar_member("", b"").tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte header tarfile writes for output member `name` of `size` bytes, built from a template.

    tarfile.TarInfo.tobuf costs ~20 us a member in Python; patching the name, size and checksum of a template
    gives the same bytes (tested against tobuf) at a fraction of that. Names tarfile would split into a
    prefix, non-ASCII names and sizes beyond 11 octal digits go through tobuf itself.
    """
    raw = name.encode("ascii") if name.isascii() else None
    if raw is None or not 0 < len(raw) <= _NAME_END or not 0 <= size < _MAX_USTAR_SIZE:
        info = tar_member(name, b"")
        info.size = size
        return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    header = bytearray(_header_template())
    header[: len(raw)] = raw
    header[_SIZE_FIELD] = b"%011o\0" % size
    header[_CHKSUM_FIELD] = b"        "  # the checksum is summed with its own field as spaces (POSIX)
    header[_CHKSUM_FIELD] = b"%06o\0 " % sum(header)
    return bytes(header)


class _HashingWriter:
    """Writes buffers to a file descriptor in large writev batches, hashing them on the way (no re-read)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._pending: list[bytes | memoryview] = []
        self._pending_bytes = 0

    def add(self, data: bytes | memoryview) -> None:
        """Queue `data` (not copied) for the next batch."""
        self._pending.append(data)
        self._pending_bytes += len(data)
        if len(self._pending) >= _WRITE_BATCH_BUFFERS or self._pending_bytes >= _WRITE_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Hash and write everything queued."""
        buffers, self._pending, total, self._pending_bytes = self._pending, [], self._pending_bytes, 0
        for data in buffers:
            self.sha256.update(data)
        written = os.writev(self.fd, buffers) if buffers else 0
        if written < total:  # a short write (rare on regular files): finish it buffer by buffer
            _write_rest(self.fd, buffers, written)
        self.size += total

    @property
    def offset(self) -> int:
        """Bytes added so far (written or queued)."""
        return self.size + self._pending_bytes


def _write_rest(fd: int, buffers: Sequence[bytes | memoryview], skip: int) -> None:
    for data in buffers:
        view = memoryview(data)[skip:] if skip else memoryview(data)
        skip = max(0, skip - len(data))
        while len(view):
            view = view[os.write(fd, view):]


def write_tar(path: str | os.PathLike[str], members: Sequence[tuple[str, bytes]]) -> tuple[str, int]:
    """Write `members` (already in order) as a deterministic tar at a local `path`, atomically; returns
    (sha256, bytes). See `write_tar_file`."""
    with atomic_path(path) as tmp:
        return write_tar_file(tmp, members)


def write_tar_file(path: str, members: Sequence[tuple[str, bytes]]) -> tuple[str, int]:
    """Write `members` (already in order) as a deterministic tar to `path`; returns (sha256, bytes).

    The bytes are exactly what tarfile.open(mode="w", format=USTAR_FORMAT) + addfile(tar_member(...)) writes
    (a header block per member, the data padded to 512 bytes, two zero blocks, zeros up to a 10240-byte
    record), but the image bytes are handed to the kernel as they are (writev, no copy through tarfile's
    buffers) and hashed on the way, so the finished file is never read back.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        out = _HashingWriter(fd)
        for name, data in members:
            out.add(tar_header(name, len(data)))
            if data:
                out.add(data)
                if len(data) % tarfile.BLOCKSIZE:
                    out.add(_ZEROS[: tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE])
        end = out.offset + 2 * tarfile.BLOCKSIZE
        out.add(_ZEROS[: 2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE])
        out.flush()
    finally:
        os.close(fd)
    return out.sha256.hexdigest(), out.size


def tar_members(samples: Sequence[OutputSample]) -> list[tuple[str, bytes]]:
    """KEY.jpg, KEY.json, KEY.txt of every kept sample, in key order (webdataset groups by key)."""
    members = []
    for sample in sorted((s for s in samples if s.kept), key=lambda s: s.key):
        if sample.image is None or sample.text is None:
            raise ValueError(f"kept sample {sample.key} lacks its image or text")
        members.append((f"{sample.key}.jpg", sample.image))
        members.append((f"{sample.key}.json", canonical_json(sample.json_member()).encode()))
        members.append((f"{sample.key}.txt", sample.text.encode()))
    return members


def extra_clip_columns(row: dict[str, Any]) -> list[str]:
    """The `clip_similarity_<model>` columns of a CLIP model other than ViT-B/32 and ViT-L/14 in `row`."""
    return sorted(k for k in row if k.startswith("clip_similarity_") and k not in GRIT20M_SCHEMA.names)


def write_metadata(path: str, samples: Sequence[OutputSample]) -> None:
    """The shard's parquet at `path`: one row per input sample, in key order (which is input order)."""
    import pyarrow.parquet as pq

    rows = [s.metadata_row() for s in sorted(samples, key=lambda s: s.key)]
    if rows:
        extra = sorted({name for row in rows for name in extra_clip_columns(row)})  # another CLIP model's
        schema = METADATA_SCHEMA
        for name in extra:
            schema = schema.append(pa.field(name, pa.float64()))
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="zstd")
    else:  # no row group at all: a 0-row group makes Hugging Face's parquet builder fail (batch size 0)
        pq.ParquetWriter(path, METADATA_SCHEMA, compression="zstd").close()


def shard_stats(index: int, samples: Sequence[OutputSample], source: dict[str, Any],
                read_errors: Sequence[str]) -> dict[str, Any]:
    """Counts, drop reasons, score distributions (grit_pipeline/distributions.py) and source of one shard
    (files are added by `write_shard`)."""
    from grit_pipeline.distributions import row_distributions

    reasons = Counter(s.drop_reason for s in samples if not s.kept and s.drop_reason is not None)
    span_drops: Counter[DropReason] = Counter()
    for sample in samples:
        span_drops.update(sample.span_drops)
    kept = sum(1 for s in samples if s.kept)
    return {
        "shard": shard_name(index),
        "source": source,
        "count": len(samples),
        "kept": kept,
        "dropped": len(samples) - kept,
        "drop_reasons": _counter_dict(reasons),
        "span_drop_reasons": _counter_dict(span_drops),
        "spans": sum(s.n_spans for s in samples if s.kept),
        "read_errors": list(read_errors),
        "distributions": row_distributions(s.row for s in samples if s.kept),
    }


def write_shard(folder: Folder | str | os.PathLike[str], index: int, samples: Sequence[OutputSample],
                source: dict[str, Any], read_errors: Sequence[str] = (),
                written_by: dict[str, Any] | None = None, started: float | None = None) -> dict[str, Any]:
    """Write output shard `index` into the shards folder: the tar, the parquet, then the stats file (the
    completion marker, naming who wrote the shard and, from `started` (time.time()), how long it took);
    returns the stats.

    Each file is committed whole (`Folder.staged`: a rename locally, a completed upload on an object store),
    and the stats file only after both, so a shard is complete exactly when its stats file exists and agrees
    with the files (`ShardPaths.complete_stats`).
    """
    folder = as_folder(folder)
    folder.makedirs()
    paths = ShardPaths(folder, index)
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        raise ValueError(f"shard {index}: duplicate output keys")
    members = tar_members(samples)
    tar_file = None
    if members:
        with folder.staged(paths.tar) as tmp:
            tar_sha, tar_bytes = write_tar_file(tmp, members)
        tar_file = {"name": paths.tar, "sha256": tar_sha, "bytes": tar_bytes}
    else:  # nothing kept: no tar at all (readers choke on an empty one)
        folder.remove(paths.tar)
    with folder.staged(paths.parquet) as tmp:
        write_metadata(tmp, samples)
        parquet_file = {"name": paths.parquet, "sha256": file_sha256(tmp), "bytes": os.path.getsize(tmp)}
    stats = shard_stats(index, samples, source, read_errors)
    stats["files"] = {"tar": tar_file, "parquet": parquet_file}
    if written_by is not None:
        stats["written_by"] = written_by
    if started is not None:
        stats["seconds"] = round(time.time() - started, 3)
    folder.write_bytes(paths.stats, (json.dumps(stats, indent=2, sort_keys=True) + "\n").encode())
    return stats


def read_stats(folder: Folder | str | os.PathLike[str], index: int,
               listing: dict[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The stats of a complete shard, None when it is not complete."""
    return ShardPaths(as_folder(folder), index).complete_stats(listing)


def writer_identity() -> dict[str, Any]:
    """Who writes a shard: the Ray node id (None outside Ray), host name and process id."""
    import socket

    node = None
    ray = sys.modules.get("ray")  # only a process Ray started (or a driver that imported it) has a node
    if ray is not None and ray.is_initialized():
        node = ray.get_runtime_context().get_node_id()
    return {"node": node, "host": socket.gethostname(), "pid": os.getpid()}
