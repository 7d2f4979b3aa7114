"""The one tar reader: members grouped by key as webdataset groups them, read defensively (untrusted names,
sizes and archives), for the img2dataset input and the audit alike."""

from __future__ import annotations

import json
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

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


def iter_tar_groups(
    path: str | Path | IO[bytes],
    errors: list[str],
    wanted: frozenset[str] | None = None,
    *,
    skipped: list[str] | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> Iterator[TarGroup]:
    """Consecutive members sharing a key, as webdataset groups them; read errors go to `errors`, never raise.

    A truncated or corrupt tar yields what was readable before the damage (a group whose first member broke
    off is not yielded). Only regular files are read: folder entries are passed over; a member that is not a
    regular file, a file over `max_member_bytes` and a second member with the same extension are not read,
    each a problem of its group (an input sample carries them in its error message).

    With `skipped` (the audit of a build's own shards, which hold nothing but plain `KEY.ext` files): every
    member that is not a regular file with a plain top-level name (no folder, backslash or leading dot), and
    every file over `max_member_bytes`, is skipped before grouping (it neither starts nor ends a group) and
    its problem is appended to `skipped`.
    """
    group: TarGroup | None = None
    count = 0
    opened = {"fileobj": path} if hasattr(path, "read") else {"name": path}
    try:
        with tarfile.open(mode="r|*", **opened) as tar:
            for member in tar:
                count += 1
                if skipped is not None:
                    problem = member_problem(member, max_member_bytes, plain_name=True)
                    if problem is not None:
                        skipped.append(problem)
                        continue
                elif member.isdir():
                    continue
                key, ext = split_member_name(member.name)
                if group is not None and key != group.key:
                    yield group
                    group = None
                if wanted is not None and key not in wanted:
                    continue
                if group is None:
                    group = TarGroup(key)
                _add_member(tar, member, ext, group, max_member_bytes)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        errors.append(f"{_base_name(path)}: unreadable after {count} members: {type(exc).__name__}: {exc}")
    if group is not None and (group.members or group.problems):  # empty: its first member broke off
        yield group


def _base_name(path: str | Path | IO[bytes]) -> str:
    name = str(getattr(path, "path", None) or getattr(path, "name", None) or path)
    return name.rstrip("/").rsplit("/", 1)[-1]


def member_problem(member: tarfile.TarInfo, max_member_bytes: int, plain_name: bool = False) -> str | None:
    """Why a member is not read (not a regular file, too large; with `plain_name`, not a top-level `KEY.ext`)."""
    if not member.isfile():
        return f"non-regular member {member.name!r} ignored"
    if plain_name and ("/" in member.name or "\\" in member.name or member.name.startswith(".")):
        return f"member name {member.name!r} is not a plain top-level file name"
    if member.size > max_member_bytes:
        return f"member {member.name!r} of {member.size} bytes is too large, not read"
    return None


def _add_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, group: TarGroup, max_member_bytes: int
) -> None:
    problem = member_problem(member, max_member_bytes)
    if problem is None and ext in group.members:
        problem = f"duplicate member {member.name!r} ignored"
    if problem is not None:
        group.problems.append(problem)
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
