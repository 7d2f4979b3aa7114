"""GroundingDINO's box selection in torch, on the model's device, vectorised over a batch of text passes.

The same phrase assignment, threshold, degenerate-box check and class-agnostic NMS as the readable
reference in `stages/grounding.py` (`assign_boxes`, `filter_candidates`, `nms`), and tested equal to it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grit_pipeline.records import Box, DropReason
from grit_pipeline.stages.grounding import (
    BoxFilter,
    GroundingResult,
    PhraseBox,
    ScoredBox,
    filter_candidates,
    iou_matrix,
)
from grit_pipeline.stages.prompts import TextPass


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
    """(batch, n, n) IoU of every pair of (batch, n, 4) corner boxes, computed as `iou_matrix` does."""
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
            overlaps = torch.from_numpy(np.stack([iou_matrix(c, c) for c in corners]))
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
