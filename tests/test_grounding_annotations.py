"""The annotation grounder: GRIT-20M rows re-serialised, COCO-style instances matched to chunk heads."""

from __future__ import annotations

from collections import Counter

import pytest

from grit_pipeline.records import Box, DropReason, GritRecord, GroundedSpan, Span
from grit_pipeline.stages.annotations import (
    AnnotationConfig,
    AnnotationGrounder,
    match_category,
    parse_annotations,
    phrases_from_record,
)
from grit_pipeline.stages.grounding import Annotation, GroundingRequest
from grit_pipeline.stages.text import Phrase


def _phrases(caption: str, *chunks: str) -> list[Phrase]:
    phrases, start = [], 0
    for chunk in chunks:
        begin = caption.index(chunk, start)
        start = begin + len(chunk)
        phrases.append(Phrase(Span(begin, start), Span(begin, start), chunk.split()[-1].lower()))
    return phrases


def _ground(caption, phrases, annotations=None, record=None, config=None):
    request = GroundingRequest(key="k", caption=caption, phrases=phrases, annotations=annotations,
                               source_record=record)
    return AnnotationGrounder(config).ground([request])[0]


def test_parse_normalized_and_coco_pixel_boxes():
    obj = {"annotations": [
        {"category": "dog", "box": [0.1, 0.2, 0.5, 0.6], "score": 0.9, "span": [2, 5]},
        {"category": "person", "bbox": [10, 20, 30, 40]},
    ]}
    got = parse_annotations(obj, width=100, height=200)
    assert got[0] == Annotation("dog", Box(0.1, 0.2, 0.5, 0.6), 0.9, (2, 5))
    assert got[1].category == "person" and got[1].score == 1.0 and got[1].span is None
    assert got[1].box == Box(0.1, 0.1, 0.4, 0.3)


def test_bad_annotations_are_counted_and_skipped():
    dropped: Counter[DropReason] = Counter()
    items = [
        {"category": "dog", "box": [0.1, 0.1, 0.5, 0.5]},
        {"category": "dog"},  # no box
        {"box": [0.1, 0.1, 0.5, 0.5]},  # no category
        {"category": "dog", "box": [10, 10, 50, 50]},  # pixels where normalised values are expected
        {"category": "dog", "box": [0.5, 0.5, 0.5, 0.9]},  # no area
        {"category": "dog", "box": [0.1, 0.1, 0.5, "x"]},
        {"category": "dog", "box": [0.1, 0.1, 0.5, 0.5], "score": 2},
        {"category": "dog", "box": [0.1, 0.1, 0.5, 0.5], "span": [5, 2]},
        {"category": "dog", "bbox": [1, 1, 5, 5]},  # pixel box but no image size given below
        "not an object",
    ]
    got = parse_annotations(items, None, None, dropped)
    assert len(got) == 1
    assert dropped == Counter({DropReason.MALFORMED_RECORD: 8, DropReason.DEGENERATE_BOX: 1})


def test_coco_box_slightly_outside_the_image_is_clamped():
    (got,) = parse_annotations([{"category": "cat", "bbox": [-2, 0, 104, 50]}], 100, 50)
    assert got.box == Box(0.0, 0.0, 1.0, 1.0)


@pytest.mark.parametrize(
    ("category", "caption", "chunks", "expected"),
    [
        ("person", "a man walks a dog", ("a man", "a dog"), [0]),
        ("dog", "a man walks a puppy", ("a man", "a puppy"), [1]),
        ("cat", "two kittens on a bed", ("two kittens", "a bed"), [0]),
        ("dog", "two dogs and a dog", ("two dogs", "a dog"), [0, 1]),  # exact head matches, plural included
        ("person", "a man and a woman", ("a man", "a woman"), None),  # ambiguous synonym match
        ("man", "a man and a woman", ("a man", "a woman"), [0]),  # an exact match wins over synonyms
        ("teddy bear", "a brown teddy bear on a bed", ("a brown teddy bear", "a bed"), [0]),
        ("dining table", "food on a wooden table", ("food", "a wooden table"), [1]),
        ("giraffe", "a man walks a dog", ("a man", "a dog"), []),
    ],
)
def test_category_matching(category, caption, chunks, expected):
    assert match_category(category, _phrases(caption, *chunks), caption) == expected


def test_coco_instances_ground_the_matching_chunks():
    caption = "a woman with her puppy in a park"
    phrases = _phrases(caption, "a woman", "her puppy", "a park")
    annotations = [
        Annotation("person", Box(0.1, 0.1, 0.4, 0.9)),
        Annotation("dog", Box(0.5, 0.5, 0.7, 0.8)),
        Annotation("dog", Box(0.52, 0.5, 0.7, 0.8)),  # near-duplicate: kept, ground truth has no NMS
        Annotation("frisbee", Box(0.8, 0.1, 0.9, 0.2)),
    ]
    result = _ground(caption, phrases, annotations)
    assert result.drop_reason is None
    assert [len(b) for b in result.boxes] == [1, 2, 0]
    assert result.dropped[DropReason.NO_MATCHING_ANNOTATION] == 1


def test_nms_can_be_switched_on_for_annotations():
    caption = "a puppy"
    annotations = [Annotation("dog", Box(0.5, 0.5, 0.7, 0.8), 0.9), Annotation("dog", Box(0.52, 0.5, 0.7, 0.8), 0.8)]
    result = _ground(caption, _phrases(caption, "a puppy"), annotations, config=AnnotationConfig(nms_iou=0.6))
    assert [b.score for b in result.boxes[0]] == [0.9]


def test_span_binding_beats_category():
    caption = "a dog next to a dog"
    phrases = _phrases(caption, "a dog", "a dog")
    annotations = [Annotation("dog", Box(0.6, 0.1, 0.9, 0.5), span=(14, 19))]
    result = _ground(caption, phrases, annotations)
    assert [len(b) for b in result.boxes] == [0, 1]


def test_annotation_scores_are_thresholded():
    caption = "a cat"
    result = _ground(caption, _phrases(caption, "a cat"), [Annotation("cat", Box(0.1, 0.1, 0.5, 0.5), 0.6)])
    assert result.drop_reason is DropReason.NO_BOX_ABOVE_THRESHOLD


def test_no_annotation_matching_drops_the_pair():
    caption = "a cat"
    result = _ground(caption, _phrases(caption, "a cat"), [Annotation("car", Box(0.1, 0.1, 0.5, 0.5))])
    assert result.drop_reason is DropReason.NO_MATCHING_ANNOTATION


def _grit_row() -> GritRecord:
    caption = "a dog in a field of flowers"
    box_a, box_b, box_c = Box(0.1, 0.2, 0.4, 0.8), Box(0.5, 0.2, 0.9, 0.8), Box(0.0, 0.5, 1.0, 1.0)
    return GritRecord(
        key="000001",
        caption=caption,
        noun_chunks=[GroundedSpan(Span(0, 5), box_a, 0.9), GroundedSpan(Span(0, 5), box_b, 0.7),
                     GroundedSpan(Span(9, 16), box_c, 0.66)],
        ref_exps=[GroundedSpan(Span(0, 27), box_a, 0.9), GroundedSpan(Span(0, 27), box_b, 0.7),
                  GroundedSpan(Span(9, 27), box_c, 0.66)],
    )


def test_grit_rows_are_reserialized_with_their_own_phrases():
    record = _grit_row()
    phrases = phrases_from_record(record)
    assert [(p.chunk, p.expression, p.head) for p in phrases] == [
        (Span(0, 5), Span(0, 27), "dog"), (Span(9, 16), Span(9, 27), "field")]
    result = _ground(record.caption, phrases, record=record)
    assert [[(b.box, b.score) for b in boxes] for boxes in result.boxes] == [
        [(record.noun_chunks[0].box, 0.9), (record.noun_chunks[1].box, 0.7)],
        [(record.noun_chunks[2].box, 0.66)],
    ]


def test_grit_rows_map_to_spacy_phrases_by_span():
    record = _grit_row()
    # the text stage may find the chunk "a field" with a different expression end; spans still bind
    phrases = [Phrase(Span(0, 5), Span(0, 27), "dog"), Phrase(Span(7, 16), Span(7, 27), "field")]
    result = _ground(record.caption, phrases, record=record)
    assert [len(b) for b in result.boxes] == [2, 1]


def test_grounder_describes_the_filter_it_applies():
    info = AnnotationGrounder(AnnotationConfig(box_threshold=0.3, nms_iou=0.5)).describe()  # the manifest's record
    assert info["grounder"] == "annotations" and (info["box_threshold"], info["nms_iou"]) == (0.3, 0.5)
