"""`grit audit`: a clean build audits clean; corruptions are found, typed and reported with a non-zero exit."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from grit_pipeline.manifests.audit import Check, audit_build
from grit_pipeline.stages.serialize import serialize_record
from grit_pipeline.synthetic import generate_scenes

SHARDS, PER_SHARD = 2, 4


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_layout(out: Path, shards: int = SHARDS, per_shard: int = PER_SHARD) -> Path:
    """A small output in the `grit build` layout, from synthetic scenes (real tars, parquet and manifest)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scenes = generate_scenes(shards * per_shard, seed=11)
    (out / "shards").mkdir(parents=True)
    entries, sizes = [], {}
    for shard in range(shards):
        name = f"{shard:05d}"
        rows = []
        with tarfile.open(out / "shards" / f"{name}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for index, scene in enumerate(scenes[shard * per_shard : (shard + 1) * per_shard]):
                key = f"{shard:05d}{index:04d}"
                record = scene.to_record()
                record.key = key
                image = io.BytesIO()
                scene.image.save(image, format="JPEG", quality=90)
                _add(tar, f"{key}.jpg", image.getvalue())
                _add(tar, f"{key}.json", json.dumps(record.to_row() | {"source_key": scene.key}).encode())
                _add(tar, f"{key}.txt", serialize_record(record).text.encode())
                rows.append({"key": key, "source_key": scene.key, "status": "kept", "drop_reason": None})
        pq.write_table(pa.Table.from_pylist(rows), out / "shards" / f"{name}.parquet")
        (out / "shards" / f"{name}_stats.json").write_text(json.dumps({"kept": per_shard}))
        data = (out / "shards" / f"{name}.tar").read_bytes()
        entries.append(
            {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "counts": {"kept": per_shard}}
        )
        sizes[f"{name}.tar"] = per_shard
    (out / "sizes.json").write_text(json.dumps(sizes))
    manifest = {"config": {"serialize": {"format": "hf", "mode": "expression", "grid": 32, "sanitize": "escape"}},
                "shards": entries}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _rewrite_sample(out: Path, shard: str, key: str, edit) -> None:
    """Rewrite one sample's .json in a tar (and, like a careless tool would, refresh the manifest sha)."""
    path = out / "shards" / f"{shard}.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            if member.name == f"{key}.json":
                data = json.dumps(edit(json.loads(data))).encode()
            _add(tar, member.name, data)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] == shard:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            entry["bytes"] = path.stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def built(tmp_path: Path) -> Path:
    return write_layout(tmp_path / "out")


def _checks(out: Path) -> set[Check]:
    return {f.check for f in audit_build(out).findings}


def test_clean_build_audits_clean(built: Path) -> None:
    report = audit_build(built)
    assert report.ok, report.format_text()
    assert (report.shards_checked, report.samples_checked) == (SHARDS, SHARDS * PER_SHARD)


def test_flipped_byte_is_a_sha256_finding(built: Path) -> None:
    path = built / "shards" / "00001.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0x01  # inside the first member's payload: the tar still reads
    path.write_bytes(bytes(data))
    findings = audit_build(built).findings
    assert Check.SHARD_SHA256 in {f.check for f in findings}
    assert all(f.shard == "00001.tar" for f in findings)


def test_missing_shard_is_found(built: Path) -> None:
    (built / "shards" / "00000.tar").unlink()
    report = audit_build(built)
    assert [(f.check, f.shard) for f in report.findings] == [(Check.SHARD_MISSING, "00000.tar")]
    assert report.shards_checked == SHARDS - 1


def test_extra_shard_is_found(built: Path) -> None:
    (built / "shards" / "00009.tar").write_bytes((built / "shards" / "00000.tar").read_bytes())
    assert _checks(built) == {Check.SHARD_EXTRA}


def test_span_outside_caption_is_found(built: Path) -> None:
    def push_span_out(row: dict) -> dict:
        row["ref_exps"][0][1] = len(row["caption"]) + 5.0
        return row

    _rewrite_sample(built, "00000", "000000002", push_span_out)
    findings = audit_build(built).findings
    assert {f.check for f in findings} >= {Check.SPAN_IN_CAPTION}
    assert Check.SCHEMA not in {f.check for f in findings}
    span_finding = next(f for f in findings if f.check is Check.SPAN_IN_CAPTION)
    assert (span_finding.shard, span_finding.key) == ("00000.tar", "000000002")
    assert "ref_exps[0]" in span_finding.message


def test_text_that_does_not_match_the_json_is_found(built: Path) -> None:
    def move_box(row: dict) -> dict:
        for entry in row["ref_exps"] + row["noun_chunks"]:
            entry[2:6] = [0.0, 0.0, 0.5, 0.5]
        return row

    _rewrite_sample(built, "00001", "000010001", move_box)
    assert _checks(built) == {Check.TEXT_MATCHES_JSON, Check.TEXT_PARSES}


def test_invalid_box_and_bad_schema_are_found(built: Path) -> None:
    def flip_box(row: dict) -> dict:
        row["noun_chunks"][0][2], row["noun_chunks"][0][4] = 0.9, 0.1
        return row

    _rewrite_sample(built, "00000", "000000001", flip_box)
    _rewrite_sample(built, "00000", "000000003", lambda row: row | {"width": "wide"})
    checks = _checks(built)
    assert {Check.BOX_VALID, Check.SCHEMA} <= checks


def test_duplicate_key_across_shards_and_missing_member(built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    path = built / "shards" / "00001.tar"
    with tarfile.open(built / "shards" / "00000.tar") as tar:
        first = {m.name: tar.extractfile(m).read() for m in tar.getmembers()[:3]}
    with tarfile.open(path, "a") as tar:
        for name, data in first.items():
            if not name.endswith(".txt"):
                _add(tar, name, data)
    data = path.read_bytes()
    manifest["shards"][1].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (built / "manifest.json").write_text(json.dumps(manifest))
    findings = audit_build(built).findings
    assert {f.check for f in findings} == {Check.KEY_UNIQUE, Check.SAMPLE_FILES, Check.SHARD_COUNT}
    assert all(f.key == "000000000" for f in findings if f.check is not Check.SHARD_COUNT)


def test_undecodable_image_is_found(built: Path) -> None:
    path = built / "shards" / "00000.tar"
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _add(tar, name, data[:200] if name == "000000000.jpg" else data)
    findings = [f for f in audit_build(built).findings if f.check is not Check.SHARD_SHA256 and f.check is not Check.SHARD_BYTES]
    assert [(f.check, f.key) for f in findings] == [(Check.IMAGE_DECODES, "000000000")]


def test_manifest_missing_is_a_finding(built: Path) -> None:
    (built / "manifest.json").unlink()
    assert _checks(built) == {Check.MANIFEST}


def test_cli_exit_codes_and_json(built: Path) -> None:
    from grit_pipeline.cli import main

    runner = CliRunner()
    clean = runner.invoke(main, ["audit", str(built)])
    assert clean.exit_code == 0, clean.output
    assert "OK" in clean.output
    (built / "shards" / "00000.tar").unlink()
    text = runner.invoke(main, ["audit", str(built)])
    assert text.exit_code == 1
    assert "shard_missing" in text.output and "00000.tar" in text.output
    machine = runner.invoke(main, ["audit", str(built), "--json"])
    assert machine.exit_code == 1
    payload = json.loads(machine.output)
    assert payload["ok"] is False
    assert payload["findings"] == [
        {"check": "shard_missing", "shard": "00000.tar", "key": None, "message": "listed in the manifest but not in shards/"}
    ]
