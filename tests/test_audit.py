"""`grit audit`: a clean build audits clean; corruptions are found, typed and reported with a non-zero exit."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from grit_pipeline.fixtures.synthetic import generate_scenes, write_scene_folder
from grit_pipeline.manifests.audit import Check, audit_build

SHARDS, PER_SHARD = 2, 4


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def run_small_build(root: Path, shards: int = SHARDS, per_shard: int = PER_SHARD) -> Path:
    """A real `grit build` (local runner, annotation grounder) of synthetic scenes; returns the output folder."""
    from grit_pipeline.build import run_build
    from grit_pipeline.config import build_config

    scenes = write_scene_folder(generate_scenes(shards * per_shard, seed=11), root / "scenes").parent
    config = build_config((str(scenes),), str(root / "out"), grounder="annotations", runner="local",
                          samples_per_shard=per_shard)
    result = run_build(config, stream=io.StringIO())
    assert result.ok and result.manifest["totals"]["kept"] == shards * per_shard
    return root / "out"


def _keys(out: Path, shard: str) -> list[str]:
    with tarfile.open(out / "shards" / f"{shard}.tar") as tar:
        return sorted({m.name.split(".")[0] for m in tar.getmembers()})


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
    _refresh_manifest(out, shard)


def _refresh_manifest(out: Path, shard: str) -> None:
    """Record a rewritten tar's sha256 and size in the manifest, so only the content checks can object."""
    path = out / "shards" / f"{shard}.tar"
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] == shard:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            entry["bytes"] = path.stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_small_build(tmp_path_factory.mktemp("audit"))


@pytest.fixture
def built(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the module's build, free to corrupt."""
    return Path(shutil.copytree(pristine, tmp_path / "out"))


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

    key = _keys(built, "00000")[2]
    _rewrite_sample(built, "00000", key, push_span_out)
    findings = audit_build(built).findings
    assert Check.SPAN_IN_CAPTION in {f.check for f in findings}
    assert Check.SCHEMA not in {f.check for f in findings}  # one problem, one finding
    span_finding = next(f for f in findings if f.check is Check.SPAN_IN_CAPTION)
    assert (span_finding.shard, span_finding.key) == ("00000.tar", key)
    assert "ref_exps[0]" in span_finding.message


def test_text_that_does_not_match_the_json_is_found(built: Path) -> None:
    def move_box(row: dict) -> dict:
        for entry in row["ref_exps"] + row["noun_chunks"]:
            entry[2:6] = [0.0, 0.0, 0.5, 0.5]
        return row

    _rewrite_sample(built, "00001", _keys(built, "00001")[1], move_box)
    assert _checks(built) == {Check.TEXT_MATCHES_JSON, Check.TEXT_PARSES}


def test_invalid_box_and_bad_schema_are_found(built: Path) -> None:
    def flip_box(row: dict) -> dict:
        row["noun_chunks"][0][2], row["noun_chunks"][0][4] = 0.9, 0.1
        return row

    keys = _keys(built, "00000")
    _rewrite_sample(built, "00000", keys[1], flip_box)
    _rewrite_sample(built, "00000", keys[3], lambda row: row | {"width": "wide"})
    findings = audit_build(built).findings
    assert (Check.BOX_VALID, keys[1]) in {(f.check, f.key) for f in findings}
    assert (Check.SCHEMA, keys[3]) in {(f.check, f.key) for f in findings}


def test_duplicate_key_across_shards_and_missing_member(built: Path) -> None:
    first_key = _keys(built, "00000")[0]
    with tarfile.open(built / "shards" / "00000.tar") as tar:
        first = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.startswith(first_key + ".")}
    with tarfile.open(built / "shards" / "00001.tar", "a") as tar:
        for name, data in first.items():
            if not name.endswith(".txt"):
                _add(tar, name, data)
    _refresh_manifest(built, "00001")
    findings = audit_build(built).findings
    # the sample is a second copy of a key, lacks its .txt, and is in no row of shard 1's parquet
    assert {f.check for f in findings} == {Check.KEY_UNIQUE, Check.SAMPLE_FILES, Check.SHARD_COUNT, Check.SHARD_METADATA}
    assert all(f.key == first_key for f in findings if f.check is not Check.SHARD_COUNT)


def test_undecodable_image_is_found(built: Path) -> None:
    key = _keys(built, "00000")[0]
    path = built / "shards" / "00000.tar"
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _add(tar, name, data[:200] if name == f"{key}.jpg" else data)
    _refresh_manifest(built, "00000")
    assert [(f.check, f.key) for f in audit_build(built).findings] == [(Check.IMAGE_DECODES, key)]


def test_failed_shard_and_wrong_sizes_json_are_found(built: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    manifest["shards"][1] = {"name": "00001", "tar": "00001.tar", "status": "failed", "error": "worker died"}
    (built / "manifest.json").write_text(json.dumps(manifest))
    (built / "shards" / "00001.tar").unlink()
    sizes = json.loads((built / "shards" / "sizes.json").read_text())
    (built / "shards" / "sizes.json").write_text(json.dumps(sizes | {"00000.tar": 99}))
    findings = audit_build(built).findings
    assert [(f.check, f.shard) for f in findings] == [(Check.SHARD_FAILED, "00001.tar"), (Check.SIZES_JSON, "00000.tar")]
    assert "worker died" in findings[0].message


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


def test_parquet_that_disagrees_with_the_tar_is_found(built: Path) -> None:
    import pyarrow.parquet as pq

    path = built / "shards" / "00001.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["status"] = "dropped"  # kept in the tar, dropped (and with no reason) in the metadata
    pq.write_table(table.from_pylist(rows, schema=table.schema), path)
    findings = [(f.check, f.key, f.message) for f in audit_build(built).findings]
    key = rows[0]["key"]
    assert (Check.SHARD_METADATA, None, "00001.parquet sha256 differs from the manifest") in findings
    assert (Check.SHARD_METADATA, key, "in the tar but not kept in the parquet") in findings
    assert (Check.SHARD_METADATA, key, "dropped without a drop reason") in findings
    assert len(findings) == 3


def test_image_size_is_checked_against_the_stored_size(built: Path) -> None:
    key = _keys(built, "00000")[1]
    _rewrite_sample(built, "00000", key, lambda row: row | {"width": row["width"] + 1})
    assert audit_build(built).ok  # width/height are the original image's size, which may differ
    _rewrite_sample(built, "00000", key, lambda row: row | {"stored_width": row["stored_width"] + 1})
    findings = audit_build(built).findings
    assert [(f.check, f.key) for f in findings] == [(Check.IMAGE_SIZE, key)]
    assert audit_build(built, check_image_size=False).ok


def test_null_in_a_json_is_found(built: Path) -> None:
    key = _keys(built, "00000")[0]
    _rewrite_sample(built, "00000", key, lambda row: row | {"id": None})
    findings = audit_build(built).findings
    assert [(f.check, f.key) for f in findings] == [(Check.SCHEMA, key)] and "id" in findings[0].message


def test_member_names_that_climb_out_or_are_not_files_are_found(built: Path) -> None:
    with tarfile.open(built / "shards" / "00000.tar", "a") as tar:
        _add(tar, "../escape.txt", b"x")
        folder = tarfile.TarInfo("subdir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    _refresh_manifest(built, "00000")
    findings = audit_build(built).findings
    assert [f.check for f in findings] == [Check.MEMBER_NAME, Check.MEMBER_NAME]
    assert "'../escape.txt'" in findings[0].message and "'subdir'" in findings[1].message


_CAPTION_TEXT = st.text(alphabet=st.sampled_from("ab <>&é\t\n,."), min_size=1, max_size=40)


@st.composite
def _records(draw: st.DrawFn):
    from grit_pipeline.records import Box, GritRecord, GroundedSpan, Span

    caption = draw(_CAPTION_TEXT.filter(lambda c: c.strip()))
    entries = []
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(0, len(caption) - 1))
        end = draw(st.integers(start + 1, len(caption)))
        x1, y1 = draw(st.floats(0, 0.9)), draw(st.floats(0, 0.9))
        box = Box(x1, y1, draw(st.floats(x1 + 0.05, 1.0)), draw(st.floats(y1 + 0.05, 1.0)))
        entries.append(GroundedSpan(Span(start, end), box, 0.9))
    return GritRecord(key="000000001", caption=caption, noun_chunks=entries, ref_exps=entries)


@settings(max_examples=60, deadline=None)
@given(record=_records())
def test_serialized_records_audit_clean_and_any_edit_of_the_text_is_found(record) -> None:
    from grit_pipeline.manifests.sample_checks import AuditOptions, audit_sample
    from grit_pipeline.stages.serialize import serialize_record

    serialized = serialize_record(record)
    assume(serialized.text is not None)
    options = AuditOptions(decode_images=False)
    row = {k: v for k, v in record.to_row().items() if v is not None}  # KEY.json never holds null
    files = {"json": json.dumps(row).encode(), "txt": serialized.text.encode(), "jpg": b""}
    assert audit_sample("s.tar", record.key, files, options) == []
    edited = serialized.text.replace("<patch_index_", "<patch_index_1", 1)
    checks = {f.check for f in audit_sample("s.tar", record.key, files | {"txt": edited.encode()}, options)}
    assert Check.TEXT_MATCHES_JSON in checks


def test_oversized_member_is_reported_not_read(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import grit_pipeline.manifests.sample_checks as sample_checks

    monkeypatch.setattr(sample_checks, "MAX_MEMBER_BYTES", 1 << 30)
    assert audit_build(built).ok
    monkeypatch.setattr(sample_checks, "MAX_MEMBER_BYTES", 3000)  # a .jpg is now "too large", .json/.txt not
    findings = audit_build(built).findings
    too_large = [f for f in findings if f.check is Check.MEMBER_NAME]
    assert too_large and all(".jpg'" in f.message and "not read" in f.message for f in too_large)
    lost = [f for f in findings if f.check is Check.SAMPLE_FILES]
    assert len(lost) == len(too_large) and all("missing ['jpg']" in f.message for f in lost)


def test_truncated_tar_and_duplicate_member_are_found(built: Path) -> None:
    last_key = _keys(built, "00001")[-1]
    with tarfile.open(built / "shards" / "00001.tar", "a") as tar:
        _add(tar, f"{last_key}.txt", b"a second text")  # next to the first: the same sample
    _refresh_manifest(built, "00001")
    path = built / "shards" / "00000.tar"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _refresh_manifest(built, "00000")
    findings = audit_build(built).findings
    assert [(f.check, f.shard, f.key) for f in findings if f.shard == "00001.tar"] == [
        (Check.MEMBER_NAME, "00001.tar", last_key)]
    assert "duplicate member" in next(f.message for f in findings if f.check is Check.MEMBER_NAME)
    broken = {f.check for f in findings if f.shard == "00000.tar"}
    assert {Check.SHARD_UNREADABLE, Check.SHARD_COUNT} <= broken
