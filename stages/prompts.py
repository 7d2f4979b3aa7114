"""Prompts for GLIP-family detectors (GroundingDINO): a caption's chunks packed into "[CLS] chunk . chunk .
[SEP]" text passes within the model's text-token limit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# "." and "?" are the phrase delimiters of GroundingDINO (with [CLS]/[SEP]); inside a chunk they would split it.
_DELIMITER_CHARS = str.maketrans({".": " ", "?": " "})


@dataclass(slots=True)
class TextPass:
    """One text input of the model: token ids and, per prompt phrase in it, its token positions."""

    input_ids: list[int]
    phrase_tokens: list[list[int]] = field(default_factory=list)
    phrase_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class PromptPlan:
    """The text passes for one caption and, per prompt phrase, the request phrases it stands for."""

    passes: list[TextPass]
    phrase_targets: list[list[int]]
    truncated_phrases: int = 0


def prompt_text(chunk_text: str) -> str:
    """A chunk as it appears in the prompt: lower-cased, delimiters removed, whitespace collapsed."""
    return " ".join(chunk_text.translate(_DELIMITER_CHARS).lower().split())


def plan_prompts(
    chunk_texts: Sequence[str], tokenize: Any, special_ids: dict[str, int], max_text_tokens: int
) -> PromptPlan:
    """Pack a caption's chunks into "[CLS] chunk . chunk . [SEP]" passes of at most `max_text_tokens`.

    A chunk text repeated in the caption is prompted once and its boxes go to every occurrence. `tokenize`
    maps a list of strings to lists of token ids (no special tokens).
    """
    unique: dict[str, int] = {}
    targets: list[list[int]] = []
    for index, text in enumerate(prompt_text(t) for t in chunk_texts):
        if not text:
            continue
        if text not in unique:
            unique[text] = len(targets)
            targets.append([])
        targets[unique[text]].append(index)
    token_lists = tokenize(list(unique)) if unique else []
    longest_phrase = max_text_tokens - 3  # [CLS], its ".", [SEP]
    truncated = sum(len(tokens) > longest_phrase for tokens in token_lists)
    passes: list[TextPass] = []
    current = TextPass([special_ids["cls"]])
    for phrase_id, tokens in enumerate(token_lists):
        tokens = list(tokens[:longest_phrase])
        if len(current.input_ids) + len(tokens) + 2 > max_text_tokens:
            passes.append(_close(current, special_ids))
            current = TextPass([special_ids["cls"]])
        start = len(current.input_ids)
        current.input_ids.extend(tokens)
        current.input_ids.append(special_ids["dot"])
        current.phrase_tokens.append(list(range(start, start + len(tokens))))
        current.phrase_ids.append(phrase_id)
    if current.phrase_ids:
        passes.append(_close(current, special_ids))
    return PromptPlan(passes=passes, phrase_targets=targets, truncated_phrases=truncated)


def _close(text_pass: TextPass, special_ids: dict[str, int]) -> TextPass:
    text_pass.input_ids.append(special_ids["sep"])
    return text_pass
