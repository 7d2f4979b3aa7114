"""The shard writer: deterministic tars, a parquet row per input sample, the stats file as completion marker."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st

from grit_pipeline.records import DropReason
from grit_pipeline.shards import (
    DROPPED,
    OutputSample,
    ShardPaths,
    canonical_json,
    read_stats,
    sample_key,
    tar_header,
    tar_member,
    write_shard,
    write_tar,
)
from grit_pipeline.storage import Folder


def _samples() -> list[OutputSample]:
    kept = [
        OutputSample(key=sample_key(3, i, 6), source_key=f"src{i}",
                     row={"caption": f"a dog {i}", "noun_chunks": [[0.0, 5.0, 0.1, 0.1, 0.5, 0.5, 0.9]],
                          "ref_exps": [[0.0, 5.0, 0.1, 0.1, 0.5, 0.5, 0.9]], "width": 10, "height": 10},
                     image=bytes([i]) * 100, text=f"<grounding><phrase> a dog</phrase> {i}", n_spans=1,
                     provenance={"source": {"input": "in"}})
        for i in (2, 0, 1)
    ]
    dropped = OutputSample(key=sample_key(3, 3, 6), source_key="src3", row={"caption": "x"}, status=DROPPED,
                           drop_reason=DropReason.IMAGE_UNDECODABLE, error_message="bad",
                           span_drops=Counter({DropReason.ABSTRACT_NOUN: 2}))
    return [*kept, dropped]


def test_sample_keys_are_digits_unique_and_bounded() -> None:
    assert sample_key(3, 7, 6) == "00003000007"
    assert sample_key(123456, 0, 6) == "123456000000"
    with pytest.raises(ValueError, match="key_digits"):
        sample_key(0, 10**6, 6)


def test_writer_output_is_byte_identical_and_webdataset_readable(tmp_path: Path) -> None:
    stats_a = write_shard(tmp_path / "a", 3, _samples(), {"path": "in"}, ["oops"])
    stats_b = write_shard(tmp_path / "b", 3, list(reversed(_samples())), {"path": "in"}, ["oops"])
    for name in ("00003.tar", "00003.parquet", "00003_stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    tar_bytes = (tmp_path / "a" / "00003.tar").read_bytes()
    assert stats_a == stats_b
    assert stats_a["files"]["tar"]["sha256"] == hashlib.sha256(tar_bytes).hexdigest()
    assert stats_a["files"]["tar"]["bytes"] == len(tar_bytes)
    assert (stats_a["count"], stats_a["kept"], stats_a["dropped"]) == (4, 3, 1)
    assert stats_a["drop_reasons"] == {"image_undecodable": 1}
    assert stats_a["span_drop_reasons"] == {"abstract_noun": 2}
    with tarfile.open(tmp_path / "a" / "00003.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members][:3] == ["00003000000.jpg", "00003000000.json", "00003000000.txt"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o644)}
    rows = list(wds.WebDataset(str(tmp_path / "a" / "00003.tar"), shardshuffle=False))
    assert [r["__key__"] for r in rows] == ["00003000000", "00003000001", "00003000002"]
    meta = json.loads(rows[1]["json"])
    assert meta["source_key"] == "src1" and meta["key"] == "00003000001" and meta["provenance"]["source"]
    assert rows[1]["txt"].decode().startswith("<grounding>")


def test_parquet_lists_every_sample_with_status(tmp_path: Path) -> None:
    write_shard(tmp_path, 0, [_replace_key(s, i) for i, s in enumerate(_samples())], {"path": "in"})
    rows = pq.read_table(tmp_path / "00000.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["kept", "kept", "kept", "dropped"]
    assert rows[3]["drop_reason"] == "image_undecodable" and rows[3]["error_message"] == "bad"
    assert json.loads(rows[3]["span_drops"]) == {"abstract_noun": 2}
    assert rows[0]["noun_chunks"] == [[0.0, 5.0, 0.1, 0.1, 0.5, 0.5, 0.9]]


def _replace_key(sample: OutputSample, position: int) -> OutputSample:
    sample.key = sample_key(0, position, 6)
    return sample


def test_stats_file_marks_completion_and_temporaries_are_cleaned(tmp_path: Path) -> None:
    paths = ShardPaths(Folder(tmp_path), 0)
    assert read_stats(tmp_path, 0) is None
    write_shard(tmp_path, 0, [_replace_key(s, i) for i, s in enumerate(_samples())], {"path": "in"})
    assert paths.is_complete() and read_stats(tmp_path, 0)["kept"] == 3
    (tmp_path / paths.stats).unlink()
    assert not paths.is_complete() and read_stats(tmp_path, 0) is None
    (tmp_path / ".00000.tar.tmp999").write_bytes(b"partial")
    assert Folder(tmp_path).remove_stale_temporaries() == 1
    assert not (tmp_path / ".00000.tar.tmp999").exists()


def test_a_shard_whose_file_was_replaced_after_its_stats_is_not_complete(tmp_path: Path) -> None:
    write_shard(tmp_path, 0, [_replace_key(s, i) for i, s in enumerate(_samples())], {"path": "in"})
    assert read_stats(tmp_path, 0) is not None
    with open(tmp_path / "00000.tar", "ab") as handle:  # a tar rewritten by something else: its size changed
        handle.write(b"\0" * 512)
    assert read_stats(tmp_path, 0) is None


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    samples = _samples()
    samples[1].key = samples[0].key
    with pytest.raises(ValueError, match="duplicate"):
        write_shard(tmp_path, 3, samples, {})
    assert not (tmp_path / ShardPaths(Folder(tmp_path), 3).stats).exists()


def test_canonical_json_is_stable_and_strict() -> None:
    assert canonical_json({"b": 1.5, "a": float("nan"), "c": [float("inf")]}) == '{"a":null,"b":1.5,"c":[null]}'


def _tarfile_bytes(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    """The reference: what tarfile itself writes for the same members and headers."""
    import io

    with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            tar.addfile(tar_member(name, data), io.BytesIO(data))
    return path.read_bytes()


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 1024, 10239, 10240, 10241, 8**11 - 1])
@pytest.mark.parametrize("name", ["00003000007.jpg", "a" * 100, "d" * 60 + "/" + "b" * 60, "é.txt", "x"])
def test_template_headers_equal_tarfiles_own(name: str, size: int) -> None:
    info = tar_member(name, b"")
    info.size = size
    assert tar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")


@pytest.mark.parametrize(("name", "size"), [("a.jpg", 8**11), ("c" * 101, 1)])
def test_headers_tarfile_cannot_write_are_refused_alike(name: str, size: int) -> None:
    with pytest.raises(ValueError):
        tar_header(name, size)


@given(st.lists(st.tuples(st.text("abc/é0.", min_size=1, max_size=12), st.binary(max_size=1500)), max_size=12))
@settings(max_examples=60, deadline=None)
def test_writer_tar_is_byte_identical_to_tarfiles(members: list[tuple[str, bytes]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        digest, size = write_tar(Path(folder) / "ours.tar", members)
        ours = (Path(folder) / "ours.tar").read_bytes()
        assert ours == _tarfile_bytes(Path(folder) / "ref.tar", members)
        assert (digest, size) == (hashlib.sha256(ours).hexdigest(), len(ours))
