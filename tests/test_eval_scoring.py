"""`grit eval score` and grit_pipeline.eval (issue 13, item 2) on fixtures in exactly MDETR's layouts.

tests/data/mdetr/final_flickr_separateGT_val.json (as scripts/pre-training/flickr_combined.py writes it):
string heights/widths, image ids from 29781, two Flickr images, four sentences (one without a scored phrase),
8 scored phrases. "Two dogs" has two boxes; "a man" appears twice in sentence 0 (two entities); "A girl" and
"the girl" are one entity, so one annotation carries both spans. "the grass" (a scene phrase) is not scored.

tests/data/mdetr/finetune_refcocog_val.json (as scripts/fine-tuning/refexp_coco_format.py writes it):
three expressions, ids from 61214, two of them on the same COCO image.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from grit_pipeline.cli import main
from grit_pipeline.eval import EvalError
from grit_pipeline.eval.annotations import AnnotationError, FlickrAnnotations, load_annotations
from grit_pipeline.eval.predictions import (
    Prediction,
    PredictionError,
    prediction_ids,
    read_predictions,
    write_predictions,
)
from grit_pipeline.eval.scoring import (
    MissingPredictionsError,
    box_iou,
    generalized_box_iou,
    score,
    score_files,
)

DATA = Path(__file__).parent / "data" / "mdetr"
FLICKR = DATA / "final_flickr_separateGT_val.json"
REFCOCOG = DATA / "finetune_refcocog_val.json"
JUNK = [0.0, 0.0, 1.0, 1.0]  # overlaps no ground-truth box of either fixture


@pytest.fixture(scope="module")
def flickr() -> FlickrAnnotations:
    return load_annotations(FLICKR)


@pytest.fixture(scope="module")
def refcocog():
    return load_annotations(REFCOCOG)


def _shift(box) -> list[float]:
    """The box moved right by its own width plus one: IoU 0 with the original."""
    x1, y1, x2, y2 = box
    return [x2 + 1, y1, x2 + 1 + (x2 - x1), y2]


def _flickr_recalls(metrics: dict, protocol: str) -> list[float]:
    figures = metrics[protocol]["overall"]
    return [figures["recall@1"], figures["recall@5"], figures["recall@10"], figures["upper_bound"]]


# --- reading MDETR's layouts ---------------------------------------------------------------------------


def test_flickr_phrases_map_to_their_boxes(flickr: FlickrAnnotations) -> None:
    phrases = {p.id: p for p in flickr.phrases()}
    assert list(phrases) == [
        "1000092795_0_0", "1000092795_0_1", "1000092795_0_2", "1000092795_1_0", "1000092795_1_1",
        "2000123456_3_0", "2000123456_3_1", "2000123456_3_2",
    ]  # fmt: skip
    assert [s.image_id for s in flickr.sentences] == [29781, 29782, 29789, 29790]
    assert flickr.sentences[0].height == 333 and flickr.sentences[0].width == 500  # from "333", "500"
    # the repeated "a man" of sentence 0: two entities, two different boxes
    assert phrases["1000092795_0_0"].boxes == ((10.0, 20.0, 110.0, 220.0),)
    assert phrases["1000092795_0_2"].text == "a man"
    assert phrases["1000092795_0_2"].boxes == ((350.0, 30.0, 450.0, 230.0),)
    # a phrase with two boxes (xywh -> xyxy), and its enclosing box
    dogs = phrases["1000092795_1_0"]
    assert dogs.boxes == ((20.0, 240.0, 120.0, 320.0), (300.0, 240.0, 400.0, 320.0))
    assert dogs.merged_box == (20.0, 240.0, 400.0, 320.0)
    # one annotation carrying two spans ("A girl", "the girl") gives both phrases its box
    assert (
        phrases["2000123456_3_0"].boxes == phrases["2000123456_3_2"].boxes == ((100.0, 100.0, 200.0, 300.0),)
    )
    assert not flickr.has_types
    assert flickr.sentences[2].phrases == ()  # a sentence without a scored phrase


def test_refcoco_layout(refcocog) -> None:
    assert [e.id for e in refcocog.expressions] == ["61214", "61215", "61216"]
    assert refcocog.expressions[1].box == (10.0, 200.0, 100.0, 350.0)
    assert refcocog.expressions[0].original_id == refcocog.expressions[1].original_id == 380440
    assert refcocog.dataset_names == ["refcocog"]
    assert prediction_ids(refcocog) == ["61214", "61215", "61216"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"images": [{"dataset_name": "gqa"}], "annotations": []}', "neither MDETR's Flickr30k nor"),
        ("[1, 2]", "is not an MDETR annotation file"),
        ("not json", "are not JSON"),
        ('{"images": [{"dataset_name": "flickr", "id": 1}], "annotations": []}', "missing field"),
    ],
)
def test_wrong_annotation_files_are_one_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "ann.json"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=message) as info:
        load_annotations(path)
    assert "\n" not in str(info.value)


def test_flickr_phrase_without_box_is_an_error(tmp_path: Path) -> None:
    data = json.loads(FLICKR.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 29781]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match="phrase 0 of images\\[0\\] .* has no annotation"):
        load_annotations(path)


# --- predictions format --------------------------------------------------------------------------------


def test_predictions_round_trip_and_ids(tmp_path: Path, flickr: FlickrAnnotations) -> None:
    preds = [
        Prediction(id=i, boxes=[[1, 2, 3, 4]], text="<phrase>x</phrase>") for i in prediction_ids(flickr)
    ]
    preds[0] = Prediction(id=preds[0].id)  # no box, no text
    path = tmp_path / "preds.jsonl"
    assert write_predictions(path, preds) == 8
    assert read_predictions(path) == preds
    assert json.loads(path.read_text().splitlines()[0]) == {"id": "1000092795_0_0", "boxes": []}
    assert [p.name for p in tmp_path.iterdir()] == ["preds.jsonl"]  # no temp file left


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2 is not a prediction"),
        ('{"id": "a"}', "line 2 is not a prediction .*needs 'id' and 'boxes'"),
        ('{"id": "a", "boxes": [[1, 2, 3]]}', "line 2 .*not \\[x1, y1, x2, y2\\]"),
        ('{"id": "a", "boxes": [[5, 2, 3, 4]]}', "line 2 .*x2 < x1"),
        ('{"id": "x", "boxes": []}', "line 2 repeats id 'x' of line 1"),
    ],
)
def test_bad_prediction_lines_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "preds.jsonl"
    path.write_text('{"id": "x", "boxes": []}\n' + line + "\n")
    with pytest.raises(PredictionError, match=message):
        read_predictions(path)


# --- overlap measures ----------------------------------------------------------------------------------


def test_iou_and_giou_without_plus_one() -> None:
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)  # no +1 (MDETR)
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    # disjoint: iou 0; hull 20x10 = 200, union 200 -> giou 0; farther apart: negative
    assert generalized_box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0
    assert generalized_box_iou([0, 0, 10, 10], [20, 0, 30, 10]) == pytest.approx(0 - (300 - 200) / 300)


# --- Flickr30k -----------------------------------------------------------------------------------------


def test_flickr_perfect_predictions_score_one(flickr: FlickrAnnotations) -> None:
    any_perfect = [Prediction(p.id, [p.boxes[0]]) for p in flickr.phrases()]
    merged_perfect = [Prediction(p.id, [p.merged_box]) for p in flickr.phrases()]
    assert _flickr_recalls(score(flickr, any_perfect), "any_box") == [1.0, 1.0, 1.0, 1.0]
    assert _flickr_recalls(score(flickr, merged_perfect), "merged_box") == [1.0, 1.0, 1.0, 1.0]


def test_flickr_shifted_boxes_score_zero(flickr: FlickrAnnotations) -> None:
    shifted = [Prediction(p.id, [_shift(b) for b in p.boxes]) for p in flickr.phrases()]
    metrics = score(flickr, shifted)
    assert _flickr_recalls(metrics, "any_box") == [0.0, 0.0, 0.0, 0.0]
    assert _flickr_recalls(metrics, "merged_box") == [0.0, 0.0, 0.0, 0.0]


def test_flickr_correct_box_at_rank_three(flickr: FlickrAnnotations) -> None:
    preds = [Prediction(p.id, [JUNK, JUNK, p.merged_box]) for p in flickr.phrases()]
    metrics = score(flickr, preds)
    assert _flickr_recalls(metrics, "merged_box") == [0.0, 1.0, 1.0, 1.0]


def test_flickr_enclosing_box_differs_under_any_and_merged(flickr: FlickrAnnotations) -> None:
    dogs = flickr.sentences[1].phrases[0]  # two boxes, 100x80 each; enclosing box 380x80
    only_dogs = {p.id: Prediction(p.id, [p.boxes[0]]) for p in flickr.phrases()}
    only_dogs[dogs.id] = Prediction(dogs.id, [dogs.merged_box])
    metrics = score(flickr, only_dogs)
    # ANY: IoU(enclosing, one dog) = 8000 / 30400 = 0.26 < 0.5 -> miss: 7/8. MERGED: exact -> 8/8
    assert metrics["any_box"]["overall"]["recall@1"] == 7 / 8
    assert metrics["merged_box"]["overall"]["recall@1"] == 1.0
    only_dogs[dogs.id] = Prediction(dogs.id, [dogs.boxes[1]])
    metrics = score(flickr, only_dogs)
    assert metrics["any_box"]["overall"]["recall@1"] == 1.0
    assert metrics["merged_box"]["overall"]["recall@1"] == 7 / 8


def test_flickr_hand_computed_mixed_case(flickr: FlickrAnnotations) -> None:
    preds = [
        # 1 "A man" [10,20,110,220]: exact at rank 1                  -> hit @1 @5 @10 ub
        Prediction("1000092795_0_0", [[10, 20, 110, 220]]),
        # 2 "a dog" [200,150,300,250]: rank 1 shifted by half (IoU 5000/15000 = 0.33), exact at rank 2
        #                                                               -> miss @1, hit @5 @10 ub
        Prediction("1000092795_0_1", [[250, 150, 350, 250], [200, 150, 300, 250]]),
        # 3 "a man" (2nd): no box                                     -> miss everywhere
        Prediction("1000092795_0_2", []),
        # 4 "Two dogs": the enclosing box [20,240,400,320]            -> ANY: miss everywhere (0.26);
        #                                                                MERGED: hit everywhere
        Prediction("1000092795_1_0", [[20, 240, 400, 320]]),
        # 5 "a man" [10,20,110,220]: 10 junk boxes, exact at rank 11   -> miss @1 @5 @10, hit ub
        Prediction("1000092795_1_1", [JUNK] * 10 + [[10, 20, 110, 220]]),
        # 6 "A girl" [100,100,200,300]: top half, IoU 10000/20000 = 0.5 exactly (>= 0.5) -> hit everywhere
        Prediction("2000123456_3_0", [[100, 100, 200, 200]]),
        # 7 "a ball" [300,350,340,390]: 5 junk, exact at rank 6        -> miss @1 @5, hit @10 ub
        Prediction("2000123456_3_1", [JUNK] * 5 + [[300, 350, 340, 390]]),
        # 8 "the girl": 2 junk, exact at rank 3                        -> miss @1, hit @5 @10 ub
        Prediction("2000123456_3_2", [JUNK, JUNK, [100, 100, 200, 300]]),
    ]
    metrics = score(flickr, preds)
    # ANY:    @1 {1,6} = 2/8; @5 {1,2,6,8} = 4/8; @10 {1,2,6,7,8} = 5/8; ub {1,2,5,6,7,8} = 6/8
    assert _flickr_recalls(metrics, "any_box") == [0.25, 0.5, 0.625, 0.75]
    # MERGED: phrase 4 also hits everywhere (single-box phrases unchanged):
    #         @1 3/8; @5 5/8; @10 6/8; ub 7/8
    assert _flickr_recalls(metrics, "merged_box") == [0.375, 0.625, 0.75, 0.875]
    assert metrics["any_box"]["overall"]["phrases"] == 8
    assert "per_type" not in metrics["any_box"]  # the file carries no phrase types
    assert metrics["counts"] == {
        "sentences": 4, "phrases": 8, "predictions_without_boxes": 1, "ignored_predictions": 0,
    }  # fmt: skip
    json.dumps(metrics)  # JSON-able


def test_flickr_per_type_when_annotations_carry_types(tmp_path: Path) -> None:
    data = json.loads(FLICKR.read_text())
    types = {29781: ["people", "animals", "people"], 29782: ["animals", "people"], 29789: [],
             29790: [["people", "other"], "other", "people"]}  # fmt: skip
    for image in data["images"]:
        image["phrase_types"] = types[image["id"]]
    path = tmp_path / "typed.json"
    path.write_text(json.dumps(data))
    annotations = load_annotations(path)
    # hits only on the three "people" phrases of image 1000092795 and on "A girl" (people, other)
    hit = {"1000092795_0_0", "1000092795_0_2", "1000092795_1_1", "2000123456_3_0"}
    preds = [Prediction(p.id, [p.boxes[0]] if p.id in hit else []) for p in annotations.phrases()]
    per_type = score(annotations, preds)["any_box"]["per_type"]
    assert sorted(per_type) == ["animals", "other", "people"]
    # people: 5 phrases (0_0, 0_2, 1_1, 3_0, 3_2), 4 hits; animals: 0/2; other: 3_0 hit, 3_1 miss -> 1/2
    assert per_type["people"]["recall@1"] == 4 / 5 and per_type["people"]["phrases"] == 5
    assert per_type["animals"]["recall@1"] == 0.0
    assert per_type["other"]["recall@1"] == 0.5


def test_flickr_missing_prediction_is_an_error(flickr: FlickrAnnotations) -> None:
    preds = [Prediction(p.id, [p.boxes[0]]) for p in flickr.phrases()][:-2]
    with pytest.raises(
        MissingPredictionsError, match="2 of 8 predictions missing .*2000123456_3_1, 2000123456_3_2"
    ):
        score(flickr, preds)


# --- RefCOCO -------------------------------------------------------------------------------------------


def test_refcoco_perfect_and_shifted(refcocog) -> None:
    perfect = score(refcocog, [Prediction(e.id, [e.box]) for e in refcocog.expressions])
    assert perfect["refcocog"] == {"expressions": 3, "iou": {"acc@0.5": 1.0}, "giou": {"acc@0.5": 1.0}}
    shifted = score(refcocog, [Prediction(e.id, [_shift(e.box)]) for e in refcocog.expressions])
    assert shifted["refcocog"]["iou"] == {"acc@0.5": 0.0} and shifted["refcocog"]["giou"] == {"acc@0.5": 0.0}


def _refcoco_mixed_predictions(refcocog) -> list[Prediction]:
    first, second, third = refcocog.expressions
    return [
        # 61214: exact at rank 1                                          -> hit under IoU and GIoU
        Prediction(first.id, [first.box]),
        # 61215, gt [10,200,100,350] (90x150 = 13500) moved by (15, 25) to [25,225,115,375]:
        #   inter 75*125 = 9375, union 27000-9375 = 17625, IoU = 0.5319 -> hit;
        #   hull 105*175 = 18375, GIoU = 0.5319 - 750/18375 = 0.4911     -> miss
        Prediction(second.id, [[25, 225, 115, 375]]),
        # 61216: junk at rank 1, exact at rank 2                           -> miss @1, hit @5 @10
        Prediction(third.id, [JUNK, third.box]),
    ]


def test_refcoco_hand_computed_mixed_case(refcocog) -> None:
    metrics = score(refcocog, _refcoco_mixed_predictions(refcocog))
    # IoU:  @1 {61214, 61215} = 2/3; top-5 and top-10 all three = 1.0
    # GIoU: @1 {61214} = 1/3; top-5 and top-10 {61214, 61216} = 2/3
    assert metrics["refcocog"] == {
        "expressions": 3,
        "iou": {"acc@0.5": 2 / 3, "top5_acc@0.5": 1.0, "top10_acc@0.5": 1.0},
        "giou": {"acc@0.5": 1 / 3, "top5_acc@0.5": 2 / 3, "top10_acc@0.5": 2 / 3},
    }
    assert metrics["counts"] == {"expressions": 3, "predictions_without_boxes": 0, "ignored_predictions": 0}


def test_refcoco_per_dataset_name(tmp_path: Path, refcocog) -> None:
    data = json.loads(REFCOCOG.read_text())
    data["images"][2]["dataset_name"] = "refcoco"  # as in MDETR's combined refexp files
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(data))
    metrics = score(load_annotations(path), _refcoco_mixed_predictions(refcocog))
    assert metrics["refcocog"]["expressions"] == 2 and metrics["refcoco"]["expressions"] == 1
    assert metrics["refcocog"]["iou"]["acc@0.5"] == 1.0 and metrics["refcocog"]["giou"]["acc@0.5"] == 0.5
    assert metrics["refcoco"]["iou"] == {"acc@0.5": 0.0, "top5_acc@0.5": 1.0, "top10_acc@0.5": 1.0}


def test_refcoco_missing_prediction_is_an_error(refcocog) -> None:
    with pytest.raises(MissingPredictionsError, match="1 of 3 predictions missing .*ids 61216"):
        score(refcocog, [Prediction("61214", []), Prediction("61215", [])])


# --- files and the CLI ---------------------------------------------------------------------------------


def test_score_files_and_cli_print_json(tmp_path: Path, refcocog) -> None:
    preds = tmp_path / "preds.jsonl"
    write_predictions(preds, _refcoco_mixed_predictions(refcocog))
    expected = score_files(REFCOCOG, preds)
    result = CliRunner().invoke(
        main, ["eval", "score", "--annotations", str(REFCOCOG), "--predictions", str(preds)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == expected
    assert expected["refcocog"]["iou"]["acc@0.5"] == 2 / 3


def _cli_cases(tmp_path: Path, flickr: FlickrAnnotations) -> list[tuple[list[str], str]]:
    partial = tmp_path / "partial.jsonl"
    write_predictions(partial, [Prediction(p.id, [p.boxes[0]]) for p in flickr.phrases()][:5])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1000092795_0_0", "boxes": [[1, 2]]}\n')
    wrong = tmp_path / "coco.json"
    wrong.write_text('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}')
    return [
        (["--annotations", str(tmp_path / "absent.json"), "--predictions", str(partial)], "no such file"),
        (["--annotations", str(FLICKR), "--predictions", str(tmp_path / "absent.jsonl")], "no such file"),
        (["--annotations", str(wrong), "--predictions", str(partial)], "neither MDETR's Flickr30k nor"),
        (["--annotations", str(FLICKR), "--predictions", str(bad)], "line 1 is not a prediction"),
        (["--annotations", str(FLICKR), "--predictions", str(partial)], "3 of 8 predictions missing"),
        (["--annotations", str(tmp_path), "--predictions", str(partial)], "a folder"),
    ]


def test_cli_user_errors_are_one_line(tmp_path: Path, flickr: FlickrAnnotations) -> None:
    for args, message in _cli_cases(tmp_path, flickr):
        result = CliRunner().invoke(main, ["eval", "score", *args])
        assert result.exit_code == 1, (args, result.output)
        assert isinstance(result.exception, SystemExit), result.exception
        assert message in result.output
        assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_cli_user_error_in_a_real_process(tmp_path: Path, flickr: FlickrAnnotations) -> None:
    args, message = _cli_cases(tmp_path, flickr)[4]
    proc = subprocess.run(
        [sys.executable, "-m", "grit_pipeline", "eval", "score", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("Error: ") and message in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_eval_error_is_the_common_base() -> None:
    assert issubclass(AnnotationError, EvalError) and issubclass(PredictionError, EvalError)
    assert issubclass(MissingPredictionsError, EvalError)
