"""The GRIT record: typed Python objects and the GRIT-20M parquet schema they map to, losslessly."""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

GRID_DEFAULT = 32


class DropReason(str, enum.Enum):
    """Why a record, a span or a box was dropped. Values are stable names used in stats files and manifests."""

    # whole record
    MALFORMED_RECORD = "malformed_record"
    EMPTY_CAPTION = "empty_caption"
    CAPTION_TOO_LONG = "caption_too_long"
    CONTROL_TOKEN_IN_CAPTION = "control_token_in_caption"
    NO_NOUN_CHUNKS = "no_noun_chunks"
    NO_BOX_ABOVE_THRESHOLD = "no_box_above_threshold"
    NO_SPAN_SERIALISED = "no_span_serialised"
    NO_BOX_CONFIRMED = "no_box_confirmed"
    CLIP_SIMILARITY_TOO_LOW = "clip_similarity_too_low"
    # image decoding
    IMAGE_MISSING = "image_missing"
    IMAGE_EMPTY = "image_empty"
    IMAGE_TRUNCATED = "image_truncated"
    IMAGE_UNDECODABLE = "image_undecodable"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_TOO_SMALL = "image_too_small"
    # supplied boxes whose frame the stored pixels cannot be put in (stages/frames.py)
    FRAME_MISMATCH = "frame_mismatch"
    # single chunks, spans and boxes
    ABSTRACT_NOUN = "abstract_noun"
    REFLEXIVE_PRONOUN = "reflexive_pronoun"
    NON_REFERRING_PRONOUN = "non_referring_pronoun"
    FIXED_PHRASE_FRAGMENT = "fixed_phrase_fragment"
    DEGENERATE_BOX = "degenerate_box"
    DUPLICATE_BOX_TOKENS = "duplicate_box_tokens"
    EMPTY_SPAN = "empty_span"
    SPAN_OUT_OF_CAPTION = "span_out_of_caption"
    CONTAINED_SPAN = "contained_span"
    CROSSING_SPAN = "crossing_span"
    NO_MATCHING_ANNOTATION = "no_matching_annotation"
    BOX_CROPPED_OUT = "box_cropped_out"
    BOX_NOT_CONFIRMED = "box_not_confirmed"
    # box-quality filters (stages/quality.py): boxes removed, and samples dropped
    BOX_TOO_LARGE = "box_too_large"
    BOX_TOO_SMALL = "box_too_small"
    TOO_MANY_BOXES = "too_many_boxes"
    IMAGE_TOO_SMALL_FOR_QUALITY = "image_too_small_for_quality"
    NO_BOX_AFTER_QUALITY_FILTERS = "no_box_after_quality_filters"
    # pipeline faults
    STAGE_ERROR = "stage_error"


class MalformedRecordError(ValueError):
    """A row that cannot be turned into a GritRecord; the message says which field and why."""


@dataclass(frozen=True, slots=True, order=True)
class Span:
    """A half-open character range [start, end) into a caption, in Python str (code point) indices."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"invalid span [{self.start}, {self.end})")

    def text(self, caption: str) -> str:
        """The caption characters this span covers."""
        return caption[self.start : self.end]

    def contains(self, other: Span) -> bool:
        """True when `other` lies inside this span (equal spans contain each other)."""
        return self.start <= other.start and other.end <= self.end

    def overlaps(self, other: Span) -> bool:
        """True when the two spans share at least one character."""
        return self.start < other.end and other.start < self.end

    def as_list(self) -> list[int]:
        """[start, end] as printed by `grit phrases`."""
        return [self.start, self.end]


@dataclass(frozen=True, slots=True)
class Box:
    """An axis-aligned box in normalised image coordinates.

    Convention: the origin is the image's top-left pixel corner; (x1, y1) is the top-left corner and
    (x2, y2) the bottom-right corner; x is divided by the image width and y by its height, so the whole
    image is (0, 0, 1, 1). Values are not clamped here: `is_valid` says whether the box can be used.
    """

    x1: float
    y1: float
    x2: float
    y2: float

    @classmethod
    def from_pixels(cls, x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> Box:
        """A box from top-left/bottom-right pixel corners of a width x height image."""
        return cls(x1 / width, y1 / height, x2 / width, y2 / height)

    @classmethod
    def from_xywh_pixels(cls, x: float, y: float, w: float, h: float, width: int, height: int) -> Box:
        """A box from a COCO-style (x, y, w, h) pixel box."""
        return cls.from_pixels(x, y, x + w, y + h, width, height)

    def to_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2) in pixels of a width x height image."""
        return (self.x1 * width, self.y1 * height, self.x2 * width, self.y2 * height)

    def clamped(self) -> Box:
        """The box with every coordinate clamped into [0, 1]."""
        return Box(*(min(1.0, max(0.0, v)) for v in (self.x1, self.y1, self.x2, self.y2)))

    def is_finite(self) -> bool:
        """True when no coordinate is NaN or infinite."""
        return all(math.isfinite(v) for v in (self.x1, self.y1, self.x2, self.y2))

    def is_degenerate(self) -> bool:
        """True when the box has no area (x2 <= x1 or y2 <= y1) or a non-finite coordinate."""
        return not self.is_finite() or not (self.x2 > self.x1 and self.y2 > self.y1)

    def is_valid(self) -> bool:
        """True for a finite box with area whose coordinates all lie in [0, 1]."""
        return not self.is_degenerate() and all(0.0 <= v <= 1.0 for v in self.as_tuple())

    def area(self) -> float:
        """Normalised area (0 for degenerate boxes)."""
        return 0.0 if self.is_degenerate() else (self.x2 - self.x1) * (self.y2 - self.y1)

    def iou(self, other: Box) -> float:
        """Intersection over union with another box."""
        ix = max(0.0, min(self.x2, other.x2) - max(self.x1, other.x1))
        iy = max(0.0, min(self.y2, other.y2) - max(self.y1, other.y1))
        inter = ix * iy
        union = self.area() + other.area() - inter
        return inter / union if union > 0 else 0.0

    def as_tuple(self) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2)."""
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass(frozen=True, slots=True)
class GroundedSpan:
    """One GRIT-20M entry: a caption span with one box and the detector's score for it."""

    span: Span
    box: Box
    score: float

    @classmethod
    def from_list(cls, values: Sequence[float]) -> GroundedSpan:
        """Parse `[start, end, x1, y1, x2, y2, score]` (the GRIT-20M layout)."""
        if len(values) != 7:
            raise MalformedRecordError(f"entry has {len(values)} values, expected 7")
        start, end = values[0], values[1]
        if not (_is_integral(start) and _is_integral(end)):
            raise MalformedRecordError(f"span offsets must be whole numbers, got {start}, {end}")
        if start < 0 or end < start:
            raise MalformedRecordError(f"invalid span [{start}, {end})")
        return cls(Span(int(start), int(end)), Box(*(float(v) for v in values[2:6])), float(values[6]))

    def as_list(self) -> list[float]:
        """`[start, end, x1, y1, x2, y2, score]` as float64 values, as in GRIT-20M."""
        b = self.box
        return [float(self.span.start), float(self.span.end), b.x1, b.y1, b.x2, b.y2, self.score]


def _is_integral(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and float(value).is_integer()


@dataclass(slots=True)
class GritRecord:
    """One image-text pair in the GRIT-20M layout; `ref_exps[i]` is the expansion of `noun_chunks[i]`."""

    key: str
    caption: str
    noun_chunks: list[GroundedSpan] = field(default_factory=list)
    ref_exps: list[GroundedSpan] = field(default_factory=list)
    id: int | None = None
    url: str | None = None
    width: int | None = None
    height: int | None = None
    clip_similarity_vitb32: float | None = None
    clip_similarity_vitl14: float | None = None

    def validate(self) -> None:
        """Raise MalformedRecordError unless the record is internally consistent."""
        if len(self.ref_exps) not in (0, len(self.noun_chunks)):
            raise MalformedRecordError(
                f"ref_exps has {len(self.ref_exps)} entries but noun_chunks has {len(self.noun_chunks)}"
            )
        n = len(self.caption)
        for name, entries in (("noun_chunks", self.noun_chunks), ("ref_exps", self.ref_exps)):
            for entry in entries:
                if entry.span.end > n:
                    raise MalformedRecordError(
                        f"{name} span [{entry.span.start}, {entry.span.end}) lies outside the caption "
                        f"of {n} characters"
                    )

    def to_row(self) -> dict[str, Any]:
        """The record as a GRIT-20M row (a plain dict matching GRIT20M_SCHEMA)."""
        return {
            "key": self.key,
            "id": self.id,
            "url": self.url,
            "caption": self.caption,
            "width": self.width,
            "height": self.height,
            "noun_chunks": [e.as_list() for e in self.noun_chunks],
            "ref_exps": [e.as_list() for e in self.ref_exps],
            "clip_similarity_vitb32": self.clip_similarity_vitb32,
            "clip_similarity_vitl14": self.clip_similarity_vitl14,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> GritRecord:
        """Parse and validate a GRIT-20M row (from parquet, JSON or an img2dataset .json)."""
        caption = row.get("caption")
        if not isinstance(caption, str):
            raise MalformedRecordError(f"caption must be a string, got {type(caption).__name__}")
        key = row.get("key")
        if key is None:
            raise MalformedRecordError("missing key")
        record = cls(
            key=str(key),
            caption=caption,
            noun_chunks=_parse_entries(row.get("noun_chunks"), "noun_chunks"),
            ref_exps=_parse_entries(row.get("ref_exps"), "ref_exps"),
            id=_optional_int(row.get("id"), "id"),
            url=_optional_str(row.get("url"), "url"),
            width=_optional_int(row.get("width"), "width"),
            height=_optional_int(row.get("height"), "height"),
            clip_similarity_vitb32=_optional_float(row.get("clip_similarity_vitb32"), "clip_similarity_vitb32"),
            clip_similarity_vitl14=_optional_float(row.get("clip_similarity_vitl14"), "clip_similarity_vitl14"),
        )
        record.validate()
        return record


def _parse_entries(value: Any, name: str) -> list[GroundedSpan]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise MalformedRecordError(f"{name} must be a list of 7-value lists")
    try:
        return [GroundedSpan.from_list(list(v)) for v in value]
    except (TypeError, ValueError) as exc:
        raise MalformedRecordError(f"{name}: {exc}") from exc


def _optional_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not _is_integral(value):
        raise MalformedRecordError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _optional_float(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedRecordError(f"{name} must be a number, got {value!r}")
    return float(value)


def _optional_str(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedRecordError(f"{name} must be a string, got {value!r}")
    return value


_ENTRY_TYPE = pa.list_(pa.list_(pa.float64()))

GRIT20M_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("id", pa.int64()),
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("width", pa.int64()),
        pa.field("height", pa.int64()),
        pa.field("noun_chunks", _ENTRY_TYPE),
        pa.field("ref_exps", _ENTRY_TYPE),
        pa.field("clip_similarity_vitb32", pa.float64()),
        pa.field("clip_similarity_vitl14", pa.float64()),
    ]
)


def records_to_table(records: Iterable[GritRecord]) -> pa.Table:
    """A pyarrow table in the GRIT-20M schema."""
    return pa.Table.from_pylist([r.to_row() for r in records], schema=GRIT20M_SCHEMA)


def write_grit_parquet(records: Iterable[GritRecord], path: str) -> None:
    """Write records as a GRIT-20M parquet file, atomically (temporary file, then rename)."""
    import pyarrow.parquet as pq

    from grit_pipeline.io import atomic_path

    table = records_to_table(records)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def iter_grit_parquet(path: str, rows_per_read: int = 4096) -> Iterator[dict[str, Any]]:
    """Yield the rows of a GRIT-20M parquet file (a path or URL) as dicts (not yet validated), batch by batch."""
    import pyarrow.parquet as pq

    from grit_pipeline.storage import open_location

    with open_location(path) as handle:
        parquet = pq.ParquetFile(handle)
        for batch in parquet.iter_batches(batch_size=rows_per_read):
            yield from batch.to_pylist()


def read_grit_parquet(path: str) -> list[GritRecord]:
    """Read and validate every row of a GRIT-20M parquet file (raises on a malformed row)."""
    return [GritRecord.from_row(row) for row in iter_grit_parquet(path)]
