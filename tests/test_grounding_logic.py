"""The grounding stage's pure logic, driven with controlled logits and boxes: assignment, NMS, threshold, prompts."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from grit_pipeline.records import Box, DropReason
from grit_pipeline.stages.detector_loading import GroundingConfig
from grit_pipeline.stages.grounding import (
    BoxFilter,
    PhraseBox,
    assign_boxes,
    filter_candidates,
    nms,
    phrase_scores,
    result_from_candidates,
)
from grit_pipeline.stages.prompts import plan_prompts, prompt_text

SPECIAL = {"cls": 101, "sep": 102, "dot": 1012}


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_phrase_score_is_max_sigmoid_over_the_phrase_tokens():
    probs = np.array([[0.1, 0.9, 0.2, 0.3, 0.4]])
    scores = phrase_scores(probs, [[1, 2], [3, 4], []])
    assert scores[0].tolist() == pytest.approx([0.9, 0.4, 0.0])


def test_each_box_goes_to_its_best_phrase_by_token_logits():
    # token positions: [CLS]=0, "a"=1, "dog"=2, "."=3, "red"=4, "ball"=5, "."=6, [SEP]=7
    logits = np.full((3, 8), -10.0)
    logits[0, 2] = _logit(0.9)  # query 0: strongly "dog"
    logits[0, 5] = _logit(0.7)
    logits[1, 4] = _logit(0.8)  # query 1: "red" token -> phrase "red ball"
    logits[2, 1] = _logit(0.3)  # query 2: weak
    probs = 1 / (1 + np.exp(-logits))
    corners = np.array([[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9], [0.0, 0.0, 1.0, 1.0]])
    got = assign_boxes(probs, corners, [[1, 2], [4, 5]], [7, 3])
    assert [(c.phrase, round(c.score, 3)) for c in got] == [(7, 0.9), (3, 0.8), (7, 0.3)]
    assert got[1].box == Box(0.5, 0.5, 0.9, 0.9)


def test_assignment_ignores_delimiter_and_special_token_logits():
    probs = np.full((1, 5), 0.01)
    probs[0, 0] = 0.99  # [CLS]
    probs[0, 2] = 0.99  # "."
    probs[0, 1] = 0.4
    got = assign_boxes(probs, np.array([[0, 0, 1, 1]]), [[1], [3]], [0, 1])
    assert got[0].phrase == 0 and got[0].score == pytest.approx(0.4)


def test_assignment_ties_go_to_the_earlier_phrase():
    probs = np.array([[0.0, 0.8, 0.0, 0.8]])
    assert assign_boxes(probs, np.array([[0, 0, 1, 1]]), [[3], [1]], [5, 6])[0].phrase == 5


def test_assignment_skips_queries_not_above_min_score():
    probs = np.array([[0.65], [0.66]])
    got = assign_boxes(probs, np.array([[0, 0, 1, 1], [0, 0, 0.5, 0.5]]), [[0]], [0], min_score=0.65)
    assert len(got) == 1 and got[0].score == pytest.approx(0.66)


def test_threshold_is_strictly_greater_than():
    candidates = [PhraseBox(0, Box(0, 0, 0.5, 0.5), 0.65), PhraseBox(0, Box(0.5, 0.5, 1, 1), 0.6500001)]
    kept = filter_candidates(candidates, BoxFilter(box_threshold=0.65, nms_iou=None))
    assert [c.score for c in kept] == [0.6500001]


def test_nms_is_class_agnostic_across_phrases():
    man = PhraseBox(0, Box(0.1, 0.1, 0.5, 0.9), 0.9)
    groom = PhraseBox(1, Box(0.11, 0.1, 0.5, 0.9), 0.8)  # same person, another chunk
    dog = PhraseBox(2, Box(0.6, 0.5, 0.9, 0.9), 0.7)
    kept = filter_candidates([groom, man, dog], BoxFilter(box_threshold=0.65, nms_iou=0.6))
    assert kept == [man, dog]


def test_nms_keeps_nested_boxes_under_the_iou():
    person = PhraseBox(0, Box(0.0, 0.0, 0.6, 1.0), 0.9)
    shirt = PhraseBox(1, Box(0.1, 0.2, 0.5, 0.6), 0.8)  # IoU = 0.16 / 0.6 ~ 0.27
    assert nms([person, shirt], 0.6) == [person, shirt]


@pytest.mark.parametrize("most", [25, 1300])  # 1300: the IoUs are computed in several row blocks
def test_nms_matches_a_brute_force_reference(most):
    rng = random.Random(7)
    for _ in range(30 if most < 100 else 2):
        candidates = []
        for i in range(rng.randint(most // 2, most)):
            x, y = rng.random() * 0.7, rng.random() * 0.7
            box = Box(x, y, x + 0.05 + rng.random() * 0.3, y + 0.05 + rng.random() * 0.3)
            candidates.append(PhraseBox(i % 3, box, round(rng.random(), 2)))  # rounding makes ties
        iou = rng.choice([0.3, 0.5, 0.6, 0.9])
        expected: list[PhraseBox] = []
        for c in sorted(candidates, key=lambda c: -c.score):  # stable sort: ties keep input order
            if all(c.box.iou(k.box) <= iou for k in expected):
                expected.append(c)
        assert nms(candidates, iou) == expected


def test_degenerate_boxes_are_counted_and_removed():
    dropped: Counter[DropReason] = Counter()
    candidates = [
        PhraseBox(0, Box(0.5, 0.5, 0.5, 0.9), 0.9),
        PhraseBox(0, Box(float("nan"), 0, 1, 1), 0.9),
        PhraseBox(0, Box(-0.2, 0.1, 0.4, 1.3), 0.9),  # clamped, kept
    ]
    kept = filter_candidates(candidates, BoxFilter(), dropped)
    assert kept == [PhraseBox(0, Box(0.0, 0.1, 0.4, 1.0), 0.9)]
    assert dropped[DropReason.DEGENERATE_BOX] == 2


def test_pair_without_surviving_box_is_dropped_with_reason():
    result = result_from_candidates([PhraseBox(0, Box(0, 0, 1, 1), 0.5)], [[0], [1]], 2, BoxFilter())
    assert result.drop_reason is DropReason.NO_BOX_ABOVE_THRESHOLD
    assert result.boxes == [[], []]
    assert result.dropped[DropReason.NO_BOX_ABOVE_THRESHOLD] == 1


def test_repeated_chunk_text_gives_each_occurrence_the_boxes():
    candidates = [PhraseBox(0, Box(0, 0, 0.4, 0.4), 0.9), PhraseBox(1, Box(0.5, 0.5, 1, 1), 0.8)]
    result = result_from_candidates(candidates, [[0, 2], [1]], 3, BoxFilter())
    assert result.drop_reason is None
    assert [[b.score for b in boxes] for boxes in result.boxes] == [[0.9], [0.8], [0.9]]


def test_box_filter_validates():
    with pytest.raises(ValueError):
        BoxFilter(box_threshold=1.0)
    with pytest.raises(ValueError):
        BoxFilter(nms_iou=0.0)
    with pytest.raises(ValueError):
        GroundingConfig(passes_per_forward=0)


def _word_tokenize(texts: list[str]) -> list[list[int]]:
    vocab: dict[str, int] = {}
    return [[vocab.setdefault(w, 2000 + len(vocab)) for w in t.split()] for t in texts]


def test_prompt_is_chunks_joined_with_dots_between_cls_and_sep():
    plan = plan_prompts(["a dog", "the field"], _word_tokenize, SPECIAL, 256)
    (only,) = plan.passes
    assert only.input_ids == [101, 2000, 2001, 1012, 2002, 2003, 1012, 102]
    assert only.phrase_tokens == [[1, 2], [4, 5]]
    assert plan.phrase_targets == [[0], [1]]


def test_prompt_text_removes_the_model_delimiters():
    assert prompt_text("Mr. Smith?  and  The DOG") == "mr smith and the dog"


def test_repeated_chunks_are_prompted_once():
    plan = plan_prompts(["a dog", "a cat", "A dog"], _word_tokenize, SPECIAL, 256)
    assert plan.phrase_targets == [[0, 2], [1]]
    assert len(plan.passes[0].phrase_tokens) == 2


def test_long_prompts_split_into_passes_within_the_token_limit():
    chunks = [f"thing{i} here" for i in range(40)]  # 2 tokens + "." each
    plan = plan_prompts(chunks, _word_tokenize, SPECIAL, 20)
    assert len(plan.passes) > 1
    seen = []
    for text_pass in plan.passes:
        assert len(text_pass.input_ids) <= 20
        assert text_pass.input_ids[0] == 101 and text_pass.input_ids[-1] == 102
        for positions, phrase in zip(text_pass.phrase_tokens, text_pass.phrase_ids, strict=True):
            assert text_pass.input_ids[positions[-1] + 1] == 1012
            seen.append(phrase)
    assert seen == list(range(40))


def test_overlong_single_chunk_is_truncated_and_counted():
    plan = plan_prompts([" ".join(f"w{i}" for i in range(50))], _word_tokenize, SPECIAL, 16)
    assert plan.truncated_phrases == 1
    assert len(plan.passes[0].input_ids) == 16


# --- the vectorised path (torch) equals the reference logic above ------------------------------------------


def _random_passes(rng: np.random.Generator, passes: int, queries: int, tokens: int):
    """Random text passes, quantised probabilities (many ties) and boxes with out-of-range and broken ones."""
    from grit_pipeline.stages.prompts import TextPass

    text_passes = []
    for row in range(passes):
        text_pass, position = TextPass([101]), 1
        for phrase in range(int(rng.integers(1, 6))):
            length = int(rng.integers(0 if phrase == 2 else 1, 4))  # sometimes a phrase without tokens
            text_pass.phrase_tokens.append(list(range(position, position + length)))
            text_pass.phrase_ids.append(10 * row + phrase)
            position += length + 1
        text_pass.input_ids = [101] + [7] * (position - 1) + [102]
        text_passes.append(text_pass)
    probs = np.round(rng.random((passes, queries, tokens)) * 20) / 20  # steps of 0.05: ties everywhere
    centres = rng.random((passes, queries, 2)) * 1.2 - 0.1
    sizes = rng.random((passes, queries, 2)) * 0.5
    corners = np.concatenate((centres - sizes / 2, centres + sizes / 2), axis=-1).astype(np.float32)
    corners[:, ::7, 2] = corners[:, ::7, 0]  # no width
    corners[:, 3::11, 1] = np.nan
    corners = np.round(corners * 8) / 8  # identical boxes: IoU ties
    return text_passes, probs.astype(np.float32), corners.astype(np.float32)


def _reference_result(text_passes, probs, corners, targets, num_phrases, box_filter):
    candidates = []
    for row, text_pass in enumerate(text_passes):
        candidates += assign_boxes(probs[row, :, : len(text_pass.input_ids)], corners[row], text_pass.phrase_tokens,
                                   text_pass.phrase_ids, min_score=box_filter.box_threshold)
    return result_from_candidates(candidates, targets, num_phrases, box_filter, Counter())


@pytest.mark.parametrize("nms_iou", [None, 0.3, 0.6])
@pytest.mark.parametrize("threshold", [0.0, 0.65])
def test_vectorised_selection_equals_the_reference(nms_iou, threshold):
    import torch

    from grit_pipeline.stages.box_selection import result_from_selected, select_boxes, token_phrase_columns

    rng = np.random.default_rng(int(threshold * 100) + int((nms_iou or 0) * 10))
    box_filter = BoxFilter(box_threshold=threshold, nms_iou=nms_iou)
    for _ in range(4):
        text_passes, probs, corners = _random_passes(rng, passes=5, queries=60, tokens=24)
        # request 0 has passes 0-2 (merged before NMS), requests 1 and 2 one pass each
        owners = [0, 0, 0, 1, 2]
        columns = token_phrase_columns(text_passes, probs.shape[-1])
        selected = select_boxes(torch.from_numpy(probs), torch.from_numpy(corners), columns, box_filter,
                                nms_rows=[owner != 0 for owner in owners])
        for request in range(3):
            rows = [r for r, owner in enumerate(owners) if owner == request]
            ids = sorted({i for r in rows for i in text_passes[r].phrase_ids})
            targets = [[] for _ in range(max(ids) + 1)]
            for position, phrase in enumerate(ids):
                targets[phrase] = [position]
            expected = _reference_result([text_passes[r] for r in rows], probs[rows], corners[rows], targets,
                                         len(ids), box_filter)
            got = result_from_selected([(selected[r], text_passes[r].phrase_ids) for r in rows], targets,
                                       len(ids), box_filter)
            assert got.boxes == expected.boxes
            assert got.dropped == expected.dropped and got.drop_reason == expected.drop_reason
            assert sum(len(b) for b in expected.boxes) > 0 or threshold > 0


@pytest.mark.parametrize("iou", [0.3, 0.6, 0.9])
def test_greedy_nms_keep_equals_the_reference_nms_by_scan_and_by_rounds(iou):
    import torch

    from grit_pipeline.stages import box_selection

    rng = np.random.default_rng(3)
    centres = rng.random((3, 200, 2))
    sizes = rng.random((3, 200, 2)) * 0.4 + 0.02
    boxes = np.round(np.concatenate((centres - sizes / 2, centres + sizes / 2), axis=-1).clip(0, 1) * 16) / 16
    usable = rng.random((3, 200)) > 0.2
    expected = []
    for row in range(3):
        candidates = [PhraseBox(i, Box(*boxes[row, i]), 1.0 - i / 1000) for i in range(200) if usable[row, i]]
        kept = {c.phrase for c in nms(candidates, iou)}
        expected.append([i in kept for i in range(200)])
    for by_rounds in (False, True):  # False: the CPU's row scan; True: the accelerator's fixed-point rounds
        got = box_selection.greedy_nms_keep(torch.from_numpy(boxes), torch.from_numpy(usable), iou, by_rounds=by_rounds)
        assert got.tolist() == expected
