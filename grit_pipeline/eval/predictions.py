"""The public predictions format: JSON lines `{"id": ..., "boxes": [[x1, y1, x2, y2], ...], "text": ...}`.

One line per scored item: a Flickr phrase (`id` = `"<original_img_id>_<sentence_id>_<k>"`, k its position in
`tokens_positive_eval`) or a RefCOCO expression (`id` = `str(images[].id)`). `boxes` are ranked, best first,
in pixels of the original image, x2 >= x1 and y2 >= y1; an empty list is a miss. `text` (the raw
generation) is optional. Any model's output written this way can be scored with `grit eval score`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grit_pipeline.eval import EvalError
from grit_pipeline.eval.annotations import Annotations, Box, FlickrAnnotations


class PredictionError(EvalError):
    """A predictions file or record that is not in the public predictions format."""


def _check_box(box: Any) -> Box:
    if not isinstance(box, list | tuple) or len(box) != 4:
        raise ValueError(f"box {box!r} is not [x1, y1, x2, y2]")
    if any(isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) for v in box):
        raise ValueError(f"box {box!r} is not four finite numbers")
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"box {list(box)!r} has x2 < x1 or y2 < y1 (boxes are [x1, y1, x2, y2])")
    return (x1, y1, x2, y2)


@dataclass(frozen=True)
class Prediction:
    """One prediction: the scored item's id, its ranked xyxy pixel boxes, the raw generation (optional)."""

    id: str
    boxes: tuple[Box, ...] = field(default=())
    text: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"id {self.id!r} is not a non-empty string")
        if not isinstance(self.boxes, list | tuple):
            raise ValueError(f"boxes {self.boxes!r} is not a list of [x1, y1, x2, y2]")
        object.__setattr__(self, "boxes", tuple(_check_box(box) for box in self.boxes))
        if self.text is not None and not isinstance(self.text, str):
            raise ValueError(f"text {self.text!r} is not a string")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of one predictions line (`text` left out when None)."""
        record: dict[str, Any] = {"id": self.id, "boxes": [list(box) for box in self.boxes]}
        if self.text is not None:
            record["text"] = self.text
        return record

    @classmethod
    def from_dict(cls, record: Any) -> Prediction:
        """A Prediction from one decoded JSON line; ValueError says what is wrong."""
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        if "id" not in record or "boxes" not in record:
            raise ValueError("needs 'id' and 'boxes'")
        ident = record["id"]
        if isinstance(ident, int) and not isinstance(ident, bool):
            ident = str(ident)  # RefCOCO ids written as numbers are accepted
        return cls(id=ident, boxes=record["boxes"], text=record.get("text"))


def read_predictions(path: str | Path) -> list[Prediction]:
    """Read a predictions JSON-lines file; a bad or repeated line is a PredictionError naming the line."""
    path = Path(path)
    if path.is_dir():
        raise PredictionError(f"cannot read predictions {path}: a folder, not a JSON-lines file")
    predictions: list[Prediction] = []
    first_line: dict[str, int] = {}
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    prediction = Prediction.from_dict(json.loads(line))
                except ValueError as exc:  # json.JSONDecodeError is a ValueError
                    raise PredictionError(
                        f"{path} line {number} is not a prediction ({exc}); expected "
                        '{"id": ..., "boxes": [[x1, y1, x2, y2], ...], "text": ...}'
                    ) from None
                if prediction.id in first_line:
                    raise PredictionError(
                        f"{path} line {number} repeats id {prediction.id!r} of line {first_line[prediction.id]}"
                    )
                first_line[prediction.id] = number
                predictions.append(prediction)
    except FileNotFoundError:
        raise PredictionError(f"cannot read predictions {path}: no such file") from None
    except UnicodeDecodeError:
        raise PredictionError(f"cannot read predictions {path}: not UTF-8 text") from None
    except OSError as exc:
        raise PredictionError(f"cannot read predictions {path}: {exc.strerror or exc}") from None
    return predictions


def write_predictions(path: str | Path, predictions: Iterable[Prediction]) -> int:
    """Write predictions as JSON lines atomically (a temp file beside `path`, then a rename); returns the count."""
    path = Path(path)
    count = 0
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for prediction in predictions:
                handle.write(json.dumps(prediction.to_dict(), ensure_ascii=False) + "\n")
                count += 1
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return count


def prediction_ids(annotations: Annotations) -> list[str]:
    """The ids a complete predictions file for `annotations` must have, in annotation order."""
    if isinstance(annotations, FlickrAnnotations):
        return [phrase.id for phrase in annotations.phrases()]
    return [expression.id for expression in annotations.expressions]
