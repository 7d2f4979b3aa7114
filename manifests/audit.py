"""`grit audit`: check a build's shards against its manifest and every sample against the GRIT invariants.

Shard checks: each manifest shard exists with its sha256, byte size and sample count, no shard is extra,
no shard is recorded as failed, sizes.json agrees. Sample checks: member names, the KEY.jpg/.json/.txt
triple, key format and uniqueness across shards, the GRIT-20M schema of the .json, spans inside the
caption, boxes in [0, 1] with area, the .txt equal to the serialisation of the .json and parsed back by
transformers' Kosmos-2 parser to the same spans and boxes, and the image decoding (at the recorded size
when the build stored the original pixels).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grit_pipeline.manifests.findings import AuditReport, Check, Finding
from grit_pipeline.manifests.manifest import SHARDS_DIR, ManifestError, load_manifest, load_sizes
from grit_pipeline.manifests.sample_checks import AuditOptions, audit_sample, iter_tar_samples
from grit_pipeline.stages.serialize import SerializeConfig
from grit_pipeline.storage import Folder, as_folder

__all__ = [
    "AuditOptions",
    "AuditReport",
    "Check",
    "Finding",
    "ShardExpectation",
    "audit_build",
    "audit_shard",
    "shard_expectations",
    "audit_options",
]


@dataclass(frozen=True, slots=True)
class ShardExpectation:
    """What the manifest says about one output shard."""

    name: str
    sha256: str | None
    bytes: int | None
    samples: int | None
    failed: str | None = None
    inputs: int | None = None
    parquet_sha256: str | None = None
    has_tar: bool = True


def audit_build(
    out_dir: str | Path | Folder, *, decode_images: bool = True, check_image_size: bool | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> AuditReport:
    """Audit a `grit build` output (a folder or an object-store URL); never raises on bad data, every problem
    becomes a Finding.

    `check_image_size`: compare each image's size with the .json's stored_width/stored_height (None: yes).
    """
    out = as_folder(out_dir, storage_options)
    report = AuditReport(out_dir=out.url)
    try:
        manifest = load_manifest(out)
    except ManifestError as exc:
        report.findings.append(Finding(Check.MANIFEST, str(exc)))
        return report
    expectations = shard_expectations(manifest)
    options = audit_options(manifest, decode_images=decode_images)
    if check_image_size is not None:
        options = dataclasses.replace(options, check_image_size=check_image_size)
    shards = out.child(SHARDS_DIR)
    listing = shards.files()
    report.findings += _check_shard_set(listing, expectations)
    report.findings += _check_sizes_json(out, expectations)
    seen_keys: dict[str, str] = {}
    for expectation in expectations.values():
        if expectation.failed is None and not expectation.has_tar:  # kept nothing: only its parquet to check
            report.findings += _check_metadata(shards, listing, expectation, [])
            continue
        if expectation.failed is not None or expectation.name not in listing:
            continue
        report.shards_checked += 1
        samples, findings = audit_shard(shards, listing, expectation, options, seen_keys)
        report.samples_checked += samples
        report.findings += findings
    return report


def shard_expectations(manifest: Mapping[str, Any]) -> dict[str, ShardExpectation]:
    """Tar file name -> what the manifest records for it."""
    result: dict[str, ShardExpectation] = {}
    for entry in manifest.get("shards", []):
        name = str(entry.get("tar") or entry.get("name"))
        if not name.endswith(".tar"):
            name += ".tar"
        complete = entry.get("status", "complete") != "failed"
        counts = entry.get("counts") or {}
        samples = entry.get("samples", counts.get("kept"))
        parquet = entry.get("parquet") or {}
        result[name] = ShardExpectation(
            name=name,
            sha256=entry.get("sha256"),
            bytes=entry.get("bytes"),
            samples=None if samples is None else int(samples),
            failed=entry.get("error") if entry.get("status", "complete") == "failed" else None,
            inputs=counts.get("input"),
            parquet_sha256=parquet.get("sha256") if isinstance(parquet, dict) else None,
            has_tar=not complete or entry.get("tar") is not None,
        )
    return result


def audit_options(manifest: Mapping[str, Any], *, decode_images: bool = True) -> AuditOptions:
    """The serialisation config and image policy the build ran with, read from its manifest."""
    config = manifest.get("config") or {}
    serialize = SerializeConfig.from_dict(config["serialize"]) if "serialize" in config else SerializeConfig()
    return AuditOptions(serialize=serialize, decode_images=decode_images)


def _check_shard_set(listing: Mapping[str, Any], expectations: Mapping[str, ShardExpectation]) -> list[Finding]:
    """Missing, extra, failed and incomplete shards (from one listing of OUT/shards)."""
    findings = []
    present = {name for name in listing if name.endswith(".tar")}
    for name, expectation in expectations.items():
        if expectation.failed is not None:
            findings.append(
                Finding(
                    Check.SHARD_FAILED, f"the build recorded this shard as failed: {expectation.failed}", name
                )
            )
        elif not expectation.has_tar:
            if name in present:
                findings.append(Finding(Check.SHARD_EXTRA, "the shard kept nothing, yet a tar is there", name))
            if name.replace(".tar", "_stats.json") not in listing:
                findings.append(Finding(Check.SHARD_INCOMPLETE, "no _stats.json completion marker", name))
        elif name not in present:
            findings.append(Finding(Check.SHARD_MISSING, "listed in the manifest but not in shards/", name))
        elif name.replace(".tar", "_stats.json") not in listing:
            findings.append(
                Finding(Check.SHARD_INCOMPLETE, "no _stats.json completion marker next to it", name)
            )
    for name in sorted(present - set(expectations)):
        findings.append(Finding(Check.SHARD_EXTRA, "in shards/ but not listed in the manifest", name))
    return findings


def _check_sizes_json(out: Folder, expectations: Mapping[str, ShardExpectation]) -> list[Finding]:
    """shards/sizes.json (open_clip reads it next to the tars) gives every tar its manifest sample count and
    names no other file."""
    try:
        sizes = load_sizes(out)
    except (OSError, ValueError) as exc:
        return [Finding(Check.SIZES_JSON, f"cannot read shards/sizes.json: {exc}")]
    except Exception as exc:  # an object store's own errors
        return [Finding(Check.SIZES_JSON, f"cannot read shards/sizes.json: {type(exc).__name__}: {exc}")]
    findings = []
    for name, expectation in expectations.items():
        if expectation.failed is None and not expectation.has_tar:
            if name in sizes:
                findings.append(Finding(Check.SIZES_JSON, "sizes.json lists a shard that has no tar", name))
        elif expectation.failed is None and sizes.get(name) != expectation.samples:
            findings.append(
                Finding(
                    Check.SIZES_JSON,
                    f"sizes.json says {sizes.get(name)}, manifest says {expectation.samples}",
                    name,
                )
            )
    return findings


def audit_shard(
    shards: Folder, listing: Mapping[str, Any], expectation: ShardExpectation, options: AuditOptions,
    seen_keys: dict[str, str],
) -> tuple[int, list[Finding]]:
    """Check one tar (and its parquet) against the manifest and every sample in it; returns (samples, findings)."""
    name = expectation.name
    findings = _check_shard_file(shards, listing, expectation)
    keys: list[str] = []
    with shards.open(name) as handle:
        samples = list(iter_tar_samples(handle, findings, name))
    for key, files in samples:
        keys.append(key)
        findings += _check_key(name, key, seen_keys)
        findings += audit_sample(name, key, files, options)
    if expectation.samples is not None and len(keys) != expectation.samples:
        message = f"{len(keys)} samples in the tar, manifest says {expectation.samples}"
        findings.append(Finding(Check.SHARD_COUNT, message, name))
    findings += _check_metadata(shards, listing, expectation, keys)
    return len(keys), findings


def _check_metadata(shards: Folder, listing: Mapping[str, Any], expectation: ShardExpectation,
                    tar_keys: list[str]) -> list[Finding]:
    """The shard's parquet: its sha256, one row per input sample, kept rows exactly the tar's samples."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from grit_pipeline.shards import KEPT

    shard = expectation.name
    parquet = shard.removesuffix(".tar") + ".parquet"
    if parquet not in listing:
        return [Finding(Check.SHARD_METADATA, f"{parquet} is missing", shard)]
    findings = []
    data = shards.read_bytes(parquet)
    if expectation.parquet_sha256 is not None and hashlib.sha256(data).hexdigest() != expectation.parquet_sha256:
        findings.append(Finding(Check.SHARD_METADATA, f"{parquet} sha256 differs from the manifest", shard))
    try:
        rows = pq.read_table(pa.BufferReader(data), columns=["key", "status", "drop_reason"]).to_pylist()
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        return [*findings, Finding(Check.SHARD_METADATA, f"{parquet} cannot be read: {exc}", shard)]
    if expectation.inputs is not None and len(rows) != expectation.inputs:
        message = f"{parquet} has {len(rows)} rows, manifest counts {expectation.inputs} input samples"
        findings.append(Finding(Check.SHARD_METADATA, message, shard))
    kept = {str(r["key"]) for r in rows if r["status"] == KEPT}
    for key in sorted(kept.symmetric_difference(tar_keys))[:10]:
        where = (
            "kept in the parquet but not in the tar"
            if key in kept
            else "in the tar but not kept in the parquet"
        )
        findings.append(Finding(Check.SHARD_METADATA, where, shard, key))
    for row in rows:
        if row["status"] != KEPT and not row["drop_reason"]:
            findings.append(
                Finding(Check.SHARD_METADATA, "dropped without a drop reason", shard, str(row["key"]))
            )
    return findings


def _check_shard_file(shards: Folder, listing: Mapping[str, Any], expectation: ShardExpectation) -> list[Finding]:
    """Byte size and sha256 against the manifest."""
    findings = []
    name = expectation.name
    size = listing[name].get("size")
    if expectation.bytes is not None and size != expectation.bytes:
        findings.append(
            Finding(Check.SHARD_BYTES, f"{size} bytes, manifest says {expectation.bytes}", name)
        )
    if expectation.sha256 is not None:
        digest = shards.sha256(name)
        if digest != expectation.sha256:
            findings.append(
                Finding(
                    Check.SHARD_SHA256,
                    f"sha256 {digest[:16]}... differs from manifest {expectation.sha256[:16]}...",
                    name,
                )
            )
    return findings


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
