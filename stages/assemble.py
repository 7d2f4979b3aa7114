"""Assembly: a GRIT-20M record from a caption's phrases and the boxes a grounder found for them (each box
paired with its chunk and the chunk's referring expression)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from grit_pipeline.records import Box, DropReason, GritRecord, GroundedSpan
from grit_pipeline.stages.base import CHEAP_CPUS, Resources
from grit_pipeline.stages.text import Phrase

if TYPE_CHECKING:
    from grit_pipeline.config import BuildConfig
    from grit_pipeline.work import WorkItem


def assemble_record(
    key: str,
    caption: str,
    phrases: Sequence[Phrase],
    boxes: Sequence[Sequence[tuple[Box, float]]],
    **meta: Any,
) -> GritRecord:
    """A record with one noun_chunks/ref_exps entry per (phrase, box); `ref_exps[i]` expands `noun_chunks[i]`.

    `boxes[i]` are the boxes of `phrases[i]`; a phrase with no box contributes no entry (GRIT-20M layout).
    `meta` fills the other GRIT-20M fields (id, url, width, height, clip similarities).
    """
    if len(phrases) != len(boxes):
        raise ValueError(f"{len(phrases)} phrases but {len(boxes)} box lists")
    noun_chunks: list[GroundedSpan] = []
    ref_exps: list[GroundedSpan] = []
    for phrase, phrase_boxes in zip(phrases, boxes, strict=True):
        for box, score in phrase_boxes:
            noun_chunks.append(GroundedSpan(phrase.chunk, box, float(score)))
            ref_exps.append(GroundedSpan(phrase.expression, box, float(score)))
    record = GritRecord(key=key, caption=caption, noun_chunks=noun_chunks, ref_exps=ref_exps, **meta)
    record.validate()
    return record


class AssembleStage:
    """Pair every box with its chunk and the chunk's referring expression: the GRIT-20M record."""

    name = "assemble"
    resources = Resources(cpus=CHEAP_CPUS)

    def __init__(self, config: BuildConfig) -> None:
        self.config = config

    def setup(self) -> None:
        """Nothing to load."""

    def __call__(self, items: list[WorkItem]) -> list[WorkItem]:
        """Assemble the record of every live, grounded item."""
        for item in items:
            if not item.alive or item.grounding is None:
                continue
            boxes = [[(b.box, b.score) for b in phrase_boxes] for phrase_boxes in item.grounding.boxes]
            item.record = assemble_record(item.key, item.sample.caption or "", item.phrases or [], boxes,
                                          **item.grit_meta())
            if not item.record.noun_chunks:
                item.drop(DropReason.NO_BOX_ABOVE_THRESHOLD)
        return items
