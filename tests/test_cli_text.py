"""`grit phrases` and `grit serialize` as a user runs them."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from grit_pipeline.cli import main
from grit_pipeline.records import GRIT20M_SCHEMA


def _lines(output):
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_phrases_from_arguments():
    result = CliRunner().invoke(main, ["phrases", "a dog in a field of flowers", ""])
    assert result.exit_code == 0, result.output
    first, empty = _lines(result.stdout)
    assert first == {
        "caption": "a dog in a field of flowers",
        "noun_chunks": [[0, 5], [9, 16], [20, 27]],
        "ref_exps": [[0, 27], [9, 27], [20, 27]],
    }
    assert empty["noun_chunks"] == [] and empty["ref_exps"] == []


def test_phrases_from_stdin_skips_malformed_lines():
    stdin = '{"key": "a", "caption": "bride and groom"}\nnot json\n{"caption": 3}\n\n{"caption": "a red car"}\n'
    result = CliRunner().invoke(main, ["phrases"], input=stdin)
    assert result.exit_code == 0
    rows = _lines(result.stdout)
    assert [r["caption"] for r in rows] == ["bride and groom", "a red car"]
    assert rows[0]["key"] == "a" and rows[0]["noun_chunks"] == [[0, 5], [10, 15]]
    assert "line 2" in result.stderr and "line 3" in result.stderr


def test_phrases_unknown_model_is_a_clear_error():
    result = CliRunner().invoke(main, ["phrases", "--spacy-model", "en_core_web_nonexistent", "a dog"])
    assert result.exit_code != 0
    assert "en_core_web_nonexistent" in result.stderr and "not installed" in result.stderr


ROW = {
    "key": "000000007", "id": 7, "url": "https://example.com/7.jpg", "caption": "a dog in a field of flowers",
    "width": 640, "height": 480,
    "noun_chunks": [[0.0, 5.0, 0.1, 0.2, 0.5, 0.9, 0.87], [9.0, 16.0, 0.0, 0.5, 1.0, 1.0, 0.7]],
    "ref_exps": [[0.0, 27.0, 0.1, 0.2, 0.5, 0.9, 0.87], [9.0, 27.0, 0.0, 0.5, 1.0, 1.0, 0.7]],
    "clip_similarity_vitb32": 0.31, "clip_similarity_vitl14": 0.29,
}  # fmt: skip


def test_serialize_parquet_and_stdin_agree(tmp_path):
    bad = dict(ROW, key="000000008", noun_chunks=[[0.0, 99.0, 0, 0, 1, 1, 1]], ref_exps=[[0.0, 99.0, 0, 0, 1, 1, 1]])
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([ROW, bad], schema=GRIT20M_SCHEMA), path)
    from_file = CliRunner().invoke(main, ["serialize", str(path)])
    assert from_file.exit_code == 0
    assert _lines(from_file.stdout) == [
        {"key": "000000007", "text": "<grounding><phrase> a dog in a field of flowers</phrase><object>"
                                     "<patch_index_0195><patch_index_0911></object>"}
    ]
    assert "000000008" in from_file.stderr and "outside the caption" in from_file.stderr
    stdin = json.dumps(ROW) + "\n{broken\n"
    from_stdin = CliRunner().invoke(main, ["serialize", "--mode", "phrase", "--format", "paper", "--grid", "16"], input=stdin)
    assert from_stdin.exit_code == 0
    (row,) = _lines(from_stdin.stdout)
    assert row["text"].startswith("<grounding> <p> a dog </p><box><loc")
    assert "line 2" in from_stdin.stderr


def test_serialize_unreadable_input_fails_clearly(tmp_path):
    missing = CliRunner().invoke(main, ["serialize", str(tmp_path / "nope.parquet")])
    assert missing.exit_code != 0 and "no such file" in missing.stderr
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all")
    broken = CliRunner().invoke(main, ["serialize", str(garbage)])
    assert broken.exit_code != 0 and "cannot read" in broken.stderr and broken.stdout == ""
