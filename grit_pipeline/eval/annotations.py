"""Readers for MDETR's pre-processed grounding annotations, in exactly their layouts.

Two kinds, told apart by content (`images[].dataset_name`), never by file name:

- Flickr30k Entities, `final_flickr_separateGT_{split}.json` / `final_flickr_mergedGT_{split}.json`
  (MDETR `scripts/pre-training/flickr_combined.py`): one `images[]` entry per (image, sentence) with
  `height`/`width` as strings, a global `id`, `caption`, `sentence_id`, `original_img_id` and
  `tokens_positive_eval` (one `[[start, end]]` per scored phrase, sentence order); `annotations[]` hold COCO
  xywh `bbox` and `tokens_positive` (every span of every phrase whose entity has that box).
- RefCOCO / RefCOCO+ / RefCOCOg, `finetune_refcoco*_{split}.json` (MDETR
  `scripts/fine-tuning/refexp_coco_format.py`): one `images[]` entry (int `height`/`width`, `id`,
  `original_id`, `caption`, `dataset_name`) and exactly one annotation (COCO xywh `bbox`) per expression.

A Flickr phrase's ground-truth boxes are the annotations of its sentence whose `tokens_positive` contains
one of the phrase's `tokens_positive_eval` spans exactly: the converter writes both from the same span, so
the match is exact by construction. MDETR's own evaluator instead reads the boxes (and phrase types) from
the original Flickr30k Entities `Annotations/*.xml` and `Sentences/*.txt`; the json differs from those only
where the converter merged boxes of one sentence with IoU >= 0.95 into one (it keeps the last of them).

Phrase types are not in the released files (the converter writes none). They are used when present:
`images[].phrase_types` (or `phrase_type`), a list parallel to `tokens_positive_eval` whose entries are a
type or a list of types, or `annotations[].phrase_type(s)` (a phrase takes the union of its boxes' types).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grit_pipeline.eval import EvalError

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the original image

REFCOCO_DATASETS = ("refcoco", "refcoco+", "refcocog")


class AnnotationError(EvalError):
    """An annotation file that is not one of MDETR's Flickr30k / RefCOCO layouts."""


@dataclass(frozen=True)
class FlickrPhrase:
    """One scored phrase: its prediction id, position k in `tokens_positive_eval`, spans, text, GT boxes."""

    id: str
    index: int
    spans: tuple[tuple[int, int], ...]
    text: str
    boxes: tuple[Box, ...]
    types: tuple[str, ...] = ()

    @property
    def merged_box(self) -> Box:
        """The one box enclosing all the phrase's ground-truth boxes (MERGED-box protocol)."""
        return enclosing_box(self.boxes)


@dataclass(frozen=True)
class FlickrSentence:
    """One `images[]` entry of a Flickr file: an (image, sentence) pair and its scored phrases."""

    image_id: int
    file_name: str
    height: int
    width: int
    caption: str
    sentence_id: int
    original_img_id: int
    phrases: tuple[FlickrPhrase, ...]


@dataclass(frozen=True)
class RefExpression:
    """One referring expression of a RefCOCO/+/g file and its one ground-truth box."""

    id: str
    image_id: int
    file_name: str
    height: int
    width: int
    original_id: int
    caption: str
    dataset_name: str
    box: Box


@dataclass(frozen=True)
class FlickrAnnotations:
    """A parsed Flickr30k Entities file (MDETR layout)."""

    source: str
    sentences: tuple[FlickrSentence, ...]
    kind: str = "flickr"

    @property
    def has_types(self) -> bool:
        """Whether any phrase carries a phrase type (the released files carry none)."""
        return any(phrase.types for phrase in self.phrases())

    def phrases(self) -> Iterator[FlickrPhrase]:
        """Every scored phrase, in file order."""
        for sentence in self.sentences:
            yield from sentence.phrases


@dataclass(frozen=True)
class RefcocoAnnotations:
    """A parsed RefCOCO / RefCOCO+ / RefCOCOg file (MDETR layout)."""

    source: str
    expressions: tuple[RefExpression, ...]
    kind: str = "refcoco"

    @property
    def dataset_names(self) -> list[str]:
        """The dataset names present, in first-seen order."""
        return list(dict.fromkeys(expression.dataset_name for expression in self.expressions))


Annotations = FlickrAnnotations | RefcocoAnnotations


def enclosing_box(boxes: Sequence[Sequence[float]]) -> Box:
    """The smallest xyxy box containing all `boxes` (MDETR's `_merge_boxes`)."""
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def flickr_prediction_id(original_img_id: int | str, sentence_id: int | str, k: int) -> str:
    """The public prediction id of phrase k of a Flickr sentence: `<original_img_id>_<sentence_id>_<k>`."""
    return f"{original_img_id}_{sentence_id}_{k}"


def load_annotations(path: str | Path) -> Annotations:
    """Read an MDETR Flickr30k or RefCOCO/+/g annotation file; the kind is detected from its content."""
    path = Path(path)
    if path.is_dir():
        raise AnnotationError(f"cannot read annotations {path}: a folder, not an MDETR annotation json file")
    try:
        with path.open("rb") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise AnnotationError(f"cannot read annotations {path}: no such file") from None
    except OSError as exc:
        raise AnnotationError(f"cannot read annotations {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(
            f"annotations {path} are not JSON ({exc}); expected an MDETR annotation file"
        ) from None
    return parse_annotations(data, source=str(path))


def detect_kind(data: Any, source: str = "annotations") -> str:
    """'flickr' or 'refcoco' from a loaded file's `images[].dataset_name`; AnnotationError for anything else."""
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise AnnotationError(
            f"{source} is not an MDETR annotation file (expected a JSON object with 'images' and 'annotations' "
            "lists, as final_flickr_separateGT_*.json or finetune_refcoco*_*.json)"
        )
    if not data["images"]:
        raise AnnotationError(f"{source} has no images[] entries: nothing to evaluate")
    names = {image.get("dataset_name") if isinstance(image, dict) else None for image in data["images"]}
    if names == {"flickr"}:
        return "flickr"
    if names and names <= set(REFCOCO_DATASETS):
        return "refcoco"
    shown = ", ".join(sorted(repr(name) for name in names))
    raise AnnotationError(
        f"{source} is neither MDETR's Flickr30k nor its RefCOCO/+/g layout (images[].dataset_name: {shown}; "
        "expected all 'flickr', or refcoco/refcoco+/refcocog)"
    )


def parse_annotations(data: Any, source: str = "annotations") -> Annotations:
    """Parse an already loaded MDETR annotation object (see `load_annotations`)."""
    kind = detect_kind(data, source)
    try:
        if kind == "flickr":
            return _parse_flickr(data, source)
        return _parse_refcoco(data, source)
    except AnnotationError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise AnnotationError(f"{source} is not in MDETR's {kind} layout: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    return str(exc)


def _int(value: Any, what: str) -> int:
    """An int from an int or a digit string (Flickr heights/widths are strings)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} is {value!r}, not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise ValueError(f"{what} is {value!r}, not an integer")


def _xywh_to_xyxy(bbox: Any, what: str) -> Box:
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        raise ValueError(f"{what} bbox {bbox!r} is not [x, y, width, height]")
    values = []
    for value in bbox:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{what} bbox {bbox!r} is not four finite numbers")
        values.append(float(value))
    x, y, w, h = values
    if w < 0 or h < 0:
        raise ValueError(f"{what} bbox {bbox!r} has a negative width or height")
    return (x, y, x + w, y + h)


def _span(value: Any, what: str) -> tuple[int, int]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(f"{what} span {value!r} is not [start, end]")
    start, end = _int(value[0], f"{what} span start"), _int(value[1], f"{what} span end")
    if not 0 <= start <= end:
        raise ValueError(f"{what} span {value!r} is not 0 <= start <= end")
    return (start, end)


def _types(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ValueError(f"phrase type {value!r} is not a string or a list of strings")


def _parse_flickr(data: dict, source: str) -> FlickrAnnotations:
    boxes_by_image: dict[int, list[tuple[Box, set[tuple[int, int]], tuple[str, ...]]]] = defaultdict(list)
    for number, ann in enumerate(data["annotations"]):
        what = f"annotations[{number}]"
        if not isinstance(ann, dict):
            raise ValueError(f"{what} is not an object")
        box = _xywh_to_xyxy(ann["bbox"], what)
        spans = {_span(span, what) for span in ann["tokens_positive"]}
        types = _types(ann.get("phrase_types", ann.get("phrase_type")))
        boxes_by_image[_int(ann["image_id"], f"{what} image_id")].append((box, spans, types))

    sentences = []
    seen_ids: dict[int, int] = {}
    seen_pairs: set[tuple[int, int]] = set()
    for number, image in enumerate(data["images"]):
        what = f"images[{number}]"
        image_id = _int(image["id"], f"{what} id")
        if image_id in seen_ids:
            raise AnnotationError(
                f"{source}: images[{number}] repeats id {image_id} of images[{seen_ids[image_id]}]"
            )
        seen_ids[image_id] = number
        original_img_id = _int(image["original_img_id"], f"{what} original_img_id")
        sentence_id = _int(image["sentence_id"], f"{what} sentence_id")
        if (original_img_id, sentence_id) in seen_pairs:
            raise AnnotationError(
                f"{source}: images[{number}] repeats sentence {sentence_id} of image {original_img_id}"
            )
        seen_pairs.add((original_img_id, sentence_id))
        caption = image["caption"]
        if not isinstance(caption, str):
            raise ValueError(f"{what} caption is not a string")
        entries = image["tokens_positive_eval"]
        if not isinstance(entries, list):
            raise ValueError(f"{what} tokens_positive_eval is not a list")
        image_types = image.get("phrase_types", image.get("phrase_type"))
        if image_types is not None and (
            not isinstance(image_types, list) or len(image_types) != len(entries)
        ):
            raise ValueError(f"{what} phrase_types is not a list parallel to tokens_positive_eval")
        gt = boxes_by_image.get(image_id, [])
        phrases = []
        for k, entry in enumerate(entries):
            if not isinstance(entry, list) or not entry:
                raise ValueError(
                    f"{what} tokens_positive_eval[{k}] is not a non-empty list of [start, end] spans"
                )
            spans = tuple(_span(span, f"{what} tokens_positive_eval[{k}]") for span in entry)
            if any(end > len(caption) for _, end in spans):
                raise ValueError(f"{what} tokens_positive_eval[{k}] {list(entry)} runs past the caption")
            matched = [(box, types) for box, ann_spans, types in gt if ann_spans.intersection(spans)]
            if not matched:
                raise AnnotationError(
                    f"{source}: phrase {k} of images[{number}] (id {image_id}, span {list(spans[0])}) has no "
                    "annotation whose tokens_positive contains its span"
                )
            types = _types(image_types[k]) if image_types is not None else ()
            if not types:
                types = tuple(dict.fromkeys(t for _, box_types in matched for t in box_types))
            phrases.append(
                FlickrPhrase(
                    id=flickr_prediction_id(original_img_id, sentence_id, k),
                    index=k,
                    spans=spans,
                    text=" ".join(caption[start:end] for start, end in spans),
                    boxes=tuple(box for box, _ in matched),
                    types=types,
                )
            )
        sentences.append(
            FlickrSentence(
                image_id=image_id,
                file_name=str(image["file_name"]),
                height=_int(image["height"], f"{what} height"),
                width=_int(image["width"], f"{what} width"),
                caption=caption,
                sentence_id=sentence_id,
                original_img_id=original_img_id,
                phrases=tuple(phrases),
            )
        )
    return FlickrAnnotations(source=source, sentences=tuple(sentences))


def _parse_refcoco(data: dict, source: str) -> RefcocoAnnotations:
    boxes: dict[int, list[Box]] = defaultdict(list)
    for number, ann in enumerate(data["annotations"]):
        what = f"annotations[{number}]"
        if not isinstance(ann, dict):
            raise ValueError(f"{what} is not an object")
        boxes[_int(ann["image_id"], f"{what} image_id")].append(_xywh_to_xyxy(ann["bbox"], what))

    expressions = []
    seen: set[int] = set()
    for number, image in enumerate(data["images"]):
        what = f"images[{number}]"
        image_id = _int(image["id"], f"{what} id")
        if image_id in seen:
            raise AnnotationError(f"{source}: images[{number}] repeats id {image_id}")
        seen.add(image_id)
        gt = boxes.get(image_id, [])
        if len(gt) != 1:
            raise AnnotationError(
                f"{source}: expression id {image_id} has {len(gt)} annotations; MDETR's RefCOCO layout has exactly 1"
            )
        caption = image["caption"]
        if not isinstance(caption, str):
            raise ValueError(f"{what} caption is not a string")
        expressions.append(
            RefExpression(
                id=str(image_id),
                image_id=image_id,
                file_name=str(image["file_name"]),
                height=_int(image["height"], f"{what} height"),
                width=_int(image["width"], f"{what} width"),
                original_id=_int(image["original_id"], f"{what} original_id"),
                caption=caption,
                dataset_name=image["dataset_name"],
                box=gt[0],
            )
        )
    return RefcocoAnnotations(source=source, expressions=tuple(expressions))
