"""The record that flows between the stages: a WorkItem per input sample, from intake to the shard writer.

An input shard becomes a `ShardHeader` and one `WorkItem` per sample (`read_shard`); the stages fill the
item in (decoded image, phrases, boxes, record, text) or drop it with a reason; `to_output` turns it into
the shard writer's `OutputSample`. Every runner cuts a shard into the same batches (`shard_batches`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from grit_pipeline.inputs import InputSample, InputShard
from grit_pipeline.records import DropReason, GritRecord, MalformedRecordError
from grit_pipeline.shards import DROPPED, KEPT, OutputSample, sample_key

if TYPE_CHECKING:
    from grit_pipeline.stages.grounding import Annotation, GroundingResult
    from grit_pipeline.stages.text import Phrase

T = TypeVar("T")


@dataclass(slots=True)
class WorkItem:
    """One sample on its way through the stages; `drop_reason` set means later stages leave it alone."""

    shard_index: int
    position: int
    key: str
    sample: InputSample
    source: dict[str, Any]
    drop_reason: DropReason | None = None
    error_message: str | None = None
    decoded: Any = None  # grit_pipeline.stages.image.DecodedImage
    phrases: list[Phrase] | None = None
    source_record: GritRecord | None = None
    annotations: list[Annotation] | None = None
    grounding: GroundingResult | None = None
    record: GritRecord | None = None
    text: str | None = None
    n_spans: int = 0
    stage_drops: dict[str, Counter[DropReason]] = field(default_factory=dict)
    grounder: dict[str, Any] = field(default_factory=dict)
    clip_scores: dict[str, float] = field(default_factory=dict)  # column -> computed CLIP similarity

    @property
    def span_drops(self) -> Counter[DropReason]:
        """Chunks, spans and boxes dropped inside this sample, by reason, over all stages."""
        total: Counter[DropReason] = Counter()
        for counts in self.stage_drops.values():
            total.update(counts)
        return total

    def set_drops(self, stage: str, counts: Counter[DropReason]) -> None:
        """Record what `stage` dropped inside the sample (replacing, so a re-run stage never counts twice)."""
        self.stage_drops[stage] = Counter(counts)

    @property
    def alive(self) -> bool:
        """True while no stage has dropped the item."""
        return self.drop_reason is None

    def release_pixels(self) -> None:
        """Forget the decoded pixels and the input bytes (the writer needs only the stored bytes) so the item
        pickles small."""
        if self.decoded is not None:
            self.decoded.image = None
        self.sample.image = None

    def grit_meta(self) -> dict[str, Any]:
        """GRIT-20M fields besides the spans: id, url, the original image's size, CLIP similarities."""
        fields = self.sample.fields
        source = self.source_record
        width = _int_or_none(fields.get("original_width")) or _int_or_none(fields.get("width"))
        height = _int_or_none(fields.get("original_height")) or _int_or_none(fields.get("height"))
        if (width is None or height is None) and self.decoded is not None:
            width, height = self.decoded.width, self.decoded.height
        return {
            "id": source.id if source else _int_or_none(fields.get("id")),
            "url": self.sample.url,
            "width": width,
            "height": height,
            "clip_similarity_vitb32": self._clip("clip_similarity_vitb32"),
            "clip_similarity_vitl14": self._clip("clip_similarity_vitl14"),
        }

    def _clip(self, column: str) -> float | None:
        """The CLIP stage's value for `column`, else the input's own."""
        if column in self.clip_scores:
            return float(self.clip_scores[column])
        return _float_or_none(self.sample.fields.get(column))

    def extra_clip_columns(self) -> dict[str, float]:
        """Scores of CLIP models other than ViT-B/32 and ViT-L/14, under their own column names."""
        return {k: float(v) for k, v in self.clip_scores.items()
                if k not in ("clip_similarity_vitb32", "clip_similarity_vitl14")}


    def drop(self, reason: DropReason, message: str | None = None) -> None:
        """Mark the item dropped (the first reason wins)."""
        if self.drop_reason is None:
            self.drop_reason = reason
            self.error_message = message or self.error_message


@dataclass(frozen=True, slots=True)
class ShardHeader:
    """What reading an input shard produced besides samples: its size, source and read errors."""

    shard_index: int
    count: int
    source: dict[str, Any]
    errors: tuple[str, ...] = ()
    failure: str | None = None


def read_shard(shard_index: int, input_shard: InputShard, key_digits: int) -> tuple[ShardHeader, list[WorkItem]]:
    """Read `input_shard` as output shard `shard_index`: a header and one WorkItem per input sample."""
    source = input_shard.describe()
    try:
        contents = input_shard.read()
    except Exception as exc:  # an unreadable shard fails alone; the run goes on with the others
        return ShardHeader(shard_index, 0, source, failure=f"read failed: {type(exc).__name__}: {exc}"), []
    items = [intake(shard_index, position, sample, source, key_digits) for position, sample in enumerate(contents.samples)]
    return ShardHeader(shard_index, len(items), source, tuple(contents.errors)), items


def intake(shard_index: int, position: int, sample: InputSample, source: dict[str, Any], key_digits: int) -> WorkItem:
    """A WorkItem for an input sample, dropped at once when it has no caption or no image."""
    item = WorkItem(shard_index, position, sample_key(shard_index, position, key_digits), sample,
                    {"input": source["path"], "shard": source["name"], "member": sample.member},
                    error_message=sample.error_message)
    if sample.caption is None:
        item.drop(DropReason.MALFORMED_RECORD, sample.error_message or "no caption")
    elif sample.image_error is not None:
        item.drop(sample.image_error, sample.error_message)
    elif sample.has_grit_entries():
        item.source_record = _source_record(item)
    return item


def _source_record(item: WorkItem) -> GritRecord | None:
    """The GRIT-20M record the input already carries (noun_chunks/ref_exps); malformed ones drop the item."""
    fields = item.sample.fields
    row = {**fields, "key": item.key, "caption": item.sample.caption, "url": item.sample.url}
    # img2dataset's width/height are those of the (possibly resized) download; GRIT-20M's are the original's
    row["width"] = fields.get("original_width", fields.get("width"))
    row["height"] = fields.get("original_height", fields.get("height"))
    try:
        return GritRecord.from_row({k: row.get(k) for k in _GRIT_FIELDS})
    except MalformedRecordError as exc:
        item.drop(DropReason.MALFORMED_RECORD, str(exc))
        return None


_GRIT_FIELDS = ("key", "id", "url", "caption", "width", "height", "noun_chunks", "ref_exps",
                "clip_similarity_vitb32", "clip_similarity_vitl14")


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value else None


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def to_output(item: WorkItem) -> OutputSample:
    """The item's outcome as the shard writer's sample (kept only with an image, a record and a text)."""
    kept = item.alive and item.text is not None and item.record is not None and item.decoded is not None
    row = item.record.to_row() if item.record is not None else _dropped_row(item)
    if item.clip_scores:
        row = {**row, **item.extra_clip_columns()}
    return OutputSample(
        key=item.key,
        source_key=item.sample.source_key,
        row=row,
        status=KEPT if kept else DROPPED,
        drop_reason=None if kept else (item.drop_reason or DropReason.STAGE_ERROR),
        error_message=item.error_message,
        image=item.decoded.stored_bytes if kept else None,
        text=item.text if kept else None,
        provenance={"source": item.source, "grounder": str(item.grounder.get("grounder") or "")},
        n_spans=item.n_spans if kept else 0,
        span_drops=item.span_drops,
        stored_width=item.decoded.width if item.decoded is not None else None,
        stored_height=item.decoded.height if item.decoded is not None else None,
    )


def grounders_used(items: Sequence[WorkItem]) -> dict[str, dict[str, Any]]:
    """The description of every grounder that grounded one of `items`, by kind (the first seen of each)."""
    used: dict[str, dict[str, Any]] = {}
    for item in items:
        if item.grounder:
            used.setdefault(str(item.grounder.get("grounder")), item.grounder)
    return used


def _dropped_row(item: WorkItem) -> dict[str, Any]:
    meta = item.grit_meta() if item.sample.fields or item.decoded is not None else {"url": item.sample.url}
    return {"key": item.key, "caption": item.sample.caption, **meta}


def batched(items: Sequence[T], size: int) -> list[list[T]]:
    """`items` cut into consecutive lists of `size` from the start (the last may be shorter): the one batching
    helper (itertools.batched needs Python 3.12)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [list(items[start : start + size]) for start in range(0, len(items), size)]


def shard_batches(items: Sequence[WorkItem], stage_batch_size: int) -> list[list[WorkItem]]:
    """A shard's items in consecutive batches of `stage_batch_size` from its start: the pipeline's batches.

    Every runner uses exactly these batches, so a stage whose output depends on its batch-mates (a
    detector's padding) computes the same thing wherever and however often it runs.
    """
    return batched(items, stage_batch_size)
