"""The trainer's tokenizer and its token layout against transformers' Kosmos2Processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from grit_pipeline.model.data import DataConfig
from grit_pipeline.model.encoding import (
    PREFIX_LENGTH,
    EncodedSample,
    SampleEncoder,
    collate,
    image_embeds_position_mask,
)
from grit_pipeline.model.tokenizer import (
    TAG_TOKENS,
    build_processor,
    build_tokenizer,
    kosmos2_added_tokens,
    patch_index_tokens,
)

CAPTIONS = [
    "a red circle above a blue square",
    "a photo of a green star, a white hexagon and a black diamond",
    "a drawing of an orange triangle to the left of a purple circle",
    "a yellow square on a plain background",
] * 5

TEXTS = [
    "<grounding><phrase> a red circle</phrase><object><patch_index_0044><patch_index_0863></object> above"
    "<phrase> a blue square</phrase><object><patch_index_0100><patch_index_0200></object>.",
    "<grounding> a photo of<phrase> a green star</phrase><object><patch_index_0001><patch_index_0034>"
    "</delimiter_of_multi_objects/><patch_index_0500><patch_index_0990></object>, and more!",
    "a plain caption, with punctuation (and UNSEEN words) 123",
    "  leading and trailing spaces  ",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CAPTIONS, vocab_size=400, min_frequency=1)


def test_kosmos2_tokens_in_released_order(tokenizer):
    added = kosmos2_added_tokens()
    assert added[: len(TAG_TOKENS)] == [
        "</doc>", "<image>", "</image>", "</chunk>", "</line>", "<phrase>", "</phrase>", "<object>", "</object>",
        "</delimiter_of_multi_objects/>", "<grounding>",
    ]
    assert added[len(TAG_TOKENS) :] == patch_index_tokens() and len(patch_index_tokens()) == 1024
    assert patch_index_tokens()[44] == "<patch_index_0044>"
    ids = tokenizer.convert_tokens_to_ids(added)
    # consecutive ids after the base vocabulary, each token exactly one id
    assert ids == list(range(ids[0], ids[0] + len(added)))
    assert tokenizer("<patch_index_1023>", add_special_tokens=False)["input_ids"] == [ids[-1]]
    assert [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [0, 1, 2, 3]


def test_processor_adds_no_tokens_and_round_trips(tokenizer, tmp_path):
    before = len(tokenizer)
    processor = build_processor(tokenizer, 64)
    assert len(processor.tokenizer) == before
    processor.save_pretrained(tmp_path)
    from grit_pipeline.model.tokenizer import load_processor

    loaded = load_processor(tmp_path)
    assert loaded.tokenizer(TEXTS[0])["input_ids"] == tokenizer(TEXTS[0])["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_input_ids_and_position_mask_match_kosmos2_processor(tokenizer, text):
    processor = build_processor(tokenizer, 64)
    image = Image.fromarray(np.zeros((48, 80, 3), np.uint8))
    expected = processor(text=text, images=image, add_eos_token=True)
    encoder = SampleEncoder(tokenizer, 64, DataConfig(shards="unused"))
    input_ids, labels = encoder.encode_text(text)
    assert input_ids == expected["input_ids"]
    assert image_embeds_position_mask(len(input_ids)) == expected["image_embeds_position_mask"]
    # no loss up to and including </image>, loss on every text token and </s>
    assert tokenizer.convert_ids_to_tokens(input_ids[PREFIX_LENGTH - 1]) == "</image>"
    assert labels[:PREFIX_LENGTH] == [-100] * PREFIX_LENGTH
    assert labels[PREFIX_LENGTH:] == input_ids[PREFIX_LENGTH:] and labels[-1] == tokenizer.eos_token_id


def test_padded_batch_matches_processor_batch(tokenizer):
    processor = build_processor(tokenizer, 64)
    image = torch.zeros((3, 64, 64), dtype=torch.uint8)
    placeholder = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    expected = processor(text=TEXTS[:2], images=[placeholder] * 2, add_eos_token=True, padding=True)
    encoder = SampleEncoder(tokenizer, 64, DataConfig(shards="unused"))
    samples = [EncodedSample(str(i), *encoder.encode_text(t), image) for i, t in enumerate(TEXTS[:2])]
    batch = collate(samples, tokenizer.pad_token_id)
    assert batch["input_ids"].tolist() == expected["input_ids"]
    assert batch["image_embeds_position_mask"].tolist() == expected["image_embeds_position_mask"]
    assert batch["attention_mask"].tolist() == expected["attention_mask"]
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["labels"][padding] == -100).all()


def test_xlm_roberta_tokenizer_of_the_released_family_matches_too():
    """The released checkpoint's tokenizer is XLM-R (Unigram); Kosmos2Processor adds the tokens itself."""
    from transformers import XLMRobertaTokenizer

    pieces = "▁abcdefghijklmnopqrstuvwxyz.,!()0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(c, -float(i)) for i, c in enumerate(pieces)] + [("▁a", -1.0), ("▁red", -1.0), ("▁circle", -1.0)]
    vocab += [(f"filler{i}", -50.0) for i in range(70)]  # room for the 64 image placeholder ids
    processor = build_processor(XLMRobertaTokenizer(vocab=vocab), 64)
    assert processor.tokenizer.convert_tokens_to_ids("<patch_index_1023>") != processor.tokenizer.unk_token_id
    encoder = SampleEncoder(processor.tokenizer, 64, DataConfig(shards="unused"))
    image = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    for text in TEXTS:
        expected = processor(text=text, images=image, add_eos_token=True)
        input_ids, _ = encoder.encode_text(text)
        assert input_ids == expected["input_ids"]
        assert image_embeds_position_mask(len(input_ids)) == expected["image_embeds_position_mask"]
