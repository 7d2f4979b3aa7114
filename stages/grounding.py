"""The grounder interface: (image, caption, phrases) in, boxes with scores per phrase out."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from grit_pipeline.records import Box, DropReason, GritRecord

if TYPE_CHECKING:
    from PIL import Image

    from grit_pipeline.stages.text import Phrase


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
    """Per phrase (same order as the request's phrases) the kept boxes; `drop_reason` set when none survived."""

    boxes: list[list[ScoredBox]]
    drop_reason: DropReason | None = None
    dropped: Counter[DropReason] = field(default_factory=Counter)
    info: dict[str, Any] = field(default_factory=dict)


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
        ious = _pairwise_iou(corners[start : start + block], corners)
        for row in range(ious.shape[0]):
            position = start + row
            if suppressed[position]:
                continue
            kept.append(candidates[order[position]])
            later = ious[row, position + 1 :] > iou_threshold
            suppressed[position + 1 :] |= later
    return kept


def _pairwise_iou(a: Any, b: Any) -> Any:
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


# ---------------------------------------------------------------------------------------------------------
# Prompts for GLIP-family detectors: "[CLS] chunk . chunk . [SEP]" within the text-token limit.
# ---------------------------------------------------------------------------------------------------------

# "." and "?" are the phrase delimiters of GroundingDINO (with [CLS]/[SEP]); inside a chunk they would split it.
_DELIMITER_CHARS = str.maketrans({".": " ", "?": " "})


@dataclass(slots=True)
class TextPass:
    """One text input of the model: token ids and, per prompt phrase in it, its token positions."""

    input_ids: list[int]
    phrase_tokens: list[list[int]] = field(default_factory=list)
    phrase_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class PromptPlan:
    """The text passes for one caption and, per prompt phrase, the request phrases it stands for."""

    passes: list[TextPass]
    phrase_targets: list[list[int]]
    truncated_phrases: int = 0


def prompt_text(chunk_text: str) -> str:
    """A chunk as it appears in the prompt: lower-cased, delimiters removed, whitespace collapsed."""
    return " ".join(chunk_text.translate(_DELIMITER_CHARS).lower().split())


def plan_prompts(
    chunk_texts: Sequence[str], tokenize: Any, special_ids: dict[str, int], max_text_tokens: int
) -> PromptPlan:
    """Pack a caption's chunks into "[CLS] chunk . chunk . [SEP]" passes of at most `max_text_tokens`.

    A chunk text repeated in the caption is prompted once and its boxes go to every occurrence. `tokenize`
    maps a list of strings to lists of token ids (no special tokens).
    """
    unique: dict[str, int] = {}
    targets: list[list[int]] = []
    for index, text in enumerate(prompt_text(t) for t in chunk_texts):
        if not text:
            continue
        if text not in unique:
            unique[text] = len(targets)
            targets.append([])
        targets[unique[text]].append(index)
    token_lists = tokenize(list(unique)) if unique else []
    longest_phrase = max_text_tokens - 3  # [CLS], its ".", [SEP]
    truncated = sum(len(tokens) > longest_phrase for tokens in token_lists)
    passes: list[TextPass] = []
    current = TextPass([special_ids["cls"]])
    for phrase_id, tokens in enumerate(token_lists):
        tokens = list(tokens[:longest_phrase])
        if len(current.input_ids) + len(tokens) + 2 > max_text_tokens:
            passes.append(_close(current, special_ids))
            current = TextPass([special_ids["cls"]])
        start = len(current.input_ids)
        current.input_ids.extend(tokens)
        current.input_ids.append(special_ids["dot"])
        current.phrase_tokens.append(list(range(start, start + len(tokens))))
        current.phrase_ids.append(phrase_id)
    if current.phrase_ids:
        passes.append(_close(current, special_ids))
    return PromptPlan(passes=passes, phrase_targets=targets, truncated_phrases=truncated)


def _close(text_pass: TextPass, special_ids: dict[str, int]) -> TextPass:
    text_pass.input_ids.append(special_ids["sep"])
    return text_pass


def ungroundable_result(num_phrases: int, reason: DropReason) -> GroundingResult:
    """A result with no box for any phrase, dropped for `reason` (missing image, no phrases, ...)."""
    return GroundingResult(boxes=[[] for _ in range(num_phrases)], drop_reason=reason, dropped=Counter({reason: 1}))


# ---------------------------------------------------------------------------------------------------------
# The same assignment and filter, vectorised over a batch of text passes (torch, on the model's device).
# Tested equal to `assign_boxes` + `result_from_candidates` above, which stay the reference.
# ---------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class SelectedBoxes:
    """One text pass's boxes that passed the threshold, on the host, highest score first (ties: query order).

    `rows` is a (n, 6) float64 array of (score, phrase column, x1, y1, x2, y2) with boxes already clamped;
    `keep` says which survive NMS (all True when NMS is left for later, e.g. across several passes);
    `degenerate` counts the boxes above the threshold that were dropped for having no area.
    """

    rows: Any
    keep: Any
    degenerate: int


def token_phrase_columns(text_passes: Sequence[TextPass], num_tokens: int) -> Any:
    """(passes, num_tokens) int64 array: each token's phrase column in its pass, or the spare column after the last.

    The spare column (index = the most phrases in any pass) collects [CLS], ".", [SEP] and padding, so
    their logits never score a phrase.
    """
    import numpy as np

    spare = max((len(p.phrase_tokens) for p in text_passes), default=0)
    columns = np.full((len(text_passes), num_tokens), spare, dtype=np.int64)
    for row, text_pass in enumerate(text_passes):
        for column, tokens in enumerate(text_pass.phrase_tokens):
            columns[row, [t for t in tokens if t < num_tokens]] = column
    return columns


def select_boxes(
    token_probs: Any, corner_boxes: Any, token_columns: Any, box_filter: BoxFilter, nms_rows: Sequence[bool]
) -> list[SelectedBoxes]:
    """`assign_boxes` then `filter_candidates` for a batch of passes at once, with one transfer to the host.

    `token_probs` (passes, queries, tokens) and `corner_boxes` (passes, queries, 4) float32 are torch
    tensors on any device; `token_columns` comes from `token_phrase_columns`. Rows whose `nms_rows` entry
    is False skip NMS (their request has other passes: NMS runs once all its boxes are merged).
    """
    import torch

    device = token_probs.device
    columns = torch.as_tensor(token_columns, device=device)
    passes, queries, tokens = token_probs.shape
    spare = int(token_columns.max()) if passes else 0  # the spare column's index = the most phrases in a pass
    if spare == 0:
        return [SelectedBoxes(rows=_empty_rows(), keep=_empty_rows()[:, 0] > 0, degenerate=0) for _ in range(passes)]
    index = columns[:, None, :tokens].expand(passes, queries, tokens)
    # max over each phrase's tokens in one scatter; probabilities are >= 0, so the zero start is harmless
    scores = token_probs.new_zeros((passes, queries, spare + 1))
    scores.scatter_reduce_(2, index, token_probs, reduce="amax", include_self=True)
    best_column = scores[..., :spare].argmax(-1)  # the first maximum: ties go to the earlier phrase
    best = scores.gather(-1, best_column[..., None]).squeeze(-1)
    boxes, usable, degenerate = _usable_boxes(corner_boxes.double(), best.double() > box_filter.box_threshold)
    order = torch.sort(torch.where(usable, best, -1.0), dim=1, descending=True, stable=True).indices
    counts = usable.sum(1)
    most = int(counts.max()) if passes else 0  # the one synchronisation before the transfer
    order = order[:, :most]
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    usable = usable.gather(1, order)
    keep = usable.clone()
    if box_filter.nms_iou is not None and most > 1:
        rows = torch.tensor([i for i, flag in enumerate(nms_rows) if flag], dtype=torch.long, device=device)
        if rows.numel():
            keep[rows] = greedy_nms_keep(boxes[rows], usable[rows], box_filter.nms_iou)
    packed = torch.cat(
        (best.double().gather(1, order)[..., None], best_column.gather(1, order)[..., None].double(), boxes,
         keep[..., None].double()), dim=-1,
    )
    host = torch.cat((packed.flatten(), counts.double(), degenerate.sum(1).double())).cpu().numpy()
    rows_end = passes * most * 7
    table = host[:rows_end].reshape(passes, most, 7)
    counts_host = host[rows_end : rows_end + passes].astype(int)
    degenerate_host = host[rows_end + passes :].astype(int)
    return [
        SelectedBoxes(rows=table[row, : counts_host[row], :6], keep=table[row, : counts_host[row], 6] > 0,
                      degenerate=int(degenerate_host[row]))
        for row in range(passes)
    ]


def _empty_rows() -> Any:
    import numpy as np

    return np.zeros((0, 6), dtype=np.float64)


def _usable_boxes(corners: Any, passing: Any) -> tuple[Any, Any, Any]:
    """Boxes as `filter_candidates` uses them: out-of-range ones clamped; (boxes, usable, degenerate) masks.

    Mirrors Box.is_valid / clamped / is_degenerate: a finite box outside [0, 1] is clamped, and a box
    with no area after that (or a non-finite one) is degenerate. Only boxes above the threshold count.
    """
    import torch

    finite = torch.isfinite(corners).all(-1)
    x1, y1, x2, y2 = corners.unbind(-1)
    in_range = ((corners >= 0) & (corners <= 1)).all(-1)
    valid = finite & (x2 > x1) & (y2 > y1) & in_range
    # "+ 0.0" turns a clamped -0.0 into 0.0, as Python's min(1.0, max(0.0, v)) does
    boxes = torch.where(valid[..., None], corners, corners.clamp(0.0, 1.0) + 0.0)
    has_area = finite & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    return boxes, passing & has_area, passing & ~has_area


def pairwise_iou(boxes: Any) -> Any:
    """(batch, n, n) IoU of every pair of (batch, n, 4) corner boxes, computed as `_pairwise_iou` does."""
    import torch

    x1, y1, x2, y2 = (v.unsqueeze(2) for v in boxes.unbind(-1))
    width = (torch.minimum(x2, x2.transpose(1, 2)) - torch.maximum(x1, x1.transpose(1, 2))).clamp_(min=0)
    height = (torch.minimum(y2, y2.transpose(1, 2)) - torch.maximum(y1, y1.transpose(1, 2))).clamp_(min=0)
    inter = width.mul_(height)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    union = area + area.transpose(1, 2) - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(inter))


def greedy_nms_keep(boxes: Any, usable: Any, iou_threshold: float, by_rounds: bool | None = None) -> Any:
    """Greedy NMS keep-mask for (batch, n, 4) boxes sorted highest score first; exact, no per-box Python loop.

    `usable` (batch, n) marks real candidates (the rest are padding). Greedy NMS keeps box i when no kept
    box before it overlaps it above the threshold; that rule has one fixed point, reached by iterating
    it from "keep everything" (box i is settled once the boxes before it are, usually in a few rounds).
    On the CPU (`by_rounds` None or False), a loop over the suppression matrix's rows is cheaper than
    repeated matrix passes; on an accelerator the rounds avoid a per-box loop and a per-box transfer.
    Rows are processed in groups that bound the (n x n) temporaries to about 32 MB each.
    """
    import numpy as np
    import torch

    count = boxes.shape[1]
    keep = usable.clone()
    if count < 2:
        return keep
    later = torch.ones((count, count), dtype=torch.bool, device=boxes.device).triu_(1)
    if by_rounds is None:
        by_rounds = boxes.device.type != "cpu"
    group = max(1, (4 << 20) // (count * count))
    for start in range(0, boxes.shape[0], group):
        part = slice(start, start + group)
        candidates = usable[part]
        if not by_rounds:  # numpy's broadcasting is cheaper than torch's on the CPU; same formula, same IoUs
            corners = boxes[part].cpu().numpy()
            overlaps = torch.from_numpy(np.stack([_pairwise_iou(c, c) for c in corners]))
            suppresses = (overlaps > iou_threshold) & later.cpu()
            suppresses &= candidates[:, :, None].cpu() & candidates[:, None, :].cpu()
            keep[part] = torch.from_numpy(_greedy_scan(suppresses.numpy(), candidates.cpu().numpy())).to(keep.device)
            continue
        suppresses = (pairwise_iou(boxes[part]) > iou_threshold) & later
        suppresses &= candidates[:, :, None] & candidates[:, None, :]
        current = candidates
        for _ in range(count + 1):  # converges long before: the number of rounds is bounded by n
            following = candidates & ~(suppresses & current[:, :, None]).any(1)
            if torch.equal(following, current):
                break
            current = following
        keep[part] = current
    return keep


def _greedy_scan(suppresses: Any, candidates: Any) -> Any:
    """Greedy NMS on a (batch, n, n) boolean suppression matrix, in order; only kept boxes cost an update."""
    import numpy as np

    keep = np.zeros_like(candidates)
    for row in range(candidates.shape[0]):
        removed = ~candidates[row]
        for box in range(candidates.shape[1]):
            if not removed[box]:
                keep[row, box] = True
                removed |= suppresses[row, box]
    return keep


def result_from_selected(
    selections: Sequence[tuple[SelectedBoxes, Sequence[int]]],
    phrase_targets: Sequence[Sequence[int]],
    num_phrases: int,
    box_filter: BoxFilter,
) -> GroundingResult:
    """A request's result from its passes' selected boxes (as `result_from_candidates` would give it).

    Each selection comes with its pass's `phrase_ids` (column -> prompt phrase). One pass: its NMS verdict
    is used as it is. Several passes: their boxes are merged in pass order and filtered together.
    """
    counts: Counter[DropReason] = Counter()
    degenerate = sum(selection.degenerate for selection, _ in selections)
    if degenerate:
        counts[DropReason.DEGENERATE_BOX] += degenerate
    if len(selections) == 1:
        selection, phrase_ids = selections[0]
        kept = [(phrase_ids[int(r[1])], r) for r in selection.rows[selection.keep].tolist()]
    else:
        merged = [
            PhraseBox(phrase_ids[int(r[1])], Box(r[2], r[3], r[4], r[5]), r[0])
            for selection, phrase_ids in selections
            for r in selection.rows.tolist()
        ]
        survivors = filter_candidates(merged, box_filter)  # already clamped and above the threshold
        kept = [(c.phrase, (c.score, 0, *c.box.as_tuple())) for c in survivors]
    boxes: list[list[ScoredBox]] = [[] for _ in range(num_phrases)]
    for phrase, (score, _, x1, y1, x2, y2) in kept:
        scored = ScoredBox(Box(x1, y1, x2, y2), score)
        for target in phrase_targets[phrase]:
            boxes[target].append(scored)
    result = GroundingResult(boxes=boxes, dropped=counts)
    if not any(boxes):
        result.drop_reason = DropReason.NO_BOX_ABOVE_THRESHOLD
        counts[DropReason.NO_BOX_ABOVE_THRESHOLD] += 1
    return result
