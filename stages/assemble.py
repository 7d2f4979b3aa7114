"""Assemble a GRIT-20M record from a caption's phrases and the boxes a grounder found for them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grit_pipeline.records import Box, GritRecord, GroundedSpan
from grit_pipeline.stages.text import Phrase


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
