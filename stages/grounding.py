"""Grounding: the grounder interface ((image, caption, phrases) in, boxes with scores per phrase out), the
paper's filter as readable reference code (phrase assignment, threshold, class-agnostic NMS), and the
ground stage, which hands each item to the grounder that fits it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from grit_pipeline.records import Box, DropReason, GritRecord
from grit_pipeline.stages.base import CHEAP_CPUS, Resources, StageSetupError

if TYPE_CHECKING:
    from PIL import Image

    from grit_pipeline.config import BuildConfig
    from grit_pipeline.stages.text import Phrase
    from grit_pipeline.work import WorkItem

GROUNDER_ANNOTATIONS = "annotations"
GROUNDER_GROUNDING_DINO = "grounding-dino"
GROUNDERS = (GROUNDER_GROUNDING_DINO, GROUNDER_ANNOTATIONS)
AGREEMENT = "agreement"  # the second detector that confirms GroundingDINO's boxes (stages/agreement.py)


@dataclass(frozen=True, slots=True)
class ScoredBox:
    """A box proposed for one phrase, with the grounder's confidence in [0, 1]."""

    box: Box
    score: float


@dataclass(frozen=True, slots=True)
class Annotation:
    """A box supplied with the input (COCO-style instance or a GRIT-20M entry).

    `span`, when given, binds the box to the noun chunk that overlaps it; otherwise `category` is matched
    to chunk heads (with a small synonym table).
    """

    category: str
    box: Box
    score: float = 1.0
    span: tuple[int, int] | None = None


@dataclass(slots=True)
class GroundingRequest:
    """One image-text pair to ground: the decoded image (None for annotation-only grounders) and its phrases."""

    key: str
    caption: str
    phrases: list[Phrase]
    image: Image.Image | None = None
    annotations: list[Annotation] | None = None
    source_record: GritRecord | None = None


@dataclass(slots=True)
class GroundingResult:
    """Per phrase (same order as the request's phrases) the kept boxes; `drop_reason` set when none survived.

    `error`: why the grounder failed on this request (with STAGE_ERROR); it becomes the sample's error_message.
    """

    boxes: list[list[ScoredBox]]
    drop_reason: DropReason | None = None
    dropped: Counter[DropReason] = field(default_factory=Counter)
    error: str | None = None


class Grounder(Protocol):
    """Anything that grounds a batch of requests; loaded once per worker."""

    def ground(self, batch: Sequence[GroundingRequest]) -> list[GroundingResult]:
        """Ground every request of the batch."""
        ...

    def describe(self) -> dict[str, Any]:
        """Provenance for the manifest: grounder kind, model id, revision or weights hash, thresholds."""
        ...


# ---------------------------------------------------------------------------------------------------------
# Shared filtering logic (pure Python/numpy, no model): what every grounder applies to its raw boxes.
# ---------------------------------------------------------------------------------------------------------

BOX_THRESHOLD_DEFAULT = 0.65
"""GRIT keeps chunk-box pairs with score strictly above 0.65 (paper, section 2)."""

NMS_IOU_DEFAULT = 0.6
"""Class-agnostic NMS IoU threshold for detector boxes; the GRIT value is unpublished.

0.6 is the NMS threshold of GLIP's own post-processing (`MODEL.ATSS.NMS_TH = 0.6` in GLIP/maskrcnn-benchmark),
the detector GRIT was built with. It removes the duplicate boxes that different chunks of one caption get
for the same object ("a man" / "the groom"), while nested objects ("a shirt" inside "a man", IoU usually
well under 0.6) and neighbouring instances keep their boxes.
"""


@dataclass(frozen=True, slots=True)
class BoxFilter:
    """The paper's filter: keep boxes with score > `box_threshold`, then class-agnostic NMS (None = off)."""

    box_threshold: float = BOX_THRESHOLD_DEFAULT
    nms_iou: float | None = NMS_IOU_DEFAULT

    def __post_init__(self) -> None:
        if not 0.0 <= self.box_threshold < 1.0:
            raise ValueError(f"box_threshold must be in [0, 1), got {self.box_threshold}")
        if self.nms_iou is not None and not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1] or None, got {self.nms_iou}")


@dataclass(frozen=True, slots=True)
class PhraseBox:
    """A candidate box for one prompt phrase (an index into the grounder's own phrase list), with its score."""

    phrase: int
    box: Box
    score: float


def nms(candidates: Sequence[PhraseBox], iou_threshold: float) -> list[PhraseBox]:
    """Greedy class-agnostic NMS: highest score first; a box overlapping a kept one above the IoU is removed.

    Ties in score keep the earlier candidate, so the result is deterministic. The pairwise IoUs are
    computed in one numpy pass (in blocks of rows for very many boxes).
    """
    import numpy as np

    if not candidates:
        return []
    order = sorted(range(len(candidates)), key=lambda i: (-candidates[i].score, i))
    corners = np.array([candidates[i].box.as_tuple() for i in order], dtype=np.float64)
    suppressed = np.zeros(len(order), dtype=bool)
    kept: list[PhraseBox] = []
    block = 512
    for start in range(0, len(order), block):
        ious = iou_matrix(corners[start : start + block], corners)
        for row in range(ious.shape[0]):
            position = start + row
            if suppressed[position]:
                continue
            kept.append(candidates[order[position]])
            later = ious[row, position + 1 :] > iou_threshold
            suppressed[position + 1 :] |= later
    return kept


def iou_matrix(a: Any, b: Any) -> Any:
    """IoU of every box in `a` (n, 4) with every box in `b` (m, 4), as an (n, m) array."""
    import numpy as np

    width = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    height = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = width * height
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def filter_candidates(
    candidates: Sequence[PhraseBox], box_filter: BoxFilter, dropped: Counter[DropReason] | None = None
) -> list[PhraseBox]:
    """Threshold then class-agnostic NMS over all boxes of one image, highest score first.

    Thresholding first gives the same survivors as NMS first (a box under the threshold can never suppress
    a higher-scored one in greedy NMS) and keeps NMS cheap. Degenerate boxes are counted and removed.
    """
    usable: list[PhraseBox] = []
    for candidate in candidates:
        box = candidate.box
        if not box.is_valid():
            box = box.clamped() if box.is_finite() else box
            if box.is_degenerate():
                if dropped is not None:
                    dropped[DropReason.DEGENERATE_BOX] += 1
                continue
            candidate = PhraseBox(candidate.phrase, box, candidate.score)
        if candidate.score > box_filter.box_threshold:
            usable.append(candidate)
    if box_filter.nms_iou is None:
        return sorted(usable, key=lambda c: -c.score)
    return nms(usable, box_filter.nms_iou)


def result_from_candidates(
    candidates: Sequence[PhraseBox],
    phrase_targets: Sequence[Sequence[int]],
    num_phrases: int,
    box_filter: BoxFilter,
    dropped: Counter[DropReason] | None = None,
) -> GroundingResult:
    """Filter one image's candidates and hand the survivors to the request's phrases.

    `phrase_targets[p]` lists the request phrase indices (< `num_phrases`) that candidate phrase `p` stands
    for (several when one chunk text repeats in the caption: each occurrence gets the boxes). The pair is
    dropped with NO_BOX_ABOVE_THRESHOLD when no phrase keeps a box.
    """
    counts: Counter[DropReason] = Counter() if dropped is None else dropped
    boxes: list[list[ScoredBox]] = [[] for _ in range(num_phrases)]
    for kept in filter_candidates(candidates, box_filter, counts):
        for target in phrase_targets[kept.phrase]:
            boxes[target].append(ScoredBox(kept.box, kept.score))
    result = GroundingResult(boxes=boxes, dropped=counts)
    if not any(boxes):
        result.drop_reason = DropReason.NO_BOX_ABOVE_THRESHOLD
        counts[DropReason.NO_BOX_ABOVE_THRESHOLD] += 1
    return result


def phrase_scores(token_probs: Any, phrase_tokens: Sequence[Sequence[int]]) -> Any:
    """Per query and phrase, the maximum token probability over the phrase's tokens.

    `token_probs` is a (queries, text_tokens) array of sigmoid scores; the result is (queries, phrases),
    with 0 for a phrase that has no token (it can never win).
    """
    import numpy as np

    probs = np.asarray(token_probs, dtype=np.float32)
    scores = np.zeros((probs.shape[0], len(phrase_tokens)), dtype=np.float32)
    for column, tokens in enumerate(phrase_tokens):
        if len(tokens):
            scores[:, column] = probs[:, list(tokens)].max(axis=1)
    return scores


def assign_boxes(
    token_probs: Any,
    corner_boxes: Any,
    phrase_tokens: Sequence[Sequence[int]],
    phrase_ids: Sequence[int],
    min_score: float = float("-inf"),
) -> list[PhraseBox]:
    """Each predicted box goes to the phrase with the highest score (max sigmoid over its tokens).

    `token_probs` is (queries, text_tokens); `corner_boxes` is (queries, 4) normalised (x1, y1, x2, y2);
    `phrase_ids[j]` names the phrase whose token positions are `phrase_tokens[j]`. Ties go to the earlier
    phrase. Queries whose best score is not above `min_score` are skipped (they could never pass the
    threshold). Decoded text labels are never used.
    """
    import numpy as np

    if not phrase_tokens:
        return []
    scores = phrase_scores(token_probs, phrase_tokens)
    best = scores.argmax(axis=1)
    best_scores = scores[np.arange(scores.shape[0]), best]
    keep = np.flatnonzero(best_scores > min_score)
    corners = np.asarray(corner_boxes, dtype=np.float64)[keep].tolist()
    return [
        PhraseBox(phrase_ids[column], Box(*box), score)
        for column, box, score in zip(best[keep].tolist(), corners, best_scores[keep].tolist(), strict=True)
    ]


def ungroundable_result(num_phrases: int, reason: DropReason) -> GroundingResult:
    """A result with no box for any phrase, dropped for `reason` (missing image, no phrases, ...)."""
    return GroundingResult(boxes=[[] for _ in range(num_phrases)], drop_reason=reason, dropped=Counter({reason: 1}))


class GroundStage:
    """Boxes for every phrase: the configured grounder; records that carry GRIT-20M entries are re-grounded
    from those entries by the annotation grounder. Grounders load on first use, so a GRIT-20M download
    never loads the detector."""

    name = "ground"

    def __init__(self, config: BuildConfig) -> None:
        self.config = config
        gpus = config.gpus_per_grounder
        # its own pool of `grounder_workers` actors on Ray; little CPU of its own (the forward is the work)
        self.resources = Resources(cpus=CHEAP_CPUS, gpus=gpus, workers=config.grounder_workers)
        self._grounders: dict[str, tuple[Grounder, dict[str, Any]]] = {}

    def setup(self) -> None:
        """Nothing eager: each grounder loads with its first batch (a GRIT-20M download never loads the
        detector); a grounder that cannot load raises StageSetupError then."""

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
            if self.config.agreement.enabled and self.config.grounder == GROUNDER_GROUNDING_DINO:
                self._confirm([i for i in from_text if i.alive and i.grounding is not None])
        if from_source:
            self._ground(*self.grounder(GROUNDER_ANNOTATIONS), from_source)
        for item in items:
            item.release_pixels()  # no later stage needs them: the writer takes the stored bytes
        return items

    def _confirm(self, items: list[WorkItem]) -> None:
        """Keep only the boxes the agreement detector confirms (stages/agreement.py)."""
        from grit_pipeline.stages.agreement import confirmed

        second, _ = self.grounder(AGREEMENT)
        requests = [grounding_request(item) for item in items]
        for item, check in zip(items, second.ground(requests), strict=True):
            if check.error is not None:  # the second detector failed on this sample: it cannot confirm it
                item.drop(DropReason.STAGE_ERROR, f"agreement: {check.error}")
                continue
            item.grounding, _ = confirmed(item.grounding, check, self.config.agreement.iou)
            item.set_drops(self.name, item.grounding.dropped)
            if item.grounding.drop_reason is not None:
                item.drop(item.grounding.drop_reason)

    def _ground(self, grounder: Grounder, description: dict[str, Any], items: list[WorkItem]) -> None:
        requests = [grounding_request(item) for item in items]
        for item, request, result in zip(items, requests, grounder.ground(requests), strict=True):
            item.grounder = description
            item.grounding = result
            item.set_drops(self.name, result.dropped)
            if item.phrases is None:
                item.phrases = list(request.phrases)
            if result.drop_reason is not None:
                item.drop(result.drop_reason, result.error)


def grounding_request(item: WorkItem) -> GroundingRequest:
    """The grounder's view of an item: caption, phrases, decoded image, supplied annotations, source record."""
    from grit_pipeline.stages.annotations import phrases_from_record

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


def make_grounder(config: BuildConfig, kind: str) -> Grounder:
    """The grounder named `kind` (or the agreement detector, `AGREEMENT`), loaded once per worker."""
    if kind == AGREEMENT:
        from dataclasses import replace

        from grit_pipeline.stages.groundingdino import GroundingDinoGrounder

        return GroundingDinoGrounder(replace(config.grounding, detector=config.agreement.detector, revision=None))
    if kind == GROUNDER_ANNOTATIONS:
        from grit_pipeline.stages.annotations import AnnotationGrounder

        return AnnotationGrounder(config.annotations)
    if kind == GROUNDER_GROUNDING_DINO:
        from grit_pipeline.stages.groundingdino import GroundingDinoGrounder

        return GroundingDinoGrounder(config.grounding)
    raise ValueError(f"unknown grounder {kind!r}; expected one of {GROUNDERS}")
