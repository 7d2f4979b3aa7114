"""The one tar reader: members grouped by key as webdataset groups them, read defensively (untrusted names,
sizes and archives), for the img2dataset input and the audit alike."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from grit_pipeline.inputs.base import IMAGE_EXTENSIONS, MAX_MEMBER_BYTES
from grit_pipeline.records import DropReason


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
class TarGroup:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def iter_tar_groups(path: str, errors: list[str], wanted: frozenset[str] | None = None) -> Iterator[TarGroup]:
    """Consecutive members sharing a key, as webdataset groups them; read errors go to `errors`, never raise.

    A truncated or corrupt tar yields what was readable before the damage. Only regular files are read.
    """
    group: TarGroup | None = None
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
                    group = TarGroup(key)
                _add_member(tar, member, ext, group)
    except (tarfile.TarError, EOFError, OSError, zlib_error()) as exc:
        errors.append(f"{Path(path).name}: unreadable after {count} members: {type(exc).__name__}: {exc}")
    if group is not None:
        yield group


def zlib_error() -> type[Exception]:
    """zlib.error (a compressed tar with a bad stream), importable without naming zlib everywhere."""
    import zlib

    return zlib.error


def _add_member(tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, group: TarGroup) -> None:
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


def image_of(members: dict[str, bytes]) -> tuple[bytes | None, DropReason | None]:
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            return members[ext], None
    return None, DropReason.IMAGE_MISSING


def json_member(data: bytes | None) -> tuple[dict[str, Any], str | None]:
    if data is None:
        return {}, None
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        return {}, f"bad .json member: {exc}"
    return (meta, None) if isinstance(meta, dict) else ({}, "the .json member is not an object")
