"""Model presets: Kosmos-2 architectures by name, built on transformers' Kosmos2ForConditionalGeneration."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from grit_pipeline.model.tokenizer import NUM_IMAGE_TOKENS

if TYPE_CHECKING:
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration


@dataclass(frozen=True, slots=True)
class ModelPreset:
    """One Kosmos-2 architecture: the vision tower, the resampler size and the text decoder."""

    name: str
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_ffn: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_ffn: int
    max_positions: int
    dropout: float
    # Kosmos2Processor always writes 64 placeholders, so the resampler must emit exactly 64 embeddings.
    latent_query_num: int = NUM_IMAGE_TOKENS

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"{self.name}: image_size {self.image_size} is not a multiple of patch {self.patch_size}")
        if self.vision_hidden % self.vision_heads or self.text_hidden % self.text_heads:
            raise ValueError(f"{self.name}: hidden sizes must divide by the head counts")
        if self.latent_query_num != NUM_IMAGE_TOKENS:
            raise ValueError("latent_query_num must be 64 to match Kosmos2Processor's image placeholders")

    def to_config(self, vocab_size: int, pad_token_id: int = 1, bos_token_id: int = 0, eos_token_id: int = 2) -> Kosmos2Config:
        """The transformers Kosmos2Config of this preset for a tokenizer of `vocab_size` tokens."""
        from transformers import Kosmos2Config

        vision = {
            "hidden_size": self.vision_hidden,
            "intermediate_size": self.vision_ffn,
            "num_hidden_layers": self.vision_layers,
            "num_attention_heads": self.vision_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
        }
        text = {
            "vocab_size": vocab_size,
            "embed_dim": self.text_hidden,
            "layers": self.text_layers,
            "ffn_dim": self.text_ffn,
            "attention_heads": self.text_heads,
            "max_position_embeddings": self.max_positions,
            "dropout": self.dropout,
            "attention_dropout": self.dropout,
            "pad_token_id": pad_token_id,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
        }
        return Kosmos2Config(vision_config=vision, text_config=text, latent_query_num=self.latent_query_num)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields."""
        return asdict(self)


PRESETS: dict[str, ModelPreset] = {
    # Trains on a 2-core CPU in minutes: 64x64 images in 8x8 patches give 64 vision tokens.
    "tiny": ModelPreset(
        name="tiny",
        image_size=64,
        patch_size=8,
        vision_hidden=128,
        vision_layers=2,
        vision_heads=4,
        vision_ffn=512,
        text_hidden=128,
        text_layers=2,
        text_heads=4,
        text_ffn=512,
        max_positions=256,
        dropout=0.0,
    ),
    # microsoft/kosmos-2-patch14-224 (GRIT.md section 6): CLIP ViT-L/14 at 224, 24-layer 2048-wide decoder.
    "kosmos-2": ModelPreset(
        name="kosmos-2",
        image_size=224,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
        vision_ffn=4096,
        text_hidden=2048,
        text_layers=24,
        text_heads=32,
        text_ffn=8192,
        max_positions=2048,
        dropout=0.1,
    ),
}

KOSMOS2_VOCAB_SIZE = 65037


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`; ValueError lists the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def build_model(preset: ModelPreset, vocab_size: int, pad_token_id: int = 1, bos_token_id: int = 0, eos_token_id: int = 2) -> Kosmos2ForConditionalGeneration:
    """A randomly initialised Kosmos-2 of this preset."""
    from transformers import Kosmos2ForConditionalGeneration

    return Kosmos2ForConditionalGeneration(preset.to_config(vocab_size, pad_token_id, bos_token_id, eos_token_id))


def count_parameters(preset: ModelPreset, vocab_size: int) -> int:
    """Parameter count of the preset, built on the meta device so no memory is allocated."""
    import torch

    with torch.device("meta"):
        model = build_model(preset, vocab_size)
    return sum(parameter.numel() for parameter in model.parameters())


def image_size_of(model: Kosmos2ForConditionalGeneration) -> int:
    """The square input size the model's vision tower expects."""
    size = model.config.vision_config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)
