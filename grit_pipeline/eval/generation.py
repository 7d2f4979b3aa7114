"""The generation half of `grit eval flickr30k|refcoco`: Kosmos-2's prompts, batched greedy generation, box decoding.

Faithful to Kosmos-2's own evaluation (microsoft/unilm, kosmos-2/evaluation/):
- prompts: Flickr30k Entities, one per scored phrase (flickr_entities/cook_data.py):
  `<grounding>` + caption[:start] + ` <phrase>` + phrase + `</phrase>` (two spaces before `<phrase>` when the
  caption prefix ends with one); RefCOCO/+/g (refcoco/cook_data.py): `<grounding><phrase>` + expression + `</phrase>`.
- images resized straight to the vision tower's square size, bicubic (caption_obj_few_shot.py `square_transform`,
  and the released processor's CLIPImageProcessor); a `grit train` checkpoint gets the pixels it was trained on.
- greedy decoding, beam 1, no-repeat-ngram 3 (grd-zeroshot-flickr.sh / grd-zeroshot-refcoco.sh).
- decoding (flickr_entities/decode_string.py = refcoco/decode_string.py = transformers' `patch_index_to_coordinate`):
  every `<phrase>P</phrase><object>...</object>` in the prompt plus generation; the boxes of those whose P equals
  the query phrase (stripped) count, in generation order (flickr_entities_evaluate.py, refexp_evaluate.py).
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from grit_pipeline.eval.annotations import FlickrSentence, RefExpression

log = logging.getLogger(__name__)

GRID = 32  # Kosmos-2's 1,024 patch-index tokens: a 32 x 32 grid
DEFAULT_MAX_NEW_TOKENS = 64  # one object with up to ~20 boxes (3 tokens a box), and some caption after it
_ENTITY = re.compile(  # unilm kosmos-2/evaluation/*/decode_string.py, find_patch_index_combinations
    r"(?:(<phrase>([^<]+)</phrase>))?<object>((?:<patch_index_\d+><patch_index_\d+>"
    r"</delimiter_of_multi_objects/>)*<patch_index_\d+><patch_index_\d+>)</object>"
)
_PATCH = re.compile(r"<patch_index_(\d+)>")
_IMAGE_CACHE_SIZE = 64  # decoded images kept: a Flickr image serves up to ~20 phrase queries
_RESIZE_ATTR = "_grit_eval_resize"  # set on the model by load_grounding_model: "grit" or "bicubic"


@dataclass(frozen=True, slots=True)
class GroundingQuery:
    """One thing to ground: its prediction id, the image (path and original size), Kosmos-2's prompt and the phrase."""

    id: str
    image_path: str
    width: float
    height: float
    prompt: str
    phrase: str


def flickr_prompt(caption: str, start: int, end: int) -> str:
    """Kosmos-2's Flickr prompt for the phrase caption[start:end] (unilm flickr_entities/cook_data.py)."""
    return f"<grounding>{caption[:start]} <phrase>{caption[start:end]}</phrase>"


def refexp_prompt(expression: str) -> str:
    """Kosmos-2's RefCOCO prompt for one referring expression (unilm refcoco/cook_data.py)."""
    return f"<grounding><phrase>{expression}</phrase>"


def flickr_queries(sentences: Iterable[FlickrSentence], images_dir: str | Path) -> list[GroundingQuery]:
    """One query per scored phrase (tokens_positive_eval order), with the phrase's prediction id; a phrase
    with several spans is prompted at its first, as unilm does."""
    queries = []
    for sentence in sentences:
        image_path = str(Path(images_dir) / sentence.file_name)
        for phrase in sentence.phrases:
            start, end = phrase.spans[0]
            queries.append(GroundingQuery(id=phrase.id, image_path=image_path, width=float(sentence.width),
                                          height=float(sentence.height),
                                          prompt=flickr_prompt(sentence.caption, start, end),
                                          phrase=sentence.caption[start:end]))
    return queries


def refexp_queries(expressions: Iterable[RefExpression], images_dir: str | Path) -> list[GroundingQuery]:
    """One query per referring expression, id str(images[].id)."""
    return [GroundingQuery(id=str(e.id), image_path=str(Path(images_dir) / e.file_name), width=float(e.width),
                           height=float(e.height), prompt=refexp_prompt(e.caption), phrase=e.caption)
            for e in expressions]


def missing_images(queries: Iterable[GroundingQuery]) -> list[str]:
    """The image paths of `queries` that are not files, each once, in query order."""
    seen: dict[str, None] = {}
    for query in queries:
        if query.image_path not in seen and not Path(query.image_path).is_file():
            seen[query.image_path] = None
    return list(seen)


def patch_index_box(ul: int, lr: int, grid: int = GRID) -> tuple[float, float, float, float]:
    """Normalised (x1, y1, x2, y2) of a patch-index pair: cell centres, or cell edges when the two corners share a
    row or a column (or are one cell); unilm decode_string.get_box_coords_from_index, = transformers'
    patch_index_to_coordinate."""
    cell = 1.0 / grid
    ul_x, ul_y, lr_x, lr_y = ul % grid, ul // grid, lr % grid, lr // grid
    if ul == lr or ul_x == lr_x or ul_y == lr_y:
        return ul_x * cell, ul_y * cell, (lr_x + 1) * cell, (lr_y + 1) * cell
    return (ul_x + 0.5) * cell, (ul_y + 0.5) * cell, (lr_x + 0.5) * cell, (lr_y + 0.5) * cell


def decode_entities(text: str, grid: int = GRID) -> list[tuple[str | None, list[tuple[float, float, float, float]]]]:
    """Every `[<phrase>P</phrase>]<object>...</object>` of `text`, in order: (P or None, its normalised boxes)."""
    entities = []
    for match in _ENTITY.finditer(text):
        phrase = match.group(2) if match.group(1) else None
        boxes = []
        for pair in match.group(3).split("</delimiter_of_multi_objects/>"):
            ul, lr = (int(v) for v in _PATCH.findall(pair))
            boxes.append(patch_index_box(ul, lr, grid))
        entities.append((phrase, boxes))
    return entities


def decode_boxes(text: str, phrase: str, width: float, height: float, grid: int = GRID) -> list[list[float]]:
    """Pixel [x1, y1, x2, y2] boxes of the objects of `phrase` in `text` (prompt + generation), in generation order.

    Only objects whose decoded phrase equals `phrase` (both stripped) count, as in unilm's evaluators. An inverted
    pair (lower-right corner left of or above the upper-left one) keeps its rank as a zero-area box at its first
    corner: it can never overlap, as its IoU is 0 in unilm's box_iou too, and x2 >= x1, y2 >= y1 hold.
    """
    wanted = phrase.strip()
    boxes = []
    for name, normalised in decode_entities(text, grid):
        if name is None or name.strip() != wanted:
            continue
        for x1, y1, x2, y2 in normalised:
            if x2 < x1 or y2 < y1:
                x2, y2 = x1, y1
            boxes.append([x1 * width, y1 * height, x2 * width, y2 * height])
    return boxes


def load_grounding_model(checkpoint: str, device: str | None = None) -> tuple[Any, Any]:
    """(model, processor) of a `grit train` checkpoint (run or checkpoint folder) or a transformers Kosmos-2
    checkpoint (local folder or hub id, microsoft/kosmos-2-patch14-224 layout); CheckpointError when unusable."""
    import torch
    from transformers import Kosmos2ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from grit_pipeline.model.generate import CheckpointError, resolve_checkpoint
    from grit_pipeline.model.tokenizer import load_processor

    resolved = resolve_checkpoint(checkpoint)  # honours HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE
    hf_logging.disable_progress_bar()
    try:
        processor = load_processor(resolved)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {checkpoint!r} has no usable Kosmos-2 processor: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    try:
        model = Kosmos2ForConditionalGeneration.from_pretrained(resolved, dtype=torch.float32)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {checkpoint!r} is not a loadable Kosmos-2 model: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    target = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(target).eval()
    # A grit train checkpoint (state.json beside the weights) is fed the pixels it was trained on.
    setattr(model, _RESIZE_ATTR, "grit" if (Path(resolved) / "state.json").is_file() else "bicubic")
    return model, processor


def generate_predictions(model: Any, processor: Any, queries: Sequence[GroundingQuery], batch_size: int = 32,
                         device: str | None = None, progress: bool = True,
                         max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[dict[str, Any]]:
    """Greedy grounded generation for `queries`, in their order: {"id", "boxes" (pixels, generation order), "text"}.

    Batches hold prompts of one token length (no padding, so each result equals an unbatched run); bf16 autocast
    on CUDA, float32 on CPU. An image that cannot be read is a miss (no boxes) with an "error" key, and logged.
    """
    import torch
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    target = torch.device(device) if device else next(model.parameters()).device
    if next(model.parameters()).device != target:
        model = model.to(target)
    grid = math.isqrt(int(getattr(processor, "num_patch_index_tokens", GRID * GRID)))
    pixels = _PixelSource(model, processor)
    results: list[dict[str, Any] | None] = [None] * len(queries)
    by_length: dict[int, list[int]] = {}
    for index, query in enumerate(queries):
        length = len(processor.tokenizer(query.prompt, add_special_tokens=False)["input_ids"])
        by_length.setdefault(length, []).append(index)
    bar = tqdm(total=len(queries), file=sys.stderr, disable=not progress, unit="query", desc="generating")
    try:
        for length in sorted(by_length):
            indices = by_length[length]
            for start in range(0, len(indices), batch_size):
                chunk, images = [], []
                for index in indices[start : start + batch_size]:
                    try:
                        images.append(pixels.get(queries[index].image_path))
                        chunk.append(index)
                    except Exception as exc:  # noqa: BLE001 - any decode failure is a reported miss
                        message = f"cannot read image {queries[index].image_path}: {exc}"
                        log.warning("query %s: %s", queries[index].id, message)
                        results[index] = {"id": queries[index].id, "boxes": [], "text": "", "error": message}
                if chunk:
                    texts = _generate(model, processor, pixels, [queries[i].prompt for i in chunk], images,
                                      target, max_new_tokens)
                    for index, text in zip(chunk, texts, strict=True):
                        query = queries[index]
                        results[index] = {"id": query.id, "text": text,
                                          "boxes": decode_boxes(text, query.phrase, query.width, query.height, grid)}
                bar.update(len(indices[start : start + batch_size]))
    finally:
        bar.close()
    return [r for r in results if r is not None]


class _PixelSource:
    """(3, S, S) uint8 pixels of an image file, resized straight to the model's size; the last few kept."""

    def __init__(self, model: Any, processor: Any) -> None:
        from grit_pipeline.model.presets import image_size_of

        self.size = image_size_of(model)
        self.grit = getattr(model, _RESIZE_ATTR, "bicubic") == "grit"
        image_processor = processor.image_processor
        self.mean, self.std = image_processor.image_mean, image_processor.image_std
        self.resample = getattr(image_processor, "resample", None)
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, path: str) -> torch.Tensor:
        """The pixels of one image file (OSError and PIL's errors when it cannot be decoded)."""
        if path in self.cache:
            self.cache.move_to_end(path)
            return self.cache[path]
        pixels = self._load(path)
        self.cache[path] = pixels
        if len(self.cache) > _IMAGE_CACHE_SIZE:
            self.cache.popitem(last=False)
        return pixels

    def _load(self, path: str) -> torch.Tensor:
        from PIL import Image

        from grit_pipeline.model.pixels import image_pixels, load_pixels

        if self.grit:  # as training and `grit generate`: scaled JPEG decode, antialiased bilinear resize
            return load_pixels(Path(path).read_bytes(), self.size)
        # as Kosmos-2 (torchvision Resize((224, 224), BICUBIC) on PIL) and its CLIPImageProcessor (resample 3)
        try:
            resample = Image.Resampling(int(self.resample))
        except (TypeError, ValueError):
            resample = Image.Resampling.BICUBIC
        with Image.open(path) as image:
            return image_pixels(image.convert("RGB").resize((self.size, self.size), resample=resample))

    def normalise(self, batch: list[torch.Tensor]) -> torch.Tensor:
        """Float (N, 3, S, S) pixel values with the processor's mean and std."""
        import torch

        from grit_pipeline.model.pixels import normalize_pixels

        return normalize_pixels(torch.stack(batch), self.mean, self.std)


def _generate(model: Any, processor: Any, pixels: _PixelSource, prompts: list[str], images: list[torch.Tensor],
              device: torch.device, max_new_tokens: int) -> list[str]:
    """Prompt + decoded continuation (control tokens kept) for prompts of one token length."""
    import contextlib

    import torch
    from PIL import Image

    # The processor writes <image>, the 64 placeholders, </image> and the position mask; its pixels are unused.
    placeholder = Image.new("RGB", (pixels.size, pixels.size))
    inputs = processor(text=prompts, images=[placeholder] * len(prompts), return_tensors="pt")
    if len(prompts) > 1 and not bool(inputs["attention_mask"].all()):  # padded after all: one prompt at a time
        return [text for prompt, image in zip(prompts, images, strict=True)
                for text in _generate(model, processor, pixels, [prompt], [image], device, max_new_tokens)]
    input_ids = inputs["input_ids"].to(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        generated = model.generate(
            pixel_values=pixels.normalise(images).to(device),
            input_ids=input_ids,
            attention_mask=inputs["attention_mask"].to(device),
            image_embeds=None,
            image_embeds_position_mask=inputs["image_embeds_position_mask"].to(device),
            use_cache=True,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            no_repeat_ngram_size=3,
        )
    # Kosmos2's generate returns the prompt followed by the new tokens.
    continuations = processor.tokenizer.batch_decode(generated[:, input_ids.shape[1]:], skip_special_tokens=True,
                                                     clean_up_tokenization_spaces=False)
    texts = []
    for prompt, continuation in zip(prompts, continuations, strict=True):
        if continuation.lstrip().startswith("<object>"):
            continuation = continuation.lstrip()  # fairseq's detokeniser joins </phrase><object> too
        texts.append(prompt + continuation)
    return texts
