"""One shard sample to model inputs: the text choice, tokens exactly as Kosmos2Processor, pixels, and batches."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from grit_pipeline.model.pixels import CLIP_MEAN, CLIP_STD, load_pixels, normalize_pixels
from grit_pipeline.model.tokenizer import BOI_TOKEN, EOI_TOKEN, NUM_IMAGE_TOKENS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from grit_pipeline.model.data import DataConfig

# <s> <image> [64 image embeddings] </image>: no loss on any of these.
PREFIX_LENGTH = NUM_IMAGE_TOKENS + 3


@dataclass(frozen=True, slots=True)
class EncodedSample:
    """One training example: token ids (with the image prefix), labels and the (3, S, S) uint8 pixels."""

    key: str
    input_ids: list[int]
    labels: list[int]
    image: torch.Tensor


def grounded_choice(seed: int, epoch: int, key: str, grounded_prob: float) -> bool:
    """Whether this sample is shown grounded in this epoch: a pure function of (seed, epoch, key)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < grounded_prob


class SampleEncoder:
    """Raw shard sample -> EncodedSample: text choice, tokens exactly as Kosmos2Processor, resized image."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_size: int, config: DataConfig) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.config = config
        self.prefix_ids = image_prefix_ids(tokenizer)
        self.eos_id = int(tokenizer.eos_token_id)
        # The Rust tokenizer directly: the transformers wrapper costs more than the tokenization itself.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)

    def text_for(self, sample: dict[str, Any], epoch: int) -> str:
        """Grounded text (from .txt, or re-serialised in phrase mode) or the sanitised plain caption."""
        from grit_pipeline.stages.serialize import sanitize_caption

        meta = json.loads(sample["json"])
        key = str(sample.get("__key__", meta.get("key", "")))
        if grounded_choice(self.config.seed, epoch, key, self.config.grounded_prob):
            grounded = self._grounded_text(sample, meta)
            if grounded:
                return grounded
        caption = str(meta.get("caption", "")).strip()
        if not caption:
            raise ValueError("empty caption")
        return sanitize_caption(caption)

    def _grounded_text(self, sample: dict[str, Any], meta: dict[str, Any]) -> str | None:
        """The shard's own .txt in expression mode; phrase mode re-serialises the record from its .json."""
        if self.config.span_mode == "expression" and "txt" in sample:
            return sample["txt"].decode("utf-8")
        from grit_pipeline.records import GritRecord
        from grit_pipeline.stages.serialize import SerializeConfig, serialize_record

        fields = {name: meta[name] for name in GritRecord.__dataclass_fields__ if name in meta}
        return serialize_record(GritRecord.from_row(fields), SerializeConfig(mode=self.config.span_mode)).text

    def encode_text(self, text: str) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for `text` after the image prefix; no loss on the prefix."""
        if self._backend is not None:
            body = self._backend.encode(" " + text.strip(), add_special_tokens=False).ids
        else:
            body = self.tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"]
        body = body[: self.config.max_length - len(self.prefix_ids) - 1] + [self.eos_id]
        input_ids = self.prefix_ids + body
        labels = [-100] * len(self.prefix_ids) + body
        return input_ids, labels

    def __call__(self, sample: dict[str, Any], epoch: int) -> EncodedSample:
        """Encode one raw sample; raises on anything malformed (the caller counts and skips it)."""
        image_bytes = sample.get("jpg") or sample.get("jpeg") or sample.get("png")
        if not image_bytes:
            raise KeyError("no image in sample")
        input_ids, labels = self.encode_text(self.text_for(sample, epoch))
        pixels = load_pixels(image_bytes, self.image_size)
        return EncodedSample(str(sample.get("__key__", "")), input_ids, labels, pixels)


def image_prefix_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """`<s> <image> [64 placeholder ids] </image>` as Kosmos2Processor writes it (placeholders: unk+1 ...)."""
    first = int(tokenizer.unk_token_id) + 1
    boi, eoi = tokenizer.convert_tokens_to_ids([BOI_TOKEN, EOI_TOKEN])
    return [int(tokenizer.bos_token_id), int(boi), *range(first, first + NUM_IMAGE_TOKENS), int(eoi)]


def image_embeds_position_mask(length: int) -> list[int]:
    """1 on the 64 image-embedding positions after `<s> <image>`, 0 elsewhere (as Kosmos2Processor)."""
    return [0, 0] + [1] * NUM_IMAGE_TOKENS + [0] * (length - NUM_IMAGE_TOKENS - 2)


def collate(samples: Sequence[EncodedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad samples into model inputs; pixels stay uint8 (N, 3, H, W): `normalize_pixels` runs on the device."""
    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), -100, dtype=torch.long)
    attention = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        input_ids[row, : len(sample.input_ids)] = torch.tensor(sample.input_ids)
        labels[row, : len(sample.labels)] = torch.tensor(sample.labels)
        attention[row, : len(sample.input_ids)] = 1
    position = torch.tensor(image_embeds_position_mask(length), dtype=torch.long).expand(len(samples), -1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "image_embeds_position_mask": position.contiguous(),
        "labels": labels,
        "pixels": torch.stack([s.image for s in samples]),
    }


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD) -> dict[str, torch.Tensor]:
    """A collated batch moved to `device` with pixels normalised there (uint8 crosses the bus, not float)."""
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "pixels"}
    inputs["pixel_values"] = normalize_pixels(batch["pixels"].to(device, non_blocking=True), mean, std)
    return inputs
