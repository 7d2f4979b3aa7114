"""Inputs of `grit build`: img2dataset WebDataset folders, image folders with captions.jsonl, GRIT-20M parquet.

Every input becomes an ordered list of `InputShard`s; the global position of a shard in the list of all
inputs is the number of the output shard it becomes. Reading a shard yields `InputSample`s: a caption, the
image bytes (or why there are none), the url and the source metadata. A sample that cannot be read is
still a sample, with a drop reason, so that the output parquet lists every input sample.

Input files are untrusted: tar member names and image paths are only ever read, never used to name an
output file, and a member name that is absolute or climbs out with `..` makes its sample malformed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from grit_pipeline.inputs.base import (
    CAPTIONS_FILE,
    IMAGE_EXTENSIONS,
    MAX_MEMBER_BYTES,
    InputError,
    InputKind,
    InputSample,
    InputShard,
    ShardContents,
)
from grit_pipeline.inputs.captions import captions_shards
from grit_pipeline.inputs.grit_parquet import grit_parquet_shards
from grit_pipeline.inputs.img2dataset import tar_names
from grit_pipeline.storage import Folder, parent_and_name

__all__ = ["CAPTIONS_FILE", "IMAGE_EXTENSIONS", "MAX_MEMBER_BYTES", "InputError", "InputKind", "InputSample",
           "InputShard", "ShardContents", "discover_shards", "fingerprint_inputs"]


def discover_shards(inputs: Sequence[str], samples_per_shard: int = 10_000, images_dir: str | None = None,
                    storage_options: dict[str, Any] | None = None) -> list[InputShard]:
    """All input shards of `inputs` (paths or URLs), in argument order then file order (deterministic).

    An img2dataset folder is listed, never opened: 10,000 tars are one directory listing (or ten LIST
    requests on an object store). A captions.jsonl is read once to find where each shard's lines begin; a
    GRIT-20M parquet's footer gives its row count.
    """
    options = dict(storage_options or {})
    shards: list[InputShard] = []
    for raw in inputs:
        folder = Folder(raw, options)
        if folder.url.endswith(".parquet") and folder.is_file(""):
            shards.extend(grit_parquet_shards(folder.url, samples_per_shard, images_dir, options))
            continue
        files = folder.files()
        if CAPTIONS_FILE in files:
            shards.extend(captions_shards(folder.url_of(CAPTIONS_FILE), samples_per_shard, options))
        elif tars := tar_names(files):
            shards.extend(InputShard(InputKind.IMG2DATASET, folder.url_of(name), name, storage_options=options)
                          for name in tars)
        else:
            raise InputError(
                f"{raw}: not an img2dataset folder (NNNNN.tar files), a folder with {CAPTIONS_FILE}, "
                f"or a GRIT-20M .parquet file"
            )
    return shards


def fingerprint_inputs(inputs: Sequence[str], storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per input: its file count, bytes, and a digest of every file's name, size and version (an object
    store's ETag, a local file's modification time), so a file changed under the same name is noticed
    without reading it."""
    prints = []
    for raw in inputs:
        folder = Folder(raw, storage_options)
        if folder.url.endswith(".parquet") and folder.is_file(""):
            parent, name = parent_and_name(folder.url, storage_options)
            files = {name: parent.files().get(name, {})}
        else:
            files = folder.files()
        digest = hashlib.sha256()
        for name, info in sorted(files.items()):
            digest.update(f"{name}\t{info.get('size')}\t{file_version(info)}\n".encode())
        prints.append({"input": folder.url, "files": len(files), "bytes": sum(int(i.get("size") or 0) for i in files.values()),
                       "digest": digest.hexdigest()})
    return prints


def file_version(info: dict[str, Any]) -> str:
    """What changes when a file is rewritten: its ETag (object stores), else its modification time."""
    for key in ("ETag", "etag", "md5Hash", "generation", "version_id", "mtime_ns", "mtime", "LastModified", "last_modified"):
        if info.get(key) not in (None, ""):
            return f"{key}={info[key]}"
    return ""
