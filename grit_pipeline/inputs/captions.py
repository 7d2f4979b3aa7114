"""Image folders with a captions.jsonl: one input shard per `samples_per_shard` lines, each line's image read
from the folder (paths that leave it are refused)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from grit_pipeline.inputs.base import (
    CAPTIONS_FILE,
    MAX_MEMBER_BYTES,
    InputKind,
    InputSample,
    InputShard,
    ShardContents,
)
from grit_pipeline.inputs.img2dataset import size_of
from grit_pipeline.inputs.tar import is_safe_member_name
from grit_pipeline.records import DropReason
from grit_pipeline.stages.frames import SourceFrame
from grit_pipeline.storage import Folder, open_location, parent_and_name


def captions_shards(jsonl: str, samples_per_shard: int, storage_options: dict[str, Any] | None = None
                    ) -> list[InputShard]:
    """A shard per `samples_per_shard` lines of the captions.jsonl at `jsonl` (a path or URL)."""
    offsets = [0]  # byte offset of every shard's first line, so a shard is read without the lines before it
    lines, position = 0, 0
    folder, _ = parent_and_name(jsonl, storage_options)
    with open_location(jsonl, storage_options) as handle:
        for line in handle:
            lines += 1
            position += len(line)
            if lines % samples_per_shard == 0:
                offsets.append(position)
    return [
        InputShard(InputKind.CAPTIONS, jsonl, f"{CAPTIONS_FILE}[{start}:{min(start + samples_per_shard, lines)}]",
                   start, min(start + samples_per_shard, lines), folder.url, offsets[number],
                   storage_options=dict(storage_options or {}))
        for number, start in enumerate(range(0, max(lines, 1), samples_per_shard))
    ]


def read_captions_shard(shard: InputShard) -> ShardContents:
    """Lines [start, stop) of a captions.jsonl, each with its image file read from the folder."""
    errors: list[str] = []
    samples = []
    root = Folder(shard.images, shard.storage_options) if shard.images else parent_and_name(shard.path)[0]
    with open_location(shard.path, shard.storage_options) as handle:
        handle.seek(shard.byte_offset)
        for number, line in enumerate(handle, start=shard.start):
            if shard.stop is not None and number >= shard.stop:
                break
            samples.append(_caption_line_sample(number, line, root))
    return ShardContents(samples, errors)


def _caption_line_sample(number: int, line: bytes, root: Folder) -> InputSample:
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


def _read_image_file(root: Folder, relative: Any) -> tuple[bytes | None, DropReason | None, str | None]:
    """The bytes of `relative` below `root`, refusing paths that leave it."""
    if not isinstance(relative, str) or not is_safe_member_name(relative):
        return None, DropReason.IMAGE_MISSING, f"image path {relative!r} is missing or unsafe"
    if root.local:  # a symlink must not lead out either
        path = Path(root.path(relative)).resolve()
        if not path.is_relative_to(root.root):
            return None, DropReason.IMAGE_MISSING, f"image path {relative!r} leaves the input folder"
    try:
        size = os.path.getsize(root.path(relative)) if root.local else root.fs.size(root.path(relative))
        if size > MAX_MEMBER_BYTES:
            return None, DropReason.IMAGE_TOO_LARGE, f"{relative}: file too large"
        return root.read_bytes(relative), None, None
    except OSError as exc:
        return None, DropReason.IMAGE_MISSING, f"{relative}: {exc.strerror or exc}"
