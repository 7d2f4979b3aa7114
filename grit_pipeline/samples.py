"""Bundled sample data (captions for benchmarks, tests and the demo)."""

from __future__ import annotations

from importlib import resources


def load_caption_sample() -> list[str]:
    """The bundled web alt-text caption sample, one caption per line."""
    text = resources.files("grit_pipeline").joinpath("data/captions_sample.txt").read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line.strip()]


def cycle_to(items: list[str], n: int) -> list[str]:
    """`n` items, repeating `items` as often as needed."""
    if not items:
        raise ValueError("no items to cycle")
    return [items[i % len(items)] for i in range(n)]
