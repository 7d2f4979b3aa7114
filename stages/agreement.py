"""Cross-detector agreement (as GranD keeps a box only when a second detector agrees): a box the grounder
found is kept only when a second detector, prompted with the same phrases on the same image, has a box for
the same phrase with IoU >= `iou` (GranD: 0.65). Off unless `--agreement-detector` names a checkpoint."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any

from grit_pipeline.records import DropReason
from grit_pipeline.stages.grounding import GroundingResult

AGREEMENT_IOU_DEFAULT = 0.65


@dataclass(frozen=True, slots=True)
class AgreementConfig:
    """The second detector (a GroundingDINO checkpoint: hub id or local folder; None: off) and the IoU."""

    detector: str | None = None
    iou: float = AGREEMENT_IOU_DEFAULT

    def __post_init__(self) -> None:
        if not 0.0 < self.iou <= 1.0:
            raise ValueError(f"agreement iou must be in (0, 1], got {self.iou}")

    @property
    def enabled(self) -> bool:
        """True when a second detector is configured."""
        return self.detector is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)


def confirmed(result: GroundingResult, second: GroundingResult, iou: float) -> tuple[GroundingResult, int]:
    """`result` keeping only the boxes `second` confirms (same phrase, IoU >= `iou`), and how many it removed.

    A sample left with no box is dropped (`no_box_confirmed`); its removed boxes count as `box_not_confirmed`.
    """
    kept_boxes, removed = [], 0
    for phrase_boxes, second_boxes in zip(result.boxes, second.boxes, strict=True):
        kept = [b for b in phrase_boxes if any(b.box.iou(s.box) >= iou for s in second_boxes)]
        removed += len(phrase_boxes) - len(kept)
        kept_boxes.append(kept)
    dropped = Counter(result.dropped)
    if removed:
        dropped[DropReason.BOX_NOT_CONFIRMED] += removed
    drop_reason = result.drop_reason
    if drop_reason is None and not any(kept_boxes):
        drop_reason = DropReason.NO_BOX_CONFIRMED
    return replace(result, boxes=kept_boxes, dropped=dropped, drop_reason=drop_reason), removed
