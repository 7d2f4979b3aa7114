"""Box-quality filters, between grounding and assembly: whole-image boxes, boxes too small to see in the stored
pixels, too many boxes for one phrase, images too small to train on. Every filter is off by default (the
shards stay exactly what GRIT's recipe writes); `--quality strict` turns on `STRICT` (docs/output-format.md).

A removed box is a counted span drop (`box_too_large`, `box_too_small`, `too_many_boxes`); an image under the
minimum stored side is a sample drop (`image_too_small_for_quality`), and so is a sample that lost every box
(`no_box_after_quality_filters`), never silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from grit_pipeline.records import Box, DropReason
from grit_pipeline.stages.base import CHEAP_CPUS, Resources

if TYPE_CHECKING:
    from grit_pipeline.config import BuildConfig
    from grit_pipeline.stages.grounding import ScoredBox
    from grit_pipeline.work import WorkItem


@dataclass(frozen=True, slots=True)
class QualityConfig:
    """The box-quality filters; each None is off.

    max_box_area_fraction: a box covering more than this fraction of the image is removed (whole-image boxes).
    min_box_side_px: a box whose shorter side is under this many STORED pixels is removed.
    max_boxes_per_phrase: a phrase keeps at most this many boxes, the highest-scoring (earlier on ties).
    min_image_side_px: a sample whose stored image has a side under this is dropped.
    """

    max_box_area_fraction: float | None = None
    min_box_side_px: float | None = None
    max_boxes_per_phrase: int | None = None
    min_image_side_px: int | None = None

    def __post_init__(self) -> None:
        if self.max_box_area_fraction is not None and not 0.0 < self.max_box_area_fraction <= 1.0:
            raise ValueError(f"max_box_area_fraction must be in (0, 1], got {self.max_box_area_fraction}")
        if self.min_box_side_px is not None and self.min_box_side_px < 0:
            raise ValueError(f"min_box_side_px must be >= 0, got {self.min_box_side_px}")
        if self.max_boxes_per_phrase is not None and self.max_boxes_per_phrase < 1:
            raise ValueError(f"max_boxes_per_phrase must be >= 1, got {self.max_boxes_per_phrase}")
        if self.min_image_side_px is not None and self.min_image_side_px < 1:
            raise ValueError(f"min_image_side_px must be >= 1, got {self.min_image_side_px}")

    @property
    def active(self) -> bool:
        """True when any filter is on."""
        return any(getattr(self, f.name) is not None for f in fields(self))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QualityConfig:
        """The config from `to_dict` output (unknown keys are an error)."""
        return cls(**data)

    @classmethod
    def preset(cls, name: str) -> QualityConfig:
        """The named preset: "strict" (STRICT) or "off" (every filter off)."""
        if name not in QUALITY_PRESETS:
            raise ValueError(f"unknown quality preset {name!r}; expected one of {sorted(QUALITY_PRESETS)}")
        return QUALITY_PRESETS[name]


STRICT = QualityConfig(max_box_area_fraction=0.9, min_box_side_px=16, max_boxes_per_phrase=3, min_image_side_px=224)
"""`--quality strict`, from what can be measured here (docs/output-format.md, "Quality filters"):

- max_box_area_fraction 0.9: the demo build (`make demo`, 71 kept boxes) has box area fractions p50 0.08,
  p95 0.54, p99 0.85 and a maximum of 1.0 (a whole-image box); the issue's public GRIT-20M row has two boxes of
  ~0.9 each. Above 0.9 a box says nothing about where the phrase is; 0.9 removes only the demo's top ~1%.
- min_box_side_px 16: the demo's shortest box sides are p1 15 px, p5 31 px, p50 63 px (stored pixels); the
  synthetic scenes' smallest shape is 27 px. Under 16 stored px a box is about one ViT-L/14 patch (14 px at
  Kosmos-2's 224 input) or less, so the image encoder cannot see it; 16 removes the demo's one 15 px box.
- max_boxes_per_phrase 3: GRIT has 137M boxes for 115M spans (1.19 a span); the demo's phrases have p50 1,
  p99 2, max 4 boxes. More than 3 is a detector spraying boxes over a texture ("flowers"), not instances.
- min_image_side_px 224: Kosmos-2 trains at 224x224 (GRIT.md); the demo's stored images all have a shorter side
  >= 224 (p50 224, max 448). A smaller image is upsampled for training, blurring its boxes' content.
"""
QUALITY_PRESETS: dict[str, QualityConfig] = {"strict": STRICT, "off": QualityConfig()}


def box_area(box: Box) -> float:
    """The box's area as a fraction of the image (clamped into the image)."""
    b = box.clamped()
    return max(0.0, b.x2 - b.x1) * max(0.0, b.y2 - b.y1)


def box_min_side_px(box: Box, width: int, height: int) -> float:
    """The shorter side of the box in pixels of a width x height image (clamped into the image)."""
    b = box.clamped()
    return min(max(0.0, b.x2 - b.x1) * width, max(0.0, b.y2 - b.y1) * height)


def filter_phrase_boxes(
    boxes: list[ScoredBox], config: QualityConfig, size: tuple[int, int] | None, dropped: Counter[DropReason]
) -> list[ScoredBox]:
    """One phrase's boxes after the size filters then the per-phrase cap (best scores kept, order kept).

    `size`: the stored image's (width, height); None skips the pixel filter. Removals are counted in `dropped`.
    """
    kept = []
    for scored in boxes:
        if config.max_box_area_fraction is not None and box_area(scored.box) > config.max_box_area_fraction:
            dropped[DropReason.BOX_TOO_LARGE] += 1
        elif (config.min_box_side_px is not None and size is not None
              and box_min_side_px(scored.box, *size) < config.min_box_side_px):
            dropped[DropReason.BOX_TOO_SMALL] += 1
        else:
            kept.append(scored)
    cap = config.max_boxes_per_phrase
    if cap is not None and len(kept) > cap:
        best = sorted(range(len(kept)), key=lambda i: (-kept[i].score, i))[:cap]
        dropped[DropReason.TOO_MANY_BOXES] += len(kept) - cap
        kept = [kept[i] for i in sorted(best)]
    return kept


class QualityStage:
    """The box-quality filters of `config.quality` over the grounded items (nothing to do when all are off)."""

    name = "quality"
    resources = Resources(cpus=CHEAP_CPUS)

    def __init__(self, config: BuildConfig) -> None:
        self.config = config.quality

    def setup(self) -> None:
        """Nothing to load."""

    def __call__(self, items: list[WorkItem]) -> list[WorkItem]:
        """Filter the boxes of every live, grounded item; drop the items the filters leave without a box."""
        config = self.config
        if not config.active:
            return items
        # compute everything first, then change the items: a batch that raises leaves them untouched, so the
        # sample-by-sample retry of run_stage filters (and counts) each box exactly once
        outcomes = [self._filter(item) for item in items]
        for item, outcome in zip(items, outcomes, strict=True):
            if outcome is None:
                continue
            boxes, dropped, reason = outcome
            item.set_drops(self.name, dropped)
            if reason is DropReason.IMAGE_TOO_SMALL_FOR_QUALITY:
                item.drop(reason, f"stored image side under {config.min_image_side_px} px")
                continue
            assert item.grounding is not None
            item.grounding.boxes = boxes
            if reason is not None:
                item.drop(reason, "every box was removed by the quality filters")
        return items

    def _filter(self, item: WorkItem) -> tuple[list[list[ScoredBox]], Counter[DropReason], DropReason | None] | None:
        if not item.alive or item.grounding is None:
            return None
        config = self.config
        decoded = item.decoded
        size = (decoded.width, decoded.height) if decoded is not None else None
        if config.min_image_side_px is not None and size is not None and min(size) < config.min_image_side_px:
            return [], Counter(), DropReason.IMAGE_TOO_SMALL_FOR_QUALITY
        dropped: Counter[DropReason] = Counter()
        boxes = [filter_phrase_boxes(list(phrase_boxes), config, size, dropped)
                 for phrase_boxes in item.grounding.boxes]
        had_boxes = any(item.grounding.boxes)
        reason = DropReason.NO_BOX_AFTER_QUALITY_FILTERS if had_boxes and not any(boxes) else None
        return boxes, dropped, reason
