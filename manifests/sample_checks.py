"""Per-sample checks of `grit audit`: tar members, the KEY.jpg/.json/.txt triple, the GRIT-20M schema,
spans and boxes, the .txt against the serialised .json (through transformers' Kosmos-2 parser), the image.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from grit_pipeline.inputs.base import MAX_MEMBER_BYTES
from grit_pipeline.inputs.tar import iter_tar_groups
from grit_pipeline.manifests.findings import Check, Finding
from grit_pipeline.records import GritRecord, MalformedRecordError
from grit_pipeline.stages.serialize import (
    SerializeConfig,
    Serialized,
    parse_grounded_text,
    sanitize_caption,
    serialize_record,
)

SAMPLE_EXTENSIONS = ("jpg", "json", "txt")
_ENTRY_FIELDS = ("noun_chunks", "ref_exps")
_BOX_TOLERANCE = 1e-9


@dataclass(frozen=True, slots=True)
class AuditOptions:
    """What the audit needs to know about the build: serialisation, image policy, how deep to check."""

    serialize: SerializeConfig = field(default_factory=SerializeConfig)
    check_image_size: bool = True
    decode_images: bool = True


def iter_tar_samples(path: Path | IO[bytes], findings: list[Finding] | None = None,
                     name: str | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a shard, read by the pipeline's one tar reader in its strict mode.

    A member that is not a plain top-level `KEY.ext` regular file, or is too large, is skipped; it, a
    duplicate member (MEMBER_NAME) and a tar that breaks off (SHARD_UNREADABLE) are Findings appended to
    `findings`, in reading order. Never raises on a bad tar.
    """
    report = findings if findings is not None else []
    shard = name or Path(str(getattr(path, "name", path))).name
    errors: list[str] = []
    skipped: list[str] = []
    # MAX_MEMBER_BYTES is read here, at call time: a test lowers this module's limit
    for group in iter_tar_groups(path, errors, skipped=skipped, max_member_bytes=MAX_MEMBER_BYTES):
        report.extend(Finding(Check.MEMBER_NAME, problem, shard) for problem in skipped)
        skipped.clear()
        report.extend(Finding(Check.MEMBER_NAME, problem, shard, group.key) for problem in group.problems)
        yield group.key, group.members
    report.extend(Finding(Check.MEMBER_NAME, problem, shard) for problem in skipped)
    report.extend(Finding(Check.SHARD_UNREADABLE, f"tar cannot be read to the end: {e}", shard) for e in errors)


def audit_sample(shard: str, key: str, files: Mapping[str, bytes], options: AuditOptions) -> list[Finding]:
    """Every per-sample check on one sample's files."""
    missing = [ext for ext in SAMPLE_EXTENSIONS if ext not in files]
    extra = sorted(set(files) - set(SAMPLE_EXTENSIONS))
    findings = []
    if missing or extra:
        findings.append(
            Finding(
                Check.SAMPLE_FILES,
                f"missing {missing or 'nothing'}, unexpected {extra or 'nothing'}",
                shard,
                key,
            )
        )
    row = _json_row(files.get("json"))
    if isinstance(row, str):
        return [*findings, Finding(Check.SCHEMA, row, shard, key)]
    if row is None:
        return findings
    nulls = sorted(_null_fields(row))
    if nulls:
        findings.append(Finding(Check.SCHEMA, f".json has null in {', '.join(nulls)} (readers that infer a "
                                              "schema from the first samples break on it)", shard, key))
    if str(row.get("key")) != key:
        findings.append(
            Finding(
                Check.KEY_MISMATCH, f".json key {row.get('key')!r} differs from the member key", shard, key
            )
        )
    invariant_findings = _check_entries(shard, key, row)
    findings += invariant_findings
    record = _parse_record(row)
    if isinstance(record, str):
        # a span past the caption also fails GritRecord.validate; the span check already said so
        if not (invariant_findings and "outside the caption" in record):
            findings.append(Finding(Check.SCHEMA, record, shard, key))
    elif "txt" in files:
        findings += _check_text(shard, key, record, files["txt"], options)
    if "jpg" in files and options.decode_images:
        findings += _check_image(shard, key, files["jpg"], row, options)
    return findings


def _null_fields(value: Any, path: str = "") -> list[str]:
    """Dotted paths of the null values inside a parsed .json."""
    if value is None:
        return [path or "."]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _null_fields(v, f"{path}.{k}" if path else str(k))]
    return []


def _json_row(data: bytes | None) -> dict[str, Any] | str | None:
    """The parsed .json (None when absent), or a message saying why it cannot be parsed."""
    if data is None:
        return None
    try:
        row = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return f".json is not valid JSON: {exc}"
    return row if isinstance(row, dict) else ".json is not a JSON object"


def _parse_record(row: Mapping[str, Any]) -> GritRecord | str:
    """The validated record, or the schema error message."""
    try:
        return GritRecord.from_row(row)
    except MalformedRecordError as exc:
        return f"not a valid GRIT-20M record: {exc}"


def _check_entries(shard: str, key: str, row: Mapping[str, Any]) -> list[Finding]:
    """Spans inside the caption and boxes in [0, 1] with x1 < x2, y1 < y2, for every entry."""
    caption = row.get("caption")
    if not isinstance(caption, str):
        return []
    findings = []
    for name in _ENTRY_FIELDS:
        entries = row.get(name) or []
        if not isinstance(entries, list):
            continue
        for index, entry in enumerate(entries):
            if (
                not isinstance(entry, list)
                or len(entry) != 7
                or not all(isinstance(v, (int, float)) for v in entry)
            ):
                continue  # the schema check reports the shape of the entry
            where = f"{name}[{index}]"
            start, end = entry[0], entry[1]
            if not (0 <= start < end <= len(caption)):
                findings.append(
                    Finding(
                        Check.SPAN_IN_CAPTION,
                        f"{where} span [{start:g}, {end:g}) is not inside the caption "
                        f"of {len(caption)} characters",
                        shard,
                        key,
                    )
                )
            x1, y1, x2, y2 = entry[2:6]
            finite = all(math.isfinite(v) for v in (x1, y1, x2, y2))
            if not (finite and 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
                findings.append(
                    Finding(
                        Check.BOX_VALID,
                        f"{where} box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is not in [0, 1] "
                        "with x1 < x2 and y1 < y2",
                        shard,
                        key,
                    )
                )
    return findings


def _check_text(shard: str, key: str, record: GritRecord, txt: bytes, options: AuditOptions) -> list[Finding]:
    """The .txt equals the serialisation of the .json and parses back to the same spans and boxes."""
    try:
        text = txt.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [Finding(Check.TEXT_PARSES, f".txt is not UTF-8: {exc}", shard, key)]
    expected = serialize_record(record, options.serialize)
    if expected.text is None:
        reason = expected.drop_reason.value if expected.drop_reason else "unknown"
        return [
            Finding(
                Check.TEXT_MATCHES_JSON,
                f"the .json serialises to nothing ({reason}); it should have been dropped",
                shard,
                key,
            )
        ]
    findings = []
    if text != expected.text:
        at = next(
            (i for i, (a, b) in enumerate(zip(text, expected.text, strict=False)) if a != b),
            min(len(text), len(expected.text)),
        )
        findings.append(
            Finding(
                Check.TEXT_MATCHES_JSON,
                f".txt differs from the serialised .json at character {at}: "
                f"{text[at : at + 40]!r} vs {expected.text[at : at + 40]!r}",
                shard,
                key,
            )
        )
    findings += _check_round_trip(
        shard, key, text, sanitize_caption(record.caption), expected, options.serialize
    )
    return findings


def _check_round_trip(
    shard: str, key: str, text: str, caption: str, expected: Serialized, config: SerializeConfig
) -> list[Finding]:
    """Parse the .txt (transformers' parser for the hf spelling) and compare with the expected entities."""
    try:
        clean, parsed = parse_grounded_text(text, config.format, config.grid)
    except Exception as exc:  # the parser is third-party code fed untrusted text: any failure is a finding
        return [
            Finding(Check.TEXT_PARSES, f"Kosmos-2 parser failed: {type(exc).__name__}: {exc}", shard, key)
        ]
    lead = len(caption) - len(caption.lstrip())
    want = [
        ((e.span.start - lead, e.span.end - lead), [b.decode(config.grid) for b in e.boxes])
        for e in expected.entities
    ]
    got = [((p.span.start, p.span.end), list(p.boxes)) for p in parsed]
    findings = []
    if clean != caption.strip():
        findings.append(
            Finding(
                Check.TEXT_PARSES,
                f"parsed text {clean[:60]!r} is not the caption {caption.strip()[:60]!r}",
                shard,
                key,
            )
        )
    if not _same_entities(got, want):
        findings.append(
            Finding(
                Check.TEXT_PARSES,
                f"parsed entities {_describe(got)} differ from the .json's {_describe(want)}",
                shard,
                key,
            )
        )
    return findings


def _same_entities(
    got: list[tuple[tuple[int, int], list[Any]]], want: list[tuple[tuple[int, int], list[Any]]]
) -> bool:
    """Same spans in the same order, each with the same boxes (to float tolerance)."""
    if [span for span, _ in got] != [span for span, _ in want]:
        return False
    for (_, got_boxes), (_, want_boxes) in zip(got, want, strict=True):
        if len(got_boxes) != len(want_boxes):
            return False
        for a, b in zip(got_boxes, want_boxes, strict=True):
            if any(abs(u - v) > _BOX_TOLERANCE for u, v in zip(a.as_tuple(), b.as_tuple(), strict=True)):
                return False
    return True


def _describe(entities: list[tuple[tuple[int, int], list[Any]]]) -> str:
    """Short form of entities for a message: [start,end)xN boxes."""
    return "[" + ", ".join(f"[{s},{e})x{len(boxes)}" for (s, e), boxes in entities) + "]"


def _check_image(
    shard: str, key: str, data: bytes, row: Mapping[str, Any], options: AuditOptions
) -> list[Finding]:
    """The .jpg decodes fully; when the build stored original pixels its size is the recorded width/height."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            size = image.size
    except Exception as exc:  # Pillow raises many types on corrupt input; each one is a finding
        return [
            Finding(Check.IMAGE_DECODES, f".jpg does not decode: {type(exc).__name__}: {exc}", shard, key)
        ]
    recorded = (row.get("stored_width"), row.get("stored_height"))
    if options.check_image_size and None not in recorded and tuple(size) != recorded:
        return [
            Finding(
                Check.IMAGE_SIZE,
                f"image is {size[0]}x{size[1]}, .json says stored {recorded[0]}x{recorded[1]}",
                shard,
                key,
            )
        ]
    return []
