"""Inputs of `grit build`: img2dataset WebDataset folders, image folders with captions.jsonl, GRIT-20M parquet.

Every input becomes an ordered list of `InputShard`s; the global position of a shard in the list of all
inputs is the number of the output shard it becomes. Reading a shard yields `InputSample`s: a caption, the
image bytes (or why there are none), the url and the source metadata. A sample that cannot be read is
still a sample, with a drop reason, so that the output parquet lists every input sample.

Input files are untrusted: tar member names and image paths are only ever read, never used to name an
output file, and a member name that is absolute or climbs out with `..` makes its sample malformed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
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
from grit_pipeline.inputs.img2dataset import tar_files

__all__ = ["CAPTIONS_FILE", "IMAGE_EXTENSIONS", "MAX_MEMBER_BYTES", "InputError", "InputKind", "InputSample",
           "InputShard", "ShardContents", "discover_shards", "fingerprint_inputs"]


def discover_shards(inputs: Sequence[str], samples_per_shard: int = 10_000,
                    images_dir: str | None = None) -> list[InputShard]:
    """All input shards of `inputs`, in argument order then file order (deterministic)."""
    shards: list[InputShard] = []
    for raw in inputs:
        path = Path(raw).resolve()
        if path.is_file() and path.suffix == ".parquet":
            shards.extend(grit_parquet_shards(path, samples_per_shard, images_dir))
        elif path.is_dir() and (path / CAPTIONS_FILE).is_file():
            shards.extend(captions_shards(path / CAPTIONS_FILE, samples_per_shard))
        elif path.is_dir() and tar_files(path):
            shards.extend(InputShard(InputKind.IMG2DATASET, str(tar), tar.name) for tar in tar_files(path))
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
