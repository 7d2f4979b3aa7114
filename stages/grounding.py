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
