"""Grounded generation with a trained (or pretrained) Kosmos-2 checkpoint, parsed by transformers' processor."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grit_pipeline.records import Box

if TYPE_CHECKING:
    import torch
    from PIL import Image

DEFAULT_PROMPT = "<grounding> An image of"
# What a checkpoint folder holds besides config.json: its weights, and its processor (tokenizer) files.
_WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")
_PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
_CHECKPOINT_FORMS = "a checkpoint folder (RUN/checkpoints/step_N), a run folder or a hub id"
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # NAME or OWNER/NAME; anything else can only be a path


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, empty, not cached offline, hub unreachable); raised before
    any model code runs, with one line that says which and why."""


def resolve_checkpoint(checkpoint: str, follow_latest: bool = True) -> str:
    """The folder `checkpoint` names (a run folder: its latest checkpoint, when `follow_latest`), or the
    hub id itself once it is known to be loadable; CheckpointError otherwise.

    A hub id (NAME or OWNER/NAME that is not an existing path) is looked up in the hub cache; only when not
    offline (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE) and not cached is the hub contacted, and a hub that
    cannot be reached fails within seconds rather than after huggingface_hub's retries.
    """
    local = Path(checkpoint).expanduser()
    if local.exists() or checkpoint.startswith((".", "~")) or not _HUB_ID.fullmatch(checkpoint):
        return str(_checkpoint_folder(local, follow_latest))
    return _hub_checkpoint(checkpoint)


def _checkpoint_folder(path: Path, follow_latest: bool) -> Path:
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass {_CHECKPOINT_FORMS}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a file; pass {_CHECKPOINT_FORMS}")
    if follow_latest and (path / "latest").is_file():
        name = (path / "latest").read_text(encoding="utf-8", errors="replace").strip()
        if not name or not (path / "checkpoints" / name).is_dir():
            raise CheckpointError(f"run folder {str(path)!r}: its 'latest' names checkpoint {name!r}, which is not "
                                  f"in {str(path / 'checkpoints')!r}")
        path = path / "checkpoints" / name
    elif (path / "checkpoints").is_dir() and not any((path / f).is_file() for f in _WEIGHTS_FILES):
        raise CheckpointError(f"run folder {str(path)!r} has no complete checkpoint yet (no 'latest'); pass "
                              f"one of its checkpoints/step_N folders")
    missing = [what for what, names in (("config.json", ("config.json",)), ("model weights", _WEIGHTS_FILES),
                                        ("tokenizer or processor files", _PROCESSOR_FILES))
               if not any((path / name).is_file() for name in names)]
    if missing:
        raise CheckpointError(f"{str(path)!r} is not a Kosmos-2 checkpoint (no {', no '.join(missing)}); pass "
                              f"{_CHECKPOINT_FORMS}")
    return path


def _hub_checkpoint(repo: str) -> str:
    from transformers import AutoConfig

    from grit_pipeline.stages.detector_loading import hub_offline, hub_unreachable

    try:
        AutoConfig.from_pretrained(repo, local_files_only=True)
        return repo
    except (OSError, ValueError) as cached_miss:
        if hub_offline():
            raise CheckpointError(f"checkpoint {repo!r} is not a local folder, and no cached copy of it is in the "
                                  f"hub cache while offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE); pass "
                                  f"{_CHECKPOINT_FORMS}") from cached_miss
    unreachable = hub_unreachable()
    if unreachable is not None:
        raise CheckpointError(f"checkpoint {repo!r} is not a local folder nor in the hub cache, and {unreachable}; "
                              f"pass {_CHECKPOINT_FORMS}")
    return repo


@dataclass(frozen=True, slots=True)
class GroundedEntity:
    """One phrase of the generated text with its boxes (normalised, top-left/bottom-right)."""

    phrase: str
    start: int
    end: int
    boxes: tuple[Box, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON form: phrase, [start, end] in the caption, boxes as [x1, y1, x2, y2]."""
        return {"phrase": self.phrase, "span": [self.start, self.end], "boxes": [list(b.as_tuple()) for b in self.boxes]}


@dataclass(frozen=True, slots=True)
class Generation:
    """Raw generated text (control tokens kept), the clean caption and its grounded entities."""

    text: str
    caption: str
    entities: tuple[GroundedEntity, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"text": self.text, "caption": self.caption, "entities": [e.to_dict() for e in self.entities]}


class Generator:
    """A loaded checkpoint (model + processor) that grounds prompts on images."""

    def __init__(self, checkpoint: str | Path, device: str = "auto") -> None:
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
        from grit_pipeline.model.pixels import image_pixels, load_pixels, resize_pixels

        if isinstance(image, bytes):
            return load_pixels(image, self.image_size)
        return resize_pixels(image_pixels(image), self.image_size)

    def pixel_values(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised (N, 3, S, S) pixel values with the processor's mean/std (as the training loop)."""
        from grit_pipeline.model.pixels import normalize_pixels

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
