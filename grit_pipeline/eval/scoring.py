"""Scoring predictions against MDETR-layout annotations: Flickr30k Recall@k, RefCOCO ACC@0.5.

Flickr30k Entities (MDETR `datasets/flickr_eval.py`): a phrase is a hit at k when the best IoU between any
of its top-k predicted boxes and its ground truth is >= 0.5; `upper_bound` uses every predicted box. Two
protocols from one file: ANY-box (ground truth = each of the phrase's boxes) and MERGED-box (ground truth =
the one box enclosing them). IoU without MDETR's absent +1. Recall = hits / phrases, overall and per phrase
type where the annotations carry types (a phrase with several types counts in each, as in MDETR).

RefCOCO/+/g (MDETR `datasets/refexp.py`): a hit at k when any of the top-k boxes overlaps the one
ground-truth box >= 0.5, by plain IoU (Kosmos-2, mmdetection) and by generalised IoU (MDETR), per
dataset_name. `acc@0.5` is top-1; `top5_acc@0.5` / `top10_acc@0.5` are added when a prediction has more
than one box. A prediction with no box is a miss. A missing prediction is an error, as in MDETR.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from grit_pipeline.eval import EvalError
from grit_pipeline.eval.annotations import (
    Annotations,
    FlickrAnnotations,
    RefcocoAnnotations,
    load_annotations,
)
from grit_pipeline.eval.predictions import Prediction, prediction_ids, read_predictions

IOU_THRESHOLD = 0.5
RECALL_KS = (1, 5, 10)
SHOWN_MISSING = 5


class MissingPredictionsError(EvalError):
    """Predictions that do not cover every scored phrase / expression of the annotations."""


def box_area(box: Sequence[float]) -> float:
    """Area of an xyxy box (no +1)."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes, without +1 (MDETR); 0 when the union is empty."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def generalized_box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Generalised IoU of two xyxy boxes (MDETR `util/box_ops.py`): IoU - (hull - union) / hull."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = box_area(a) + box_area(b) - inter
    hull = box_area((min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])))
    iou = inter / union if union > 0 else 0.0
    return iou - (hull - union) / hull if hull > 0 else iou


def _index(predictions: Iterable[Prediction] | Mapping[str, Prediction]) -> dict[str, Prediction]:
    if isinstance(predictions, Mapping):
        return dict(predictions)
    indexed: dict[str, Prediction] = {}
    for prediction in predictions:
        if prediction.id in indexed:
            raise EvalError(f"two predictions have id {prediction.id!r}")
        indexed[prediction.id] = prediction
    return indexed


def check_complete(annotations: Annotations, predictions: Mapping[str, Prediction]) -> None:
    """Raise MissingPredictionsError (how many, the first few ids) unless every scored id has a prediction."""
    expected = prediction_ids(annotations)
    missing = [ident for ident in expected if ident not in predictions]
    if missing:
        shown = ", ".join(missing[:SHOWN_MISSING]) + (", ..." if len(missing) > SHOWN_MISSING else "")
        raise MissingPredictionsError(
            f"{len(missing)} of {len(expected)} predictions missing for {annotations.source} (ids {shown}); "
            "a complete predictions file has one line per scored phrase / expression"
        )


def _hits(overlaps: list[float], ks: Sequence[int], threshold: float) -> dict[int, bool]:
    """Hit at each k (k = -1: every box) given the ranked boxes' overlaps with the ground truth."""
    return {k: bool(overlaps) and max(overlaps if k == -1 else overlaps[:k]) >= threshold for k in ks}


class _Tally:
    def __init__(self) -> None:
        self.total = 0
        self.hits: dict[int, int] = defaultdict(int)

    def add(self, hits: Mapping[int, bool]) -> None:
        self.total += 1
        for k, hit in hits.items():
            self.hits[k] += int(hit)

    def rate(self, k: int) -> float:
        return self.hits[k] / self.total if self.total else 0.0


def _recall_dict(tally: _Tally) -> dict[str, Any]:
    figures: dict[str, Any] = {f"recall@{k}": tally.rate(k) for k in RECALL_KS}
    figures["upper_bound"] = tally.rate(-1)
    figures["phrases"] = tally.total
    return figures


def score_flickr(
    annotations: FlickrAnnotations,
    predictions: Iterable[Prediction] | Mapping[str, Prediction],
    iou_threshold: float = IOU_THRESHOLD,
) -> dict[str, Any]:
    """Flickr30k Entities Recall@1/5/10 and upper bound, ANY-box and MERGED-box, overall and per type."""
    indexed = _index(predictions)
    check_complete(annotations, indexed)
    ks = (*RECALL_KS, -1)
    protocols: dict[str, Callable[[Any, tuple[float, ...]], float]] = {
        "any_box": lambda phrase, box: max(box_iou(box, gt) for gt in phrase.boxes),
        "merged_box": lambda phrase, box: box_iou(box, phrase.merged_box),
    }
    overall = {name: _Tally() for name in protocols}
    per_type: dict[str, dict[str, _Tally]] = {name: defaultdict(_Tally) for name in protocols}
    expected: set[str] = set()
    no_box = 0
    for phrase in annotations.phrases():
        expected.add(phrase.id)
        boxes = indexed[phrase.id].boxes
        no_box += not boxes
        for name, overlap in protocols.items():
            hits = _hits([overlap(phrase, box) for box in boxes], ks, iou_threshold)
            overall[name].add(hits)
            for phrase_type in phrase.types:
                per_type[name][phrase_type].add(hits)
    result: dict[str, Any] = {
        "benchmark": "flickr30k",
        "annotations": annotations.source,
        "iou_threshold": iou_threshold,
        "counts": {
            "sentences": len(annotations.sentences),
            "phrases": len(expected),
            "predictions_without_boxes": no_box,
            "ignored_predictions": len(set(indexed) - expected),
        },
        "phrase_types": annotations.has_types,
    }
    for name in protocols:
        entry: dict[str, Any] = {"overall": _recall_dict(overall[name])}
        if annotations.has_types:
            entry["per_type"] = {t: _recall_dict(per_type[name][t]) for t in sorted(per_type[name])}
        result[name] = entry
    return result


def score_refcoco(
    annotations: RefcocoAnnotations,
    predictions: Iterable[Prediction] | Mapping[str, Prediction],
    iou_threshold: float = IOU_THRESHOLD,
) -> dict[str, Any]:
    """RefCOCO/+/g ACC@0.5 (top-1; top-5/10 when more boxes are given), plain IoU and GIoU, per dataset_name."""
    indexed = _index(predictions)
    check_complete(annotations, indexed)
    expected = {expression.id for expression in annotations.expressions}
    multi = any(len(indexed[ident].boxes) > 1 for ident in expected)
    ks = RECALL_KS if multi else (1,)
    measures = {"iou": box_iou, "giou": generalized_box_iou}
    tallies: dict[str, dict[str, _Tally]] = defaultdict(lambda: {name: _Tally() for name in measures})
    no_box = 0
    for expression in annotations.expressions:
        boxes = indexed[expression.id].boxes
        no_box += not boxes
        for name, measure in measures.items():
            overlaps = [measure(box, expression.box) for box in boxes]
            tallies[expression.dataset_name][name].add(_hits(overlaps, ks, iou_threshold))
    result: dict[str, Any] = {
        "benchmark": "refcoco",
        "annotations": annotations.source,
        "iou_threshold": iou_threshold,
        "counts": {
            "expressions": len(expected),
            "predictions_without_boxes": no_box,
            "ignored_predictions": len(set(indexed) - expected),
        },
    }
    for dataset in annotations.dataset_names:
        entry: dict[str, Any] = {"expressions": tallies[dataset]["iou"].total}
        for name in measures:
            tally = tallies[dataset][name]
            entry[name] = {"acc@0.5" if k == 1 else f"top{k}_acc@0.5": tally.rate(k) for k in ks}
        result[dataset] = entry
    return result


def score(
    annotations: Annotations,
    predictions: Iterable[Prediction] | Mapping[str, Prediction],
    iou_threshold: float = IOU_THRESHOLD,
) -> dict[str, Any]:
    """Score predictions against parsed annotations of either kind; a JSON-able metrics dict."""
    if isinstance(annotations, FlickrAnnotations):
        return score_flickr(annotations, predictions, iou_threshold)
    return score_refcoco(annotations, predictions, iou_threshold)


def score_files(annotations_path: str | Path, predictions_path: str | Path) -> dict[str, Any]:
    """Read an MDETR annotation file and a predictions JSON-lines file and score them (`grit eval score`)."""
    annotations = load_annotations(annotations_path)
    metrics = score(annotations, read_predictions(predictions_path))
    metrics["predictions"] = str(predictions_path)
    return metrics
