"""Tokenizers for the trainer: a small BPE built from the shards' text plus exactly the Kosmos-2 tokens.

The layout mirrors the released Kosmos-2 tokenizer (XLM-R style): `<s> <pad> </s> <unk>` at ids 0-3, so the
64 image placeholder ids Kosmos2Processor uses (unk + 1 ... unk + 64) are ordinary vocabulary ids; a
Metaspace pre-tokenizer; the tag tokens and the 1,024 patch-index tokens (GRIT.md section 5, in that order)
added as non-special tokens with `lstrip=True`, exactly as Kosmos2Processor adds them, so the processor
adds nothing and `decode(skip_special_tokens=True)` keeps them for `post_process_generation`.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BASE_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
TAG_TOKENS = (
    "</doc>",
    "<image>",
    "</image>",
    "</chunk>",
    "</line>",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "</delimiter_of_multi_objects/>",
    "<grounding>",
)
NUM_PATCH_INDEX_TOKENS = 1024
NUM_IMAGE_TOKENS = 64
BOI_TOKEN = "<image>"
EOI_TOKEN = "</image>"
GROUNDING_TOKEN = "<grounding>"


def patch_index_tokens(count: int = NUM_PATCH_INDEX_TOKENS) -> list[str]:
    """`<patch_index_0000>` ... in index order, zero-padded to four digits as transformers spells them."""
    return [f"<patch_index_{index:04d}>" for index in range(count)]


def kosmos2_added_tokens() -> list[str]:
    """The Kosmos-2 tokens every tokenizer of this trainer carries, in the released order."""
    return list(TAG_TOKENS) + patch_index_tokens()


def build_tokenizer(texts: Iterable[str], vocab_size: int = 4000, min_frequency: int = 2) -> PreTrainedTokenizerBase:
    """Train a Metaspace BPE on `texts` and return it as a transformers fast tokenizer with the Kosmos-2 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    # Printable ASCII in the alphabet: punctuation absent from a small corpus must not become <unk>, and the
    # base vocabulary must reach unk + 64, the last image placeholder id Kosmos2Processor uses.
    alphabet = [c for c in string.printable if not c.isspace()] + ["▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(BASE_SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.get_vocab_size() <= len(BASE_SPECIAL_TOKENS) + NUM_IMAGE_TOKENS:
        raise ValueError("base vocabulary too small to hold the 64 image placeholder ids")
    tokenizer.add_tokens([_kosmos_added_token(token) for token in kosmos2_added_tokens()])
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    # <s> text </s> like XLM-R, so Kosmos2Processor(add_eos_token=True) yields the training sequence.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def _kosmos_added_token(content: str) -> Any:
    """One added token with the flags Kosmos2Processor uses (lstrip, not normalised, not special)."""
    from tokenizers import AddedToken

    return AddedToken(content, lstrip=True, rstrip=False, normalized=False, special=False)


def check_kosmos2_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise ValueError unless every Kosmos-2 token is one token and the image placeholder ids are in range."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in kosmos2_added_tokens() if token not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks {len(missing)} Kosmos-2 tokens, e.g. {missing[:3]}")
    if tokenizer.unk_token_id is None or tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("tokenizer needs <s>, </s> and <unk>")


def build_processor(tokenizer: PreTrainedTokenizerBase, image_size: int, image_mean: Any = None, image_std: Any = None) -> Any:
    """A Kosmos2Processor around `tokenizer` whose image processor resizes straight to image_size (no crop)."""
    from transformers import Kosmos2Processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    extra = {}
    if image_mean is not None:
        extra = {"image_mean": list(image_mean), "image_std": list(image_std)}
    image_processor = CLIPImageProcessorPil(
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size},
        **extra,
    )
    return Kosmos2Processor(image_processor, tokenizer)


def load_processor(path: str | Path) -> Any:
    """Load a saved Kosmos2Processor (a run's, or a pretrained checkpoint's) from a folder or hub id."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(path))
    check_kosmos2_tokens(processor.tokenizer)
    return processor
