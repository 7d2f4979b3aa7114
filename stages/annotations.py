"""The annotation grounder: boxes supplied with the input instead of a detector.

Two sources:
- released GRIT-20M rows (`request.source_record`): their noun_chunks/ref_exps boxes are re-serialised, bound
  to the request's phrases by span;
- COCO-style instances (`request.annotations`): bound by `span` when given, else matched to chunk heads
  through a small synonym table (man/woman/child -> person, puppy -> dog, ...).

Annotations are ground truth, so by default no NMS is applied (two people standing close together are two
boxes, not a duplicate); the score threshold still applies to each annotation's score (default 1.0, so
unscored annotations always pass, while GRIT-20M rows keep their detector scores).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from grit_pipeline.records import Box, DropReason, GritRecord, Span
from grit_pipeline.stages.grounding import (
    BOX_THRESHOLD_DEFAULT,
    Annotation,
    BoxFilter,
    GroundingRequest,
    GroundingResult,
    PhraseBox,
    result_from_candidates,
    ungroundable_result,
)

# head word (or category name) -> canonical category; COCO names on the right
SYNONYMS: dict[str, str] = {
    **dict.fromkeys(
        "man men woman women child children kid kids boy boys girl girls baby babies people person persons "
        "guy guys lady ladies adult adults toddler toddlers gentleman gentlemen teenager teenagers "
        "player players bride groom student students worker workers".split(),
        "person",
    ),
    **dict.fromkeys("puppy puppies pup pups doggy dog dogs".split(), "dog"),
    **dict.fromkeys("kitten kittens kitty cat cats".split(), "cat"),
    **dict.fromkeys("pony ponies foal horse horses".split(), "horse"),
    **dict.fromkeys("calf calves cattle cow cows bull".split(), "cow"),
    **dict.fromkeys("lamb lambs sheep".split(), "sheep"),
    **dict.fromkeys("bike bikes bicycle bicycles".split(), "bicycle"),
    **dict.fromkeys("motorbike motorbikes motorcycle motorcycles".split(), "motorcycle"),
    **dict.fromkeys("plane planes aeroplane airplane airplanes jet jets aircraft".split(), "airplane"),
    **dict.fromkeys("automobile automobiles car cars".split(), "car"),
    **dict.fromkeys("sofa sofas couch couches".split(), "couch"),
    **dict.fromkeys("television televisions tv".split(), "tv"),
    **dict.fromkeys("phone phones cellphone smartphone".split(), "cell phone"),
    **dict.fromkeys("laptop laptops notebook".split(), "laptop"),
    **dict.fromkeys("ship ships boat boats".split(), "boat"),
    **dict.fromkeys("plant plants houseplant".split(), "potted plant"),
    **dict.fromkeys("table tables desk".split(), "dining table"),
    **dict.fromkeys("ball balls football soccer".split(), "sports ball"),
    "mice": "mouse",
    "teddy": "teddy bear",
    "doughnut": "donut",
    "hydrant": "fire hydrant",
}


@dataclass(frozen=True, slots=True)
class AnnotationConfig:
    """Filtering of supplied boxes: threshold on their score; NMS off by default (they are ground truth)."""

    box_threshold: float = BOX_THRESHOLD_DEFAULT
    nms_iou: float | None = None

    def __post_init__(self) -> None:
        self.box_filter()

    def box_filter(self) -> BoxFilter:
        """The shared filter with this config's values."""
        return BoxFilter(box_threshold=self.box_threshold, nms_iou=self.nms_iou)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)


def _singular_forms(word: str) -> list[str]:
    forms = [word]
    if word.endswith("ies") and len(word) > 4:
        forms.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        forms.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        forms.append(word[:-1])
    return forms


def normalize_name(name: str) -> str:
    """Lower case, '_' and '-' as spaces, whitespace collapsed."""
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def word_forms(name: str) -> frozenset[str]:
    """The name and its naive singulars."""
    return frozenset(_singular_forms(normalize_name(name)))


def concepts(name: str) -> frozenset[str]:
    """Canonical categories a word or category name can stand for (through SYNONYMS, else itself)."""
    return frozenset(SYNONYMS.get(form, form) for form in word_forms(name))


def _head_of(phrase: Any, caption: str) -> str:
    head = getattr(phrase, "head", "") or ""
    if head:
        return head.lower()
    words = re.findall(r"[A-Za-z]+", caption[phrase.chunk.start : phrase.chunk.end])
    return words[-1].lower() if words else ""


def match_category(category: str, phrases: Sequence[Any], caption: str) -> list[int] | None:
    """The phrase indices an unspanned annotation binds to; [] when none matches, None when ambiguous.

    Exact matches (same head word up to plural, or a multi-word category in the chunk text) win, and the
    box goes to each of them (repeated mentions of one thing). Otherwise synonym matches are used only when
    they all share one head word: "person" in "a man and a woman" could be either, so it is not bound.
    """
    name = normalize_name(category)
    heads = [_head_of(p, caption) for p in phrases]
    exact = [
        i
        for i, (p, head) in enumerate(zip(phrases, heads, strict=True))
        if word_forms(head) & word_forms(name)
        or (" " in name and re.search(rf"\b{re.escape(name)}\b", caption[p.chunk.start : p.chunk.end].lower()))
    ]
    if exact:
        return exact
    wanted = concepts(name)
    by_synonym = [i for i, head in enumerate(heads) if concepts(head) & wanted]
    if len({heads[i] for i in by_synonym}) > 1:
        return None
    return by_synonym


def match_span(span: Span, phrases: Sequence[Any]) -> int | None:
    """The phrase whose chunk (else expression) overlaps `span` the most; None when none overlaps."""
    for attribute in ("chunk", "expression"):
        overlaps = [
            (min(span.end, getattr(p, attribute).end) - max(span.start, getattr(p, attribute).start), -i)
            for i, p in enumerate(phrases)
            if getattr(p, attribute).overlaps(span)
        ]
        if overlaps:
            return -max(overlaps)[1]
    return None


def record_candidates(
    record: GritRecord, phrases: Sequence[Any], dropped: Counter[DropReason]
) -> list[PhraseBox]:
    """Candidates from a GRIT-20M row's entries, each bound to the phrase with the same (or overlapping) span."""
    by_chunk = {p.chunk: i for i, p in reversed(list(enumerate(phrases)))}
    by_expression = {p.expression: i for i, p in reversed(list(enumerate(phrases)))}
    candidates = []
    for index, entry in enumerate(record.noun_chunks):
        expression = record.ref_exps[index].span if index < len(record.ref_exps) else None
        target = by_chunk.get(entry.span)
        if target is None and expression is not None:
            target = by_expression.get(expression)
        if target is None:
            target = match_span(entry.span, phrases)
        if target is None:
            dropped[DropReason.NO_MATCHING_ANNOTATION] += 1
            continue
        candidates.append(PhraseBox(target, entry.box, entry.score))
    return candidates


def annotation_candidates(
    annotations: Sequence[Annotation], phrases: Sequence[Any], caption: str, dropped: Counter[DropReason]
) -> list[PhraseBox]:
    """Candidates from COCO-style instances: by span when given, else by category against chunk heads."""
    candidates = []
    for annotation in annotations:
        if annotation.span is not None:
            target = match_span(Span(*annotation.span), phrases)
            targets = [] if target is None else [target]
        else:
            targets = match_category(annotation.category, phrases, caption) or []
        if not targets:
            dropped[DropReason.NO_MATCHING_ANNOTATION] += 1
        candidates.extend(PhraseBox(t, annotation.box, annotation.score) for t in targets)
    return candidates


class AnnotationGrounder:
    """Grounds with boxes supplied by the input record (GRIT-20M entries or COCO-style annotations)."""

    def __init__(self, config: AnnotationConfig | None = None):
        self.config = config or AnnotationConfig()
        self._box_filter = self.config.box_filter()

    def ground(self, batch: Sequence[GroundingRequest]) -> list[GroundingResult]:
        """Ground every request from its own annotations; no image is needed."""
        return [self.ground_one(request) for request in batch]

    def ground_one(self, request: GroundingRequest) -> GroundingResult:
        """Bind one request's supplied boxes to its phrases, then apply the threshold (and NMS if set)."""
        phrases = request.phrases
        if not phrases:
            return ungroundable_result(0, DropReason.NO_NOUN_CHUNKS)
        dropped: Counter[DropReason] = Counter()
        record = request.source_record
        if record is not None and record.noun_chunks:
            candidates = record_candidates(record, phrases, dropped)
        else:
            candidates = annotation_candidates(request.annotations or [], phrases, request.caption, dropped)
        if not candidates:
            result = ungroundable_result(len(phrases), DropReason.NO_MATCHING_ANNOTATION)
            result.dropped.update(dropped)
            return result
        identity = [[i] for i in range(len(phrases))]
        return result_from_candidates(candidates, identity, len(phrases), self._box_filter, dropped)

    def describe(self) -> dict[str, Any]:
        """Provenance for the manifest."""
        return {"grounder": "annotations", "synonyms": len(SYNONYMS), **self.config.to_dict()}


def phrases_from_record(record: GritRecord) -> list[Any]:
    """The phrases a GRIT-20M row already carries: one per distinct (chunk, expression) pair, in row order."""
    from grit_pipeline.stages.text import Phrase

    seen: dict[tuple[Span, Span], None] = {}
    for index, entry in enumerate(record.noun_chunks):
        expression = record.ref_exps[index].span if index < len(record.ref_exps) else entry.span
        seen.setdefault((entry.span, expression), None)
    phrases = []
    for chunk, expression in seen:
        words = re.findall(r"[A-Za-z]+", chunk.text(record.caption))
        phrases.append(Phrase(chunk=chunk, expression=expression, head=words[-1].lower() if words else ""))
    return phrases


_BOX_TOLERANCE = 1e-3  # normalised boxes a rounding error outside [0, 1] are clamped, not rejected


def parse_annotations(
    obj: Any, width: int | None, height: int | None, dropped: Counter[DropReason] | None = None
) -> list[Annotation]:
    """Annotations from input JSON: `{"annotations": [...]}` or the list itself.

    Each item is `{"category": str, "box": [x1, y1, x2, y2]}` (normalised, top-left/bottom-right) or the
    COCO form `{"category": str, "bbox": [x, y, w, h]}` in pixels of the width x height image; optional
    `"score"` in [0, 1] and `"span": [start, end]`. Bad items are counted in `dropped` and skipped.
    """
    counts = dropped if dropped is not None else Counter()
    items = obj.get("annotations") if isinstance(obj, Mapping) else obj
    if items is None:
        return []
    if not isinstance(items, list):
        counts[DropReason.MALFORMED_RECORD] += 1
        return []
    annotations = []
    for item in items:
        try:
            annotation = _parse_annotation(item, width, height)
        except ValueError:
            counts[DropReason.MALFORMED_RECORD] += 1
            continue
        if annotation.box.is_degenerate():
            counts[DropReason.DEGENERATE_BOX] += 1
            continue
        annotations.append(annotation)
    return annotations


def _numbers(value: Any, count: int, name: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise ValueError(f"{name} must be a list of {count} numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise ValueError(f"{name} must hold finite numbers")
    return [float(v) for v in value]


def _parse_annotation(item: Any, width: int | None, height: int | None) -> Annotation:
    if not isinstance(item, Mapping):
        raise ValueError("annotation must be an object")
    category = item.get("category")
    if not isinstance(category, str) or not category.strip():
        raise ValueError("category must be a non-empty string")
    if "box" in item:
        coords = _numbers(item["box"], 4, "box")
        if any(v < -_BOX_TOLERANCE or v > 1 + _BOX_TOLERANCE for v in coords):
            raise ValueError("box must be normalised to [0, 1]")
        box = Box(*coords).clamped()
    elif "bbox" in item:
        if not width or not height:
            raise ValueError("a pixel bbox needs the image size")
        box = Box.from_xywh_pixels(*_numbers(item["bbox"], 4, "bbox"), width, height).clamped()
    else:
        raise ValueError("annotation needs box or bbox")
    score = _numbers([item.get("score", 1.0)], 1, "score")[0]
    if not 0.0 <= score <= 1.0:
        raise ValueError("score must be in [0, 1]")
    span = None
    if item.get("span") is not None:
        start, end = _numbers(item["span"], 2, "span")
        if not (start.is_integer() and end.is_integer() and 0 <= start < end):
            raise ValueError("span must be [start, end] with 0 <= start < end")
        span = (int(start), int(end))
    return Annotation(category=category.strip(), box=box, score=score, span=span)
