"""Tiny random-weight models for tests and CPU benchmarks, built locally (nothing is downloaded).

`build_tiny_grounding_dino(path)` saves a GroundingDINO checkpoint (model, BERT tokenizer, image processor)
with `save_pretrained`, so it loads through exactly the code path real checkpoints use.
"""

from __future__ import annotations

import string
from pathlib import Path

# GroundingDINO hard-codes the bert-base-uncased ids of its delimiter tokens ([CLS], [SEP], "." and "?",
# transformers' modeling_grounding_dino.SPECIAL_TOKENS); a synthetic vocabulary must put them at these ids.
_FIXED_TOKEN_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
_VOCAB_SIZE = 1200

_COMMON_WORDS = """
a an the of in on at with and or to for from by near under over behind next front top
dog dogs cat cats man men woman women child children boy girl person people puppy kitten baby
field flowers flower grass tree trees sky car cars street road house table chair sofa couch bed
bike bicycle horse bird birds ball shirt hat red blue green white black yellow small big old young
two three group beach water sea boat city building window door room kitchen food plate cup
""".split()


def synthetic_bert_vocab() -> dict[str, int]:
    """A WordPiece vocabulary that tokenises any lower-case ASCII text, with BERT's special-token ids."""
    tokens: list[str | None] = [None] * _VOCAB_SIZE
    for token, index in _FIXED_TOKEN_IDS.items():
        tokens[index] = token
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation.replace(".", "").replace("?", ""))
    pieces += ["##" + c for c in string.ascii_lowercase + string.digits]
    pieces += list(dict.fromkeys(_COMMON_WORDS))
    free = (i for i, t in enumerate(tokens) if t is None)
    for piece, index in zip(pieces, free, strict=False):  # more free ids than pieces
        tokens[index] = piece
    filled = [t if t is not None else f"[unused{i}]" for i, t in enumerate(tokens)]
    return {token: index for index, token in enumerate(filled)}


def tiny_grounding_dino_config(num_queries: int = 30, image_size: int = 64):  # -> GroundingDinoConfig
    """A GroundingDINO config small enough for CPU tests: Swin with 4 one-block stages, a one-layer BERT."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    backbone = SwinConfig(
        image_size=image_size,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(
        vocab_size=_VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
    )
    return GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,  # one decoder layer fails to tie the box-head weights
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=num_queries,
        encoder_n_points=2,
        decoder_n_points=2,
    )


def build_tiny_grounding_dino(
    path: str | Path, *, num_queries: int = 30, shortest_edge: int = 96, longest_edge: int = 128, seed: int = 0
) -> Path:
    """Save a random-weight tiny GroundingDINO with its tokenizer and image processor to `path`.

    Images are resized to a shortest edge of at least 96 px: below that the extra (stride-64) feature level
    is 1x1 and GroupNorm fails on a batch of one.
    """
    import torch
    from transformers import BertTokenizer, GroundingDinoForObjectDetection
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    path = Path(path)
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(tiny_grounding_dino_config(num_queries=num_queries)).eval()
    model.save_pretrained(path)
    BertTokenizer(vocab=synthetic_bert_vocab(), do_lower_case=True).save_pretrained(path)
    image_processor = GroundingDinoImageProcessorPil(
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge}
    )
    image_processor.save_pretrained(path)
    return path
