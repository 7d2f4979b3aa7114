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
    # for the 1,024 location-token embeddings (tied to the LM head, so neighbouring cells score alike), and a
    # resampler that starts as a spatial pass-through whose image tokens point at their patch's location
    # tokens (positional_resampler_init). "transformers": Kosmos2's own _init_weights, as the released model
    # was trained.
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

    def to_dict(self) -> dict[str, Any]:
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


def sincos_features(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """(n, dim) 2-D sin-cos features of points (row, col) in grid-cell units: [sin row | cos row | sin col | cos col]."""
    import torch

    quarter = dim // 4
    frequencies = 1.0 / (64.0 ** (torch.arange(quarter) / quarter))  # wavelengths from 2*pi to 128*pi cells
    row_steps = rows.float()[:, None] * frequencies
    col_steps = cols.float()[:, None] * frequencies
    return torch.cat([torch.sin(row_steps), torch.cos(row_steps), torch.sin(col_steps), torch.cos(col_steps)], dim=1)


def sincos_grid(side: int, dim: int) -> torch.Tensor:
    """(side*side, dim) sin-cos features of a grid's cells in row-major order (see sincos_features)."""
    import torch

    index = torch.arange(side * side)
    return sincos_features(index // side, index % side, dim)


PATCH_EMBEDDING_GAIN = 4.0


def structured_init(model: Kosmos2ForConditionalGeneration, first_location_id: int, grid: int = 32) -> None:
    """Location embeddings as 2-D sin-cos; a resampler whose latent i reads patch i; a stronger patch embedding."""
    import math

    import torch

    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        dim = embeddings.shape[1]
        std = model.config.text_config.init_std
        # same norm as a random N(0, std) row: each sin/cos pair has norm 1, dim/2 pairs
        embeddings[first_location_id : first_location_id + grid * grid] = sincos_grid(grid, dim) * std * math.sqrt(2)
    if not positional_resampler_init(model, grid):
        random_resampler_init(model)
    with torch.no_grad():
        # At transformers' std 0.02 a patch's colour and shape are several times fainter than its position
        # in the vision features; a small model then learns *where* shapes are long before *which* shape a
        # phrase names (make e2e: two-shape scenes stayed near the baseline while single shapes were found).
        model.vision_model.model.embeddings.patch_embedding.weight.mul_(PATCH_EMBEDDING_GAIN)


def positional_resampler_init(model: Kosmos2ForConditionalGeneration, grid: int = 32, key_gain: float = 20.0,
                              latent_scale: float = 0.3, output_gain: float = 0.5) -> bool:
    """Make the resampler a spatial pass-through at step 0: latent query i attends to the patches around patch i.

    The vision position embedding of each patch is the sin-cos feature of its centre in location-grid units,
    in the layout of the location-token embeddings, so the image tokens the decoder receives already point
    at the location tokens of their patch. Attention is positional: in each resampler head, keys read a
    head_dim/2 slice of those features (sin and cos of row and column at a few frequencies), and latent query i holds patch i's
    copy of that slice in dims the keys do not read, which the query projection maps onto the key slice; so
    latents attend to the image, not to each other. Values and output are identities, scaled to the text
    embeddings' size. Returns False (nothing changed) when the shapes do not allow it: a square grid of one
    patch per latent, equal vision and text widths, and head sizes that hold whole frequency groups.
    """
    import math

    import torch

    projection = model.image_to_text_projection
    attention = projection.x_attn
    text_dim, vision_dim = projection.dense.weight.shape
    positions = model.vision_model.model.embeddings.position_embedding.weight  # (1 + side*side, vision_dim)
    side = math.isqrt(positions.shape[0] - 1)
    latents, heads, head_dim = projection.latent_query.shape[0], attention.num_heads, attention.head_dim
    half, quarter = head_dim // 2, text_dim // 4
    per_head = half // 4  # frequencies per head: each gives sin/cos of row and column
    first = quarter // 8
    if (side * side != latents or text_dim != vision_dim or half % 4 or text_dim % 4
            or first + heads * per_head > quarter):
        return False
    index = torch.arange(latents)
    cell = grid / side
    features = sincos_features((index // side + 0.5) * cell - 0.5, (index % side + 0.5) * cell - 0.5, text_dim)
    # key dims of head h: four frequency groups spread over the useful wavelengths (about 2 to 16 patches)
    key_dims = [[part * quarter + first + h + heads * m for m in range(per_head) for part in range(4)]
                for h in range(heads)]
    taken = {d for dims in key_dims for d in dims}
    free = [d for d in range(text_dim) if d not in taken]
    latent_dims = [free[h * half : (h + 1) * half] for h in range(heads)]
    key = torch.zeros(text_dim, text_dim)
    query = torch.zeros(text_dim, text_dim)
    latent = torch.zeros(latents, text_dim)
    for h in range(heads):
        for j, (source, target) in enumerate(zip(key_dims[h], latent_dims[h], strict=True)):
            key[h * head_dim + j, source] = key_gain
            query[h * head_dim + j, target] = key_gain
            latent[:, target] = features[:, source] * latent_scale
    with torch.no_grad():
        positions[1:] = features
        projection.dense.weight.copy_(torch.eye(text_dim))
        attention.k_proj.weight.copy_(key)
        attention.q_proj.weight.copy_(query)
        attention.v_proj.weight.copy_(torch.eye(text_dim))
        attention.out_proj.weight.copy_(torch.eye(text_dim) * output_gain)
        projection.latent_query.copy_(latent)
        for layer in (projection.dense, attention.k_proj, attention.q_proj, attention.v_proj, attention.out_proj):
            layer.bias.zero_()
    return True


def random_resampler_init(model: Kosmos2ForConditionalGeneration) -> None:
    """Vision positions as 2-D sin-cos; a random resampler whose image keys/values are not drowned by its latents."""
    import math

    import torch

    with torch.no_grad():
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
