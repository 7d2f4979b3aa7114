"""The bundled caption sample: shape, web-noise coverage and bit-identical regeneration."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE = REPO_ROOT / "grit_pipeline" / "data" / "captions_sample.txt"
GENERATOR = REPO_ROOT / "scripts" / "make_caption_sample.py"
# Both spellings of Kosmos-2 control strings: the HF tokenizer's and the paper's.
CONTROL_STRING = re.compile(
    r"</?(?:phrase|object|grounding|image|p|box|delim|s)>|<patch_index_\d{4}>|<loc\d+>"
    r"|</delimiter_of_multi_objects/>"
)


@pytest.fixture(scope="module")
def lines() -> list[str]:
    """The sample's captions, one per line (the file ends with a newline)."""
    text = SAMPLE.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n")


def test_line_count_in_range(lines: list[str]) -> None:
    assert 2500 <= len(lines) <= 4000


def test_every_line_is_one_visible_caption(lines: list[str]) -> None:
    assert all(line.strip() for line in lines)
    # No character that str.splitlines() would treat as a break may hide inside a caption.
    assert all(line.splitlines() == [line] for line in lines)


def test_covers_non_ascii_control_strings_and_very_long_captions(lines: list[str]) -> None:
    assert sum(not line.isascii() for line in lines) >= 50
    assert sum(bool(CONTROL_STRING.search(line)) for line in lines) >= 10
    assert sum(len(line) > 2000 for line in lines) >= 3


def test_both_control_token_spellings_present(lines: list[str]) -> None:
    joined = "\n".join(lines)
    assert "<patch_index_" in joined and "</delimiter_of_multi_objects/>" in joined
    assert re.search(r"<loc\d+>", joined) and "<delim>" in joined


def test_file_is_small_enough_to_bundle() -> None:
    assert SAMPLE.stat().st_size < 600_000


def test_regeneration_is_byte_identical(tmp_path: Path) -> None:
    out = tmp_path / "captions.txt"
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(out)], check=True, capture_output=True)
    assert out.read_bytes() == SAMPLE.read_bytes()
