"""Noun chunks, filters and referring expressions on real spaCy parses (GRIT.md sections 2-3)."""

from __future__ import annotations

import pytest

from grit_pipeline.records import DropReason, Span
from grit_pipeline.stages.text import (
    ABSTRACT_NOUNS,
    PhraseExtractor,
    TextConfig,
    drop_contained,
    load_word_list,
)


def _texts(caption, result):
    return [(p.chunk.text(caption), p.expression.text(caption)) for p in result.phrases]


def test_paper_example_exactly(extractor):
    caption = "a dog in a field of flowers"
    (result,) = extractor([caption])
    assert _texts(caption, result) == [
        ("a dog", "a dog in a field of flowers"),
        ("a field", "a field of flowers"),
        ("flowers", "flowers"),
    ]
    kept = drop_contained(p.expression for p in result.phrases)
    assert [s.text(caption) for s in kept] == ["a dog in a field of flowers"]


def test_conjuncts_are_not_expanded(extractor):
    caption = "bride and groom at the altar"
    (result,) = extractor([caption])
    assert _texts(caption, result) == [("bride", "bride"), ("groom", "groom"), ("the altar", "the altar")]


def test_lists_parsed_as_apposition_are_not_swallowed_by_the_first_item(extractor):
    caption = "a red square, a blue circle and a green star"
    (result,) = extractor([caption])
    assert _texts(caption, result) == [
        ("a red square", "a red square"),
        ("a blue circle", "a blue circle"),
        ("a green star", "a green star"),
    ]


def test_only_the_end_grows_and_nests(extractor):
    caption = "A cat on a wooden table next to a lamp with a red shade."
    (result,) = extractor([caption])
    for phrase in result.phrases:
        assert phrase.expression.start == phrase.chunk.start
        assert phrase.expression.end >= phrase.chunk.end
    texts = dict(_texts(caption, result))
    assert texts["A cat"].startswith("A cat on a wooden table")
    assert not texts["A cat"].endswith("."), "trailing punctuation never ends a span"
    assert texts["a lamp"] == "a lamp with a red shade"
    assert texts["a red shade"] == "a red shade"


def test_trailing_conjunction_never_ends_a_span(extractor):
    for caption in ("both side doors and", "a red car, and", "the old bridge over the river and"):
        (result,) = extractor([caption])
        for phrase in result.phrases:
            end_text = phrase.expression.text(caption).rstrip()
            assert not end_text.endswith((" and", ",")), (caption, end_text)


def test_pairing_and_offsets(extractor):
    captions = ["Two kids playing with a ball near the old house", "Ein Hund 🐶 läuft über die Wiese", "café au lait in a white cup ☕"]
    for caption, result in zip(captions, extractor(captions), strict=True):
        for phrase in result.phrases:
            assert 0 <= phrase.chunk.start < phrase.chunk.end <= len(caption)
            assert phrase.expression.contains(phrase.chunk)
            assert phrase.chunk.text(caption).strip() == phrase.chunk.text(caption)
    cup = next(r for c, r in zip(captions, extractor(captions), strict=True) if c.startswith("café"))
    assert "a white cup" in [p.chunk.text(captions[2]) for p in cup.phrases]


def test_pronouns(extractor):
    caption = "the man admiring himself in the mirror while it rains and I watch"
    (result,) = extractor([caption])
    chunks = [p.chunk.text(caption) for p in result.phrases]
    assert "himself" not in chunks and "I" not in chunks
    assert "it" in chunks, "third-person pronouns stay groundable, as in the paper's 'It' example"
    assert result.dropped[DropReason.REFLEXIVE_PRONOUN] == 1
    assert result.dropped[DropReason.NON_REFERRING_PRONOUN] == 1


def test_fixed_phrase_fragments_are_switchable(extractor):
    caption = "a cat on top of a table in front of a window"
    (result,) = extractor([caption])
    assert [p.chunk.text(caption) for p in result.phrases] == ["a cat", "a table", "a window"]
    assert result.dropped[DropReason.FIXED_PHRASE_FRAGMENT] == 2
    (unfiltered,) = PhraseExtractor(TextConfig(filter_non_visual=False))([caption])
    assert "top" in [p.chunk.text(caption) for p in unfiltered.phrases]


def test_abstract_nouns_default_and_file(extractor, tmp_path):
    every_word = [f"a dog and the {word}" for word in ABSTRACT_NOUNS]  # each default word is filtered out
    for text, parsed in zip(every_word, extractor(every_word), strict=True):
        assert [p.chunk.text(text) for p in parsed.phrases] == ["a dog"], text
        assert parsed.dropped[DropReason.ABSTRACT_NOUN] == 1, text
    caption = "love and hope under a big tree in the garden"
    (result,) = extractor([caption])
    chunks = [p.chunk.text(caption) for p in result.phrases]
    assert "love" not in chunks and "hope" not in chunks and "a big tree" in chunks
    words = tmp_path / "abstract.txt"
    words.write_text("# our list\ntree\n")
    (custom,) = PhraseExtractor(TextConfig(abstract_nouns=load_word_list(words)))([caption])
    custom_chunks = [p.chunk.text(caption) for p in custom.phrases]
    assert "a big tree" not in custom_chunks and "love" in custom_chunks


@pytest.mark.parametrize("caption", ["", "   ", "\n\t "])
def test_empty_captions_are_dropped_not_errors(extractor, caption):
    (result,) = extractor([caption])
    assert result.phrases == [] and result.drop_reason is DropReason.EMPTY_CAPTION


def test_very_long_caption(extractor):
    caption = ", ".join(["a blue ceramic vase with dried flowers on a wooden shelf"] * 60)
    assert len(caption) > 2000
    (result,) = extractor([caption])
    assert len(result.phrases) >= 100
    assert all(p.expression.end <= len(caption) for p in result.phrases)
    (too_long,) = PhraseExtractor(TextConfig(max_caption_chars=1000))([caption])
    assert too_long.drop_reason is DropReason.CAPTION_TOO_LONG


def test_non_english_and_emoji_do_not_break_offsets(extractor):
    captions = ["日本の桜と富士山", "🎉🎉🎉", "Строительство моста через реку", "👗 Summer dress with 🌸 floral print"]
    for caption, result in zip(captions, extractor(captions), strict=True):
        for phrase in result.phrases:
            assert phrase.chunk.text(caption) == caption[phrase.chunk.start : phrase.chunk.end]
            assert phrase.expression.end <= len(caption)


def test_drop_contained_rule():
    spans = [Span(0, 27), Span(9, 27), Span(20, 27), Span(30, 35), Span(30, 35)]
    assert drop_contained(spans) == [Span(0, 27), Span(30, 35)]
