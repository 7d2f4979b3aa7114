"""The record schema: typed spans and boxes, GRIT-20M rows and lossless parquet."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grit_pipeline.records import (
    GRIT20M_SCHEMA,
    Box,
    GritRecord,
    GroundedSpan,
    MalformedRecordError,
    Span,
    read_grit_parquet,
    write_grit_parquet,
)


def _row(**overrides):
    row = {
        "key": "000000001",
        "id": 123456789012,
        "url": "https://example.com/a.jpg",
        "caption": "a dog in a field of flowers",
        "width": 640,
        "height": 480,
        "noun_chunks": [[0.0, 5.0, 0.1, 0.2, 0.5, 0.9, 0.87], [0.0, 5.0, 0.6, 0.2, 0.9, 0.9, 0.7], [9.0, 16.0, 0.0, 0.5, 1.0, 1.0, 0.66]],
        "ref_exps": [[0.0, 27.0, 0.1, 0.2, 0.5, 0.9, 0.87], [0.0, 27.0, 0.6, 0.2, 0.9, 0.9, 0.7], [9.0, 27.0, 0.0, 0.5, 1.0, 1.0, 0.66]],
        "clip_similarity_vitb32": 0.3125,
        "clip_similarity_vitl14": 0.28515625,
    }
    row.update(overrides)
    return row


def test_span_relations():
    outer, inner, crossing = Span(0, 10), Span(2, 5), Span(8, 12)
    assert outer.contains(inner) and not inner.contains(outer)
    assert outer.overlaps(crossing) and not outer.contains(crossing)
    assert not Span(0, 3).overlaps(Span(3, 5))
    assert Span(2, 5).text("abcdefg") == "cde"
    with pytest.raises(ValueError):
        Span(5, 2)


def test_box_conventions():
    box = Box.from_xywh_pixels(10, 20, 30, 40, width=100, height=200)
    assert box.as_tuple() == (0.1, 0.1, 0.4, 0.3)
    assert box.to_pixels(100, 200) == pytest.approx((10, 20, 40, 60))
    assert Box(0.5, 0.5, 0.5, 0.9).is_degenerate()
    assert Box(0.2, 0.5, 0.1, 0.9).is_degenerate()
    assert Box(0, 0, math.nan, 1).is_degenerate()
    assert not Box(-0.01, 0, 1, 1).is_valid() and Box(-0.01, 0, 1, 1).clamped().is_valid()
    assert Box(0, 0, 1, 1).iou(Box(0, 0, 0.5, 1)) == pytest.approx(0.5)


def test_row_round_trip_and_pairing():
    record = GritRecord.from_row(_row())
    assert record.noun_chunks[0] == GroundedSpan(Span(0, 5), Box(0.1, 0.2, 0.5, 0.9), 0.87)
    assert record.ref_exps[2].span == Span(9, 27)
    assert record.to_row() == _row()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"caption": None}, "caption"),
        ({"key": None}, "key"),
        ({"noun_chunks": [[0, 5, 0, 0, 1, 1]]}, "7"),
        ({"noun_chunks": [[0.5, 5, 0, 0, 1, 1, 1]], "ref_exps": []}, "whole"),
        ({"noun_chunks": [[0, 99, 0, 0, 1, 1, 1]], "ref_exps": [[0, 99, 0, 0, 1, 1, 1]]}, "outside"),
        ({"ref_exps": [[0, 5, 0, 0, 1, 1, 1]]}, "ref_exps has 1"),
        ({"width": "wide"}, "width"),
        ({"noun_chunks": "oops"}, "noun_chunks"),
    ],
)
def test_malformed_rows_say_why(overrides, message):
    with pytest.raises(MalformedRecordError, match=message):
        GritRecord.from_row(_row(**overrides))


def test_parquet_is_lossless(tmp_path):
    """A GRIT-20M-layout table (float64 start/end, nulls) reads into records and writes back identically."""
    rows = [_row(), _row(key="000000002", id=None, url=None, clip_similarity_vitl14=None, noun_chunks=[], ref_exps=[])]
    source = pa.Table.from_pylist(rows, schema=GRIT20M_SCHEMA)
    original = tmp_path / "grit.parquet"
    pq.write_table(source, original)
    records = read_grit_parquet(str(original))
    copy = tmp_path / "copy.parquet"
    write_grit_parquet(records, str(copy))
    assert pq.read_table(copy).equals(source)
    assert pq.read_table(copy).schema.field("noun_chunks").type == pa.list_(pa.list_(pa.float64()))
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"
