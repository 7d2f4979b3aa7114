"""The types every input format shares: an input shard (the unit of input and of output numbering) and the
samples read from it, each with its caption, image bytes (or why there are none) and source metadata."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from grit_pipeline.records import DropReason
from grit_pipeline.stages.frames import DownloadInfo, SourceFrame

CAPTIONS_FILE = "captions.jsonl"
# A larger member is not read into memory: no real web image is this big.
MAX_MEMBER_BYTES = 256 * 1024 * 1024
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


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
    """A unit of input: one img2dataset tar, a range of captions.jsonl lines, or a range of parquet rows;
    `path` (and `images`) are local paths or URLs."""

    kind: InputKind
    path: str
    name: str
    start: int = 0
    stop: int | None = None
    images: str | None = None
    byte_offset: int = 0  # where line `start` begins, for captions.jsonl shards
    # fsspec options of the input's filesystem (never in describe(): they may hold credentials)
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def read(self) -> ShardContents:
        """Read every sample of the shard; read errors are collected, never raised."""
        from grit_pipeline.inputs import captions, grit_parquet, img2dataset

        reader = {InputKind.IMG2DATASET: img2dataset.read_img2dataset_shard,
                  InputKind.CAPTIONS: captions.read_captions_shard,
                  InputKind.GRIT_PARQUET: grit_parquet.read_grit_parquet_shard}[self.kind]
        return reader(self)

    def describe(self) -> dict[str, Any]:
        """The shard's source, for stats files and the manifest."""
        return {"kind": self.kind.value, "path": self.path, "name": self.name, "start": self.start, "stop": self.stop,
                "images": self.images}
