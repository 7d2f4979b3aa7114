"""Grounded generation with a trained (or pretrained) Kosmos-2 checkpoint, parsed by transformers' processor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grit_pipeline.records import Box

if TYPE_CHECKING:
    import torch
    from PIL import Image

DEFAULT_PROMPT = "<grounding> An image of"


@dataclass(frozen=True, slots=True)
class GroundedEntity:
    """One phrase of the generated text with its boxes (normalised, top-left/bottom-right)."""

    phrase: str
    start: int
    end: int
    boxes: tuple[Box, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON form: phrase, [start, end] in the caption, boxes as [x1, y1, x2, y2]."""
        return {"phrase": self.phrase, "span": [self.start, self.end], "boxes": [list(b.as_tuple()) for b in self.boxes]}


@dataclass(frozen=True, slots=True)
class Generation:
    """Raw generated text (control tokens kept), the clean caption and its grounded entities."""

    text: str
    caption: str
    entities: tuple[GroundedEntity, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"text": self.text, "caption": self.caption, "entities": [e.as_dict() for e in self.entities]}


class Generator:
    """A loaded checkpoint (model + processor) that grounds prompts on images."""

    def __init__(self, checkpoint: str | Path, device: str = "auto"):
        import torch
        from transformers import Kosmos2ForConditionalGeneration
        from transformers.utils import logging as hf_logging

        from grit_pipeline.model.presets import image_size_of
        from grit_pipeline.model.tokenizer import load_processor

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        hf_logging.disable_progress_bar()  # keep stdout/stderr to the JSON result
        self.processor = load_processor(checkpoint)
        self.model = Kosmos2ForConditionalGeneration.from_pretrained(str(checkpoint)).to(self.device).eval()
        self.image_size = image_size_of(self.model)

    def prepare_image(self, image: bytes | Image.Image) -> torch.Tensor:
        """(3, S, S) uint8 pixels exactly as the training loader makes them (scaled JPEG decode for bytes)."""
        from grit_pipeline.model.data import image_pixels, load_pixels, resize_pixels

        if isinstance(image, bytes):
            return load_pixels(image, self.image_size)
        return resize_pixels(image_pixels(image), self.image_size)

    def pixel_values(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised (N, 3, S, S) pixel values with the processor's mean/std (as the training loop)."""
        from grit_pipeline.model.data import normalize_pixels

        image_processor = self.processor.image_processor
        return normalize_pixels(pixels, image_processor.image_mean, image_processor.image_std)

    def generate(self, image: bytes | Image.Image, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 64) -> Generation:
        """Greedy grounded generation after `prompt`, parsed with Kosmos2Processor.post_process_generation."""
        return self.generate_batch([image], [prompt], max_new_tokens)[0]

    def generate_batch(self, images: Sequence[bytes | Image.Image], prompts: Sequence[str],
                       max_new_tokens: int = 64, batch_size: int = 64) -> list[Generation]:
        """Greedy generation for many (image, prompt) pairs; prompts of equal token length share a batch."""
        by_length: dict[int, list[int]] = {}
        for index, prompt in enumerate(prompts):
            length = len(self.processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            by_length.setdefault(length, []).append(index)
        results: list[Generation | None] = [None] * len(prompts)
        for indices in by_length.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                texts = self._generate_texts([self.prepare_image(images[i]) for i in chunk],
                                             [prompts[i] for i in chunk], max_new_tokens)
                for index, text in zip(chunk, texts, strict=True):
                    results[index] = self._parse(text)
        return [r for r in results if r is not None]

    def _generate_texts(self, pixels: list[torch.Tensor], prompts: list[str], max_new_tokens: int) -> list[str]:
        """Decoded texts (control tokens kept) for prompts of one token length (so no padding is needed)."""
        import torch
        from PIL import Image

        # The processor writes the 64 image placeholders and the position mask; its own pixels are unused.
        placeholders = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
        inputs = self.processor(text=prompts, images=placeholders, return_tensors="pt")
        pixel_values = self.pixel_values(torch.stack(pixels))
        with torch.no_grad():
            generated = self.model.generate(
                pixel_values=pixel_values.to(self.device),
                input_ids=inputs["input_ids"].to(self.device),
                attention_mask=inputs["attention_mask"].to(self.device),
                image_embeds=None,
                image_embeds_position_mask=inputs["image_embeds_position_mask"].to(self.device),
                use_cache=True,
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
        return self.processor.batch_decode(generated, skip_special_tokens=True)

    def _parse(self, text: str) -> Generation:
        """Raw text after </image>, and the caption and entities from post_process_generation."""
        raw = self.processor.post_process_generation(text, cleanup_and_extract=False)
        caption, entities = self.processor.post_process_generation(text)
        return Generation(raw, caption, tuple(
            GroundedEntity(name, start, end, tuple(Box(*b) for b in boxes))
            for name, (start, end), boxes in entities
        ))


def draw_entities(image: Image.Image, generation: Generation, out_path: str | Path) -> None:
    """Save the image with each entity's boxes and phrase drawn on it (PNG, atomically)."""
    from PIL import ImageDraw

    from grit_pipeline.io import atomic_path

    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    palette = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))
    for index, entity in enumerate(generation.entities):
        colour = palette[index % len(palette)]
        for box in entity.boxes:
            x1, y1, x2, y2 = box.to_pixels(canvas.width, canvas.height)
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=max(1, canvas.width // 150))
            draw.text((x1 + 2, y1 + 1), entity.phrase, fill=colour)
    with atomic_path(out_path) as tmp:
        canvas.save(tmp, format="PNG")
