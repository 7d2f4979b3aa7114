"""The audit's vocabulary: check names, findings and the report they make up."""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


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
    SHARD_METADATA = "shard_metadata"
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
