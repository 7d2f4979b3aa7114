"""`grit audit`: check a build's shards against its manifest and every sample against the GRIT invariants.

Shard checks: each manifest shard exists with its sha256, byte size and sample count, no shard is extra,
no shard is recorded as failed, sizes.json agrees. Sample checks: member names, the KEY.jpg/.json/.txt
triple, key format and uniqueness across shards, the GRIT-20M schema of the .json, spans inside the
caption, boxes in [0, 1] with area, the .txt equal to the serialisation of the .json and parsed back by
transformers' Kosmos-2 parser to the same spans and boxes, and the image decoding (at the recorded size
when the build stored the original pixels).
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import math
import tarfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


class Check(str, enum.Enum):
    """The name of a failed check; values are stable and appear in `--json` output."""

    # the build as a whole
    MANIFEST = "manifest"
    SIZES_JSON = "sizes_json"
    # shards
    SHARD_MISSING = "shard_missing"
    SHARD_EXTRA = "shard_extra"
    SHARD_FAILED = "shard_failed"
    SHARD_INCOMPLETE = "shard_incomplete"
    SHARD_SHA256 = "shard_sha256"
    SHARD_BYTES = "shard_bytes"
    SHARD_COUNT = "shard_count"
    SHARD_UNREADABLE = "shard_unreadable"
    # samples
    MEMBER_NAME = "member_name"
    SAMPLE_FILES = "sample_files"
    KEY_FORMAT = "key_format"
    KEY_UNIQUE = "key_unique"
    KEY_MISMATCH = "key_mismatch"
    SCHEMA = "schema"
    SPAN_IN_CAPTION = "span_in_caption"
    BOX_VALID = "box_valid"
    TEXT_MATCHES_JSON = "text_matches_json"
    TEXT_PARSES = "text_parses"
    IMAGE_DECODES = "image_decodes"
    IMAGE_SIZE = "image_size"


@dataclass(frozen=True, slots=True)
class Finding:
    """One failed check: which check, where (shard file name, sample key) and a readable message."""

    check: Check
    message: str
    shard: str | None = None
    key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"check": self.check.value, "shard": self.shard, "key": self.key, "message": self.message}

    def format(self) -> str:
        """One line for the text report."""
        where = " ".join(part for part in (self.shard, self.key) if part)
        return f"{self.check.value:<18} {where:<24} {self.message}"


@dataclass(frozen=True, slots=True)
class ShardExpectation:
    """What the manifest says about one output shard."""

    name: str
    sha256: str | None
    bytes: int | None
    samples: int | None
    failed: str | None = None


@dataclass(frozen=True, slots=True)
class AuditOptions:
    """What the audit needs to know about the build: serialisation, image policy, how deep to check."""

    serialize: SerializeConfig = field(default_factory=SerializeConfig)
    check_image_size: bool = False
    decode_images: bool = True


@dataclass(slots=True)
class AuditReport:
    """The audit's result; `ok` is True when no check failed."""

    out_dir: str
    shards_checked: int = 0
    samples_checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there is no finding."""
        return not self.findings

    def counts(self) -> Counter[str]:
        """Number of findings per check name."""
        return Counter(f.check.value for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: summary, counts per check and every finding."""
        return {
            "out": self.out_dir,
            "ok": self.ok,
            "shards_checked": self.shards_checked,
            "samples_checked": self.samples_checked,
            "finding_counts": dict(sorted(self.counts().items())),
            "findings": [f.to_dict() for f in self.findings],
        }

    def format_text(self, limit: int = 200) -> str:
        """The human report: a verdict line, each finding (up to `limit`) and the counts per check."""
        verdict = "OK" if self.ok else f"FAILED: {len(self.findings)} finding(s)"
        lines = [
            f"grit audit {self.out_dir}: {self.shards_checked} shard(s), {self.samples_checked} sample(s): {verdict}"
        ]
        lines += ["  " + f.format() for f in self.findings[:limit]]
        if len(self.findings) > limit:
            lines.append(f"  ... and {len(self.findings) - limit} more (use --json for all)")
        if self.findings:
            lines.append(
                "findings per check: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counts().items()))
            )
        return "\n".join(lines)


def audit_build(out_dir: str | Path, *, decode_images: bool = True) -> AuditReport:
    """Audit a `grit build` output folder; never raises on bad data, every problem becomes a Finding."""
    out = Path(out_dir)
    report = AuditReport(out_dir=str(out))
    try:
        manifest = _read_manifest(out)
    except (OSError, ValueError) as exc:
        report.findings.append(Finding(Check.MANIFEST, str(exc)))
        return report
    expectations = shard_expectations(manifest)
    options = audit_options(manifest, decode_images=decode_images)
    report.findings += _check_shard_set(out / "shards", expectations)
    report.findings += _check_sizes_json(out, expectations)
    seen_keys: dict[str, str] = {}
    for expectation in expectations.values():
        path = out / "shards" / expectation.name
        if expectation.failed is not None or not path.is_file():
            continue
        report.shards_checked += 1
        samples, findings = audit_shard(path, expectation, options, seen_keys)
        report.samples_checked += samples
        report.findings += findings
    return report


def _read_manifest(out: Path) -> dict[str, Any]:
    """The manifest as a dict (ManifestError, a ValueError, when it is missing or unusable)."""
    from grit_pipeline.manifests.manifest import load_manifest

    return load_manifest(out / "manifest.json")


def shard_expectations(manifest: Mapping[str, Any]) -> dict[str, ShardExpectation]:
    """Tar file name -> what the manifest records for it."""
    result: dict[str, ShardExpectation] = {}
    for entry in manifest.get("shards", []):
        name = str(entry.get("tar") or entry.get("name"))
        if not name.endswith(".tar"):
            name += ".tar"
        counts = entry.get("counts") or {}
        samples = entry.get("samples", counts.get("kept"))
        result[name] = ShardExpectation(
            name=name,
            sha256=entry.get("sha256"),
            bytes=entry.get("bytes"),
            samples=None if samples is None else int(samples),
            failed=entry.get("error") if entry.get("status", "complete") == "failed" else None,
        )
    return result


def audit_options(manifest: Mapping[str, Any], *, decode_images: bool = True) -> AuditOptions:
    """The serialisation config and image policy the build ran with, read from its manifest."""
    config = manifest.get("config") or {}
    serialize = SerializeConfig.from_dict(config["serialize"]) if "serialize" in config else SerializeConfig()
    image_policy = config.get("image") or {}
    stored_original = image_policy.get("store") in ("original", "original_pixels")
    return AuditOptions(serialize=serialize, check_image_size=stored_original, decode_images=decode_images)


def _check_shard_set(shards_dir: Path, expectations: Mapping[str, ShardExpectation]) -> list[Finding]:
    """Missing, extra, failed and incomplete shards."""
    findings = []
    present = {p.name for p in shards_dir.glob("*.tar")} if shards_dir.is_dir() else set()
    for name, expectation in expectations.items():
        if expectation.failed is not None:
            findings.append(
                Finding(
                    Check.SHARD_FAILED, f"the build recorded this shard as failed: {expectation.failed}", name
                )
            )
        elif name not in present:
            findings.append(Finding(Check.SHARD_MISSING, "listed in the manifest but not in shards/", name))
        elif not (shards_dir / name.replace(".tar", "_stats.json")).is_file():
            findings.append(
                Finding(Check.SHARD_INCOMPLETE, "no _stats.json completion marker next to it", name)
            )
    for name in sorted(present - set(expectations)):
        findings.append(Finding(Check.SHARD_EXTRA, "in shards/ but not listed in the manifest", name))
    return findings


def _check_sizes_json(out: Path, expectations: Mapping[str, ShardExpectation]) -> list[Finding]:
    """sizes.json (open_clip's convention) must give every complete shard its manifest sample count."""
    try:
        sizes = json.loads((out / "sizes.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [Finding(Check.SIZES_JSON, f"cannot read sizes.json: {exc}")]
    findings = []
    for name, expectation in expectations.items():
        if expectation.failed is None and sizes.get(name) != expectation.samples:
            findings.append(
                Finding(
                    Check.SIZES_JSON,
                    f"sizes.json says {sizes.get(name)}, manifest says {expectation.samples}",
                    name,
                )
            )
    return findings


def audit_shard(
    path: Path, expectation: ShardExpectation, options: AuditOptions, seen_keys: dict[str, str]
) -> tuple[int, list[Finding]]:
    """Check one tar against its manifest entry and every sample in it; returns (samples, findings)."""
    name = path.name
    findings = _check_shard_file(path, expectation)
    samples = 0
    try:
        for key, files, member_findings in iter_tar_samples(path):
            findings += member_findings
            samples += 1
            findings += _check_key(name, key, seen_keys)
            findings += audit_sample(name, key, files, options)
    except (tarfile.TarError, OSError, EOFError) as exc:
        findings.append(Finding(Check.SHARD_UNREADABLE, f"tar cannot be read to the end: {exc}", name))
    if expectation.samples is not None and samples != expectation.samples:
        findings.append(
            Finding(
                Check.SHARD_COUNT, f"{samples} samples in the tar, manifest says {expectation.samples}", name
            )
        )
    return samples, findings


def _check_shard_file(path: Path, expectation: ShardExpectation) -> list[Finding]:
    """Byte size and sha256 against the manifest."""
    findings = []
    size = path.stat().st_size
    if expectation.bytes is not None and size != expectation.bytes:
        findings.append(
            Finding(Check.SHARD_BYTES, f"{size} bytes, manifest says {expectation.bytes}", path.name)
        )
    if expectation.sha256 is not None:
        digest = file_sha256(path)
        if digest != expectation.sha256:
            findings.append(
                Finding(
                    Check.SHARD_SHA256,
                    f"sha256 {digest[:16]}... differs from manifest {expectation.sha256[:16]}...",
                    path.name,
                )
            )
    return findings


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def iter_tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes], list[Finding]]]:
    """(key, {extension: bytes}, member-name findings) per sample of a shard, grouping consecutive members by key."""
    key: str | None = None
    files: dict[str, bytes] = {}
    problems: list[Finding] = []
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            problem = _member_problem(member)
            if problem is not None:
                problems.append(Finding(Check.MEMBER_NAME, problem, path.name))
                continue
            # webdataset splits a member name at its first dot: "KEY.ext"
            member_key, _, extension = member.name.partition(".")
            if member_key != key and key is not None:
                yield key, files, problems
                files, problems = {}, []
            key = member_key
            handle = tar.extractfile(member)
            files[extension] = handle.read() if handle is not None else b""
    if key is not None:
        yield key, files, problems


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why a tar member is not a plain `KEY.ext` file at the top level, or None."""
    if not member.isfile():
        return f"member {member.name!r} is not a regular file"
    if "/" in member.name or "\\" in member.name or member.name.startswith("."):
        return f"member name {member.name!r} is not a plain top-level file name"
    return None


def _check_key(shard: str, key: str, seen_keys: dict[str, str]) -> list[Finding]:
    """Keys are digits only (so no dot) and unique across the whole output."""
    findings = []
    if not key.isdigit():
        findings.append(Finding(Check.KEY_FORMAT, "key is not zero-padded digits", shard, key))
    if key in seen_keys:
        findings.append(Finding(Check.KEY_UNIQUE, f"key already used in {seen_keys[key]}", shard, key))
    else:
        seen_keys[key] = shard
    return findings


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
    recorded = (row.get("width"), row.get("height"))
    if options.check_image_size and None not in recorded and tuple(size) != recorded:
        return [
            Finding(
                Check.IMAGE_SIZE,
                f"image is {size[0]}x{size[1]}, .json says {recorded[0]}x{recorded[1]}",
                shard,
                key,
            )
        ]
    return []
