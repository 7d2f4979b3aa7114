"""Model presets: Kosmos-2 architectures by name, built on transformers' Kosmos2ForConditionalGeneration."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from grit_pipeline.model.tokenizer import NUM_IMAGE_TOKENS

if TYPE_CHECKING:
    import torch
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
    # Initialisation for training from scratch (the architecture is unchanged). "structured": 2-D sin-cos
    # for the 1,024 location-token embeddings (tied to the LM head, so neighbouring cells score alike) and
    # the vision position embeddings, and a resampler whose image keys/values are not drowned by its
    # std-1 latent queries. "transformers": Kosmos2's own _init_weights, as the released model was trained.
    init: str = "transformers"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"{self.name}: image_size {self.image_size} is not a multiple of patch {self.patch_size}")
        if self.vision_hidden % self.vision_heads or self.text_hidden % self.text_heads:
            raise ValueError(f"{self.name}: hidden sizes must divide by the head counts")
        if self.latent_query_num != NUM_IMAGE_TOKENS:
            raise ValueError("latent_query_num must be 64 to match Kosmos2Processor's image placeholders")
        if self.init not in ("transformers", "structured"):
            raise ValueError(f"{self.name}: init is 'transformers' or 'structured', not {self.init!r}")

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
        init="structured",
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


def build_model(preset: ModelPreset, vocab_size: int, pad_token_id: int = 1, bos_token_id: int = 0,
                eos_token_id: int = 2, first_location_id: int | None = None) -> Kosmos2ForConditionalGeneration:
    """A randomly initialised Kosmos-2 of this preset (structured init needs the id of <patch_index_0000>)."""
    from transformers import Kosmos2ForConditionalGeneration

    model = Kosmos2ForConditionalGeneration(preset.to_config(vocab_size, pad_token_id, bos_token_id, eos_token_id))
    if preset.init == "structured" and first_location_id is not None:
        structured_init(model, first_location_id)
    return model


def sincos_grid(side: int, dim: int) -> torch.Tensor:
    """(side*side, dim) 2-D sin-cos features of grid cells in row-major order: half for the row, half the column."""
    import torch

    quarter = dim // 4
    frequencies = 1.0 / (64.0 ** (torch.arange(quarter) / quarter))  # wavelengths from 2*pi to 128*pi cells
    steps = torch.arange(side).float()[:, None] * frequencies
    axis = torch.cat([torch.sin(steps), torch.cos(steps)], dim=1)  # (side, dim/2)
    rows = axis[:, None, :].expand(side, side, dim // 2)
    cols = axis[None, :, :].expand(side, side, dim // 2)
    return torch.cat([rows, cols], dim=2).reshape(side * side, dim)


def structured_init(model: Kosmos2ForConditionalGeneration, first_location_id: int, grid: int = 32) -> None:
    """Location embeddings and vision positions as 2-D sin-cos; a resampler that passes the image through."""
    import math

    import torch

    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        dim = embeddings.shape[1]
        std = model.config.text_config.init_std
        # same norm as a random N(0, std) row: each sin/cos pair has norm 1, dim/2 pairs
        embeddings[first_location_id : first_location_id + grid * grid] = sincos_grid(grid, dim) * std * math.sqrt(2)
        positions = model.vision_model.model.embeddings.position_embedding.weight  # (1 + n*n, hidden)
        side = math.isqrt(positions.shape[0] - 1)
        if side * side == positions.shape[0] - 1 and positions.shape[1] % 4 == 0:
            positions[1:] = sincos_grid(side, positions.shape[1]) * 0.3
        # At transformers' init the resampler hands the decoder 64 near-identical, near-zero vectors: its
        # std-1 latent queries dominate keys and values, and query-key logits are ~0, so attention is uniform.
        # Put the (unit-norm) image features on the latents' scale and make the logits O(1): each latent
        # then pools a different part of the image from step 0, on the text embeddings' scale.
        projection = model.image_to_text_projection
        projection.latent_query.normal_(0.0, 1.0)
        projection.dense.weight.normal_(0.0, 1.0)
        # per-dim std 1 inputs: q and k per-dim std sigma*sqrt(d), scaled logits std sigma^2*d = 2
        sigma = math.sqrt(2.0 / projection.dense.weight.shape[0])
        projection.x_attn.q_proj.weight.normal_(0.0, sigma)
        projection.x_attn.k_proj.weight.normal_(0.0, sigma)


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
