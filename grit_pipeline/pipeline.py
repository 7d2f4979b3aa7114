"""What `grit build` runs: the stages decode -> frames -> noun chunks -> ground -> expand -> serialise -> write.

Each stage is a small callable class over a BATCH of `WorkItem`s; it skips items already dropped and
records a drop reason instead of raising. Where the stages run is the runners' business
(`grit_pipeline.runners.local`, `grit_pipeline.runners.ray`): both call the very same stage objects.
A shard is the unit of work and of resume: output shard i is made from input shard i.
"""

from __future__ import annotations

import sys
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from grit_pipeline.inputs import InputSample, InputShard
from grit_pipeline.records import DropReason, GritRecord, MalformedRecordError
from grit_pipeline.shards import DROPPED, KEPT, OutputSample, sample_key

if TYPE_CHECKING:
    from grit_pipeline.config import BuildConfig
    from grit_pipeline.stages.grounding import Annotation, Grounder, GroundingResult
    from grit_pipeline.stages.text import Phrase

GROUNDER_ANNOTATIONS = "annotations"
GROUNDER_GROUNDING_DINO = "grounding-dino"
GROUNDERS = (GROUNDER_GROUNDING_DINO, GROUNDER_ANNOTATIONS)


class StageSetupError(RuntimeError):
    """A stage cannot start (its model is missing or fails to load): fatal for the run, never a sample's fault."""


@dataclass(slots=True)
class WorkItem:
    """One sample on its way through the stages; `drop_reason` set means later stages leave it alone."""

    shard: int
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

    def drop(self, reason: DropReason, message: str | None = None) -> None:
        """Mark the item dropped (the first reason wins)."""
        if self.drop_reason is None:
            self.drop_reason = reason
            self.error_message = message or self.error_message


@dataclass(frozen=True, slots=True)
class ShardHeader:
    """What reading an input shard produced besides samples: its size, source and read errors."""

    shard: int
    count: int
    source: dict[str, Any]
    errors: tuple[str, ...] = ()
    failure: str | None = None


# ---------------------------------------------------------------------------------------------- reading


def read_shard(index: int, shard: InputShard, key_digits: int) -> tuple[ShardHeader, list[WorkItem]]:
    """Read input shard `shard` as output shard `index`: a header and one WorkItem per input sample."""
    source = shard.describe()
    try:
        contents = shard.read()
    except Exception as exc:  # an unreadable shard fails alone; the run goes on with the others
        return ShardHeader(index, 0, source, failure=f"read failed: {type(exc).__name__}: {exc}"), []
    items = [intake(index, position, sample, source, key_digits) for position, sample in enumerate(contents.samples)]
    return ShardHeader(index, len(items), source, tuple(contents.errors)), items


def intake(shard: int, position: int, sample: InputSample, source: dict[str, Any], key_digits: int) -> WorkItem:
    """A WorkItem for an input sample, dropped at once when it has no caption or no image."""
    item = WorkItem(shard, position, sample_key(shard, position, key_digits), sample,
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


# ---------------------------------------------------------------------------------------------- stages


class DecodeStage:
    """Decode each image (EXIF orientation, size limits) per the image stage's convention."""

    name = "decode"

    def __init__(self, config: BuildConfig) -> None:
        self.config = config.image

    def __call__(self, items: list[WorkItem]) -> list[WorkItem]:
        """Decode the images of the live items; undecodable ones are dropped with the decoder's reason."""
        from grit_pipeline.stages.image import ImageDecodeError, decode_image

        for item in items:
            if not item.alive or item.sample.image is None:
                continue
            try:
                item.decoded = decode_image(item.sample.image, self.config)
            except ImageDecodeError as exc:
                item.drop(exc.reason, str(exc))
        return items


class FrameStage:
    """Put the boxes that come with the input (GRIT-20M entries, annotations) into the stored pixels' frame.

    Per sample, `stages/frames.py` finds the frame the boxes were given in (EXIF orientation, img2dataset's
    resize mode) and maps them; a sample whose frame cannot be found is dropped (`frame_mismatch`), a box that
    center_crop cut away is dropped (`box_cropped_out`). Samples without supplied boxes pass untouched.
    """

    name = "frames"

    def __init__(self, config: BuildConfig) -> None:
        self.config = config.frames

    def __call__(self, items: list[WorkItem]) -> list[WorkItem]:
        """Map the supplied boxes of every live, decoded item into its stored frame."""
        from grit_pipeline.stages.frames import FrameMismatchError, Size, resolve_frame

        for item in items:
            supplied = item.sample.fields.get("annotations")
            if not item.alive or item.decoded is None or (item.source_record is None and supplied is None):
                continue
            decoded = item.decoded
            raw_pixels = decoded.image if decoded.exif_orientation == 1 else None
            try:
                frame_map = resolve_frame(item.sample.frame, item.sample.download,
                                          Size(decoded.raw_width, decoded.raw_height), decoded.exif_orientation,
                                          self.config, raw_pixels)
            except FrameMismatchError as exc:
                item.drop(DropReason.FRAME_MISMATCH, str(exc))
                continue
            dropped: Counter[DropReason] = Counter()
            if item.source_record is not None:
                item.source_record = map_record_boxes(item.source_record, frame_map, dropped)
                if not item.source_record.noun_chunks:
                    item.drop(DropReason.BOX_CROPPED_OUT, "every box lay outside the center_crop")
            if supplied is not None:
                item.annotations = map_annotations(supplied, frame_map, dropped)
            item.set_drops(self.name, dropped)
        return items


def map_record_boxes(record: GritRecord, frame_map: Any, dropped: Counter[DropReason]) -> GritRecord:
    """The record with every entry's box in the stored frame; entries cropped away (with their ref_exps
    partner) are counted in `dropped` and removed."""
    from dataclasses import replace

    from grit_pipeline.records import GroundedSpan

    chunks, expressions = [], []
    for index, chunk in enumerate(record.noun_chunks):
        box = frame_map.map_box(chunk.box)
        if box is None:
            dropped[DropReason.BOX_CROPPED_OUT] += 1
            continue
        chunks.append(GroundedSpan(chunk.span, box, chunk.score))
        if index < len(record.ref_exps):
            expression = record.ref_exps[index]
            expression_box = box if expression.box == chunk.box else frame_map.map_box(expression.box)
            expressions.append(GroundedSpan(expression.span, expression_box or box, expression.score))
    return replace(record, noun_chunks=chunks, ref_exps=expressions)


def map_annotations(supplied: Any, frame_map: Any, dropped: Counter[DropReason]) -> list[Annotation]:
    """Parse supplied annotations in the source frame (pixel boxes by its size) and map them to the stored one."""
    from dataclasses import replace

    from grit_pipeline.stages.annotations import parse_annotations

    size = frame_map.source_size
    mapped = []
    for annotation in parse_annotations(supplied, size.width, size.height, dropped):
        box = frame_map.map_box(annotation.box)
        if box is None:
            dropped[DropReason.BOX_CROPPED_OUT] += 1
        else:
            mapped.append(replace(annotation, box=box))
    return mapped


class PhraseStage:
    """spaCy noun chunks and referring expressions, for captions the input does not ground already."""

    name = "phrases"

    def __init__(self, config: BuildConfig) -> None:
        from grit_pipeline.stages.text import PhraseExtractor

        self.extractor = PhraseExtractor(config.text)
        self.spacy_model = config.text.spacy_model

    def __call__(self, items: list[WorkItem]) -> list[WorkItem]:
        """Fill `phrases` of every live item without a source record."""
        todo = [item for item in items if item.alive and item.source_record is None]
        if not todo:
            return items
        try:
            import_spacy_without_torch(self.spacy_model)
            self.extractor.nlp  # noqa: B018 - load spaCy once; a missing model must stop the run, not the sample
        except Exception as exc:
            raise StageSetupError(f"phrases: {exc}") from exc
        for item, result in zip(todo, self.extractor([i.sample.caption or "" for i in todo]), strict=True):
            item.set_drops(self.name, result.dropped)
            if result.drop_reason is not None:
                item.drop(result.drop_reason)
            elif not result.phrases:
                item.drop(DropReason.NO_NOUN_CHUNKS)
            else:
                item.phrases = list(result.phrases)
        return items


_TORCH_SPACY_PACKAGES = ("spacy-transformers", "spacy_transformers", "spacy-curated-transformers",
                         "spacy_curated_transformers")


def import_spacy_without_torch(model: str) -> bool:
    """Import spaCy without torch when the model is a packaged CPU pipeline; returns True when it did.

    thinc imports torch (seconds of start-up in every worker) only to offer torch-backed layers; a packaged
    pipeline that does not depend on spacy-transformers never uses them, so the parse is the same. torch is
    hidden only while spaCy imports: a later `import torch` (a detector in the same worker) works normally.
    """
    import importlib.metadata

    if "spacy" in sys.modules or "torch" in sys.modules:
        return False
    try:
        requirements = importlib.metadata.requires(model) or []
    except (importlib.metadata.PackageNotFoundError, ValueError):  # a path or an unknown name: leave it alone
        return False
    if model.endswith("_trf") or any(r.lower().startswith(_TORCH_SPACY_PACKAGES) for r in requirements):
        return False
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError: thinc goes without
    try:
        import spacy  # noqa: F401
    finally:
        del sys.modules["torch"]
    return True


class GroundStage:
    """Boxes for every phrase: the configured grounder; records that carry GRIT-20M entries are re-grounded
    from those entries by the annotation grounder. Grounders load on first use, so a GRIT-20M download
    never loads the detector."""

    name = "ground"

    def __init__(self, config: BuildConfig) -> None:
        self.config = config
        self._grounders: dict[str, tuple[Grounder, dict[str, Any]]] = {}

    def grounder(self, kind: str) -> tuple[Grounder, dict[str, Any]]:
        """The grounder of `kind` and its description, loaded once."""
        if kind not in self._grounders:
            try:
                grounder = make_grounder(self.config, kind)
            except Exception as exc:  # weights missing, offline hub, bad path: no sample could be grounded
                raise StageSetupError(f"ground: cannot load the {kind} grounder: {exc}") from exc
            self._grounders[kind] = (grounder, grounder.describe())
        return self._grounders[kind]

    def __call__(self, items: list[WorkItem]) -> list[WorkItem]:
        """Ground the live items, the ones with source records through the annotation grounder."""
        live = [i for i in items if i.alive]
        from_source = [i for i in live if i.source_record is not None]
        from_text = [i for i in live if i.source_record is None]
        if from_text:
            self._ground(*self.grounder(self.config.grounder), from_text)
        if from_source:
            self._ground(*self.grounder(GROUNDER_ANNOTATIONS), from_source)
        return items

    def _ground(self, grounder: Grounder, description: dict[str, Any], items: list[WorkItem]) -> None:
        requests = [grounding_request(item) for item in items]
        for item, request, result in zip(items, requests, grounder.ground(requests), strict=True):
            item.grounder = description
            item.grounding = result
            item.set_drops(self.name, result.dropped)
            if item.phrases is None:
                item.phrases = list(request.phrases)
            if result.drop_reason is not None:
                item.drop(result.drop_reason)


def grounding_request(item: WorkItem) -> Any:
    """The grounder's view of an item: caption, phrases, decoded image, supplied annotations, source record."""
    from grit_pipeline.stages.annotations import phrases_from_record
    from grit_pipeline.stages.grounding import GroundingRequest

    decoded = item.decoded
    if item.phrases is not None:
        phrases = item.phrases
    else:
        phrases = phrases_from_record(item.source_record) if item.source_record is not None else []
    return GroundingRequest(
        key=item.key,
        caption=item.sample.caption or "",
        phrases=phrases,
        image=decoded.image if decoded is not None else None,
        annotations=item.annotations,
        source_record=item.source_record,
    )


class ExpandStage:
    """Pair every box with its chunk and the chunk's referring expression: the GRIT-20M record."""

    name = "expand"

    def __init__(self, config: BuildConfig) -> None:
        self.config = config

    def __call__(self, items: list[WorkItem]) -> list[WorkItem]:
        """Assemble the record of every live, grounded item."""
        from grit_pipeline.stages.assemble import assemble_record

        for item in items:
            if not item.alive or item.grounding is None:
                continue
            boxes = [[(b.box, b.score) for b in phrase_boxes] for phrase_boxes in item.grounding.boxes]
            item.record = assemble_record(item.key, item.sample.caption or "", item.phrases or [], boxes,
                                          **record_meta(item))
            if not item.record.noun_chunks:
                item.drop(DropReason.NO_BOX_ABOVE_THRESHOLD)
        return items


def record_meta(item: WorkItem) -> dict[str, Any]:
    """GRIT-20M fields besides the spans: id, url, original size, CLIP similarities."""
    fields = item.sample.fields
    source = item.source_record
    width = _int_or_none(fields.get("original_width")) or _int_or_none(fields.get("width"))
    height = _int_or_none(fields.get("original_height")) or _int_or_none(fields.get("height"))
    if (width is None or height is None) and item.decoded is not None:
        width, height = item.decoded.width, item.decoded.height
    return {
        "id": source.id if source else _int_or_none(fields.get("id")),
        "url": item.sample.url,
        "width": width,
        "height": height,
        "clip_similarity_vitb32": _float_or_none(fields.get("clip_similarity_vitb32")),
        "clip_similarity_vitl14": _float_or_none(fields.get("clip_similarity_vitl14")),
    }


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value else None


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class SerializeStage:
    """Grounded text with Kosmos-2 location tokens (transformers spelling by default)."""

    name = "serialize"

    def __init__(self, config: BuildConfig) -> None:
        self.config = config.serialize

    def __call__(self, items: list[WorkItem]) -> list[WorkItem]:
        """Serialise every live record; a record with no serialisable span is dropped."""
        from grit_pipeline.stages.serialize import serialize_record

        for item in items:
            if not item.alive or item.record is None:
                continue
            result = serialize_record(item.record, self.config)
            item.set_drops(self.name, result.dropped)
            if result.text is None:
                item.drop(result.drop_reason or DropReason.NO_SPAN_SERIALISED)
            else:
                item.text = result.text
                item.n_spans = len(result.entities)
        return items




def make_grounder(config: BuildConfig, kind: str) -> Grounder:
    """The grounder named `kind`, loaded once per worker."""
    if kind == GROUNDER_ANNOTATIONS:
        from grit_pipeline.stages.annotations import AnnotationGrounder

        return AnnotationGrounder(config.annotations)
    if kind == GROUNDER_GROUNDING_DINO:
        from grit_pipeline.stages.groundingdino import GroundingDinoGrounder

        return GroundingDinoGrounder(config.grounding)
    raise ValueError(f"unknown grounder {kind!r}; expected one of {GROUNDERS}")


def make_stages(config: BuildConfig) -> list[Callable[[list[WorkItem]], list[WorkItem]]]:
    """The stage objects of a build, in order (their models load on first use, once per worker)."""
    return [DecodeStage(config), FrameStage(config), PhraseStage(config), GroundStage(config), ExpandStage(config), SerializeStage(config)]


def run_stage(stage: Callable[[list[WorkItem]], list[WorkItem]], items: list[WorkItem]) -> list[WorkItem]:
    """Run a stage on a batch; when the batch raises, retry item by item so only the bad sample is dropped.

    A StageSetupError (a model that cannot load) is not a sample's fault and propagates.
    """
    try:
        return stage(items)
    except StageSetupError:
        raise
    except Exception:  # a bug or a poisoned sample: isolate it rather than failing the shard
        # Stages are idempotent on an item (they recompute, skip dropped items and replace their drop
        # counts), so re-running the items the failed batch call already touched is safe.
        return [_run_one(stage, item) for item in items]


def _run_one(stage: Callable[[list[WorkItem]], list[WorkItem]], item: WorkItem) -> WorkItem:
    try:
        return stage([item])[0]
    except StageSetupError:
        raise
    except Exception as exc:  # the sample itself is bad: drop it with the stage's error
        name = getattr(stage, "name", type(stage).__name__)
        item.drop(DropReason.STAGE_ERROR, f"{name}: {type(exc).__name__}: {exc}")
        item.error_message = f"{item.error_message} | {_last_frame()}"
        return item


def _last_frame() -> str:
    frames = traceback.extract_tb(sys.exc_info()[2])
    return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""


# ---------------------------------------------------------------------------------------------- output


def to_output(item: WorkItem) -> OutputSample:
    """The item's outcome as the shard writer's sample (kept only with an image, a record and a text)."""
    kept = item.alive and item.text is not None and item.record is not None and item.decoded is not None
    row = item.record.to_row() if item.record is not None else _dropped_row(item)
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
    meta = record_meta(item) if item.sample.fields or item.decoded is not None else {"url": item.sample.url}
    return {"key": item.key, "caption": item.sample.caption, **meta}


def shard_batches(items: Sequence[WorkItem], batch_size: int) -> list[list[WorkItem]]:
    """A shard's items in consecutive batches of `batch_size` from its start: the pipeline's batches.

    Every runner uses exactly these batches, so a stage whose output depends on its batch-mates (a
    detector's padding) computes the same thing wherever and however often it runs.
    """
    return [list(items[start : start + batch_size]) for start in range(0, len(items), batch_size)]
