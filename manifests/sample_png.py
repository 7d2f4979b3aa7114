"""`grit inspect --png KEY`: one sample drawn with Pillow: its boxes, numbered span labels and its caption."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from grit_pipeline.manifests.gallery import ShownEntity, find_sample
from grit_pipeline.storage import Folder


def render_sample_png(out_dir: Folder | str | Path, key: str, target: str | Path, side: int = 640) -> Path:
    """Draw one sample's image with its boxes and numbered span labels, and its caption below, as a PNG."""
    from PIL import Image, ImageDraw

    from grit_pipeline.io import atomic_path

    sample = find_sample(out_dir, key)
    with Image.open(io.BytesIO(sample.image_bytes)) as source:
        scale = side / max(source.size)
        image = source.convert("RGB").resize((round(source.width * scale), round(source.height * scale)))
    caption_lines = _wrap_caption(
        sample.record.caption, sample.entities, width_chars=max(20, image.width // 9)
    )
    canvas = Image.new("RGB", (image.width, image.height + 22 * len(caption_lines) + 16), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(15)
    for number, entity in enumerate(sample.entities, start=1):
        label = f"{number} {entity.span.text(sample.record.caption)}"
        for box, _score in entity.boxes:
            x1, y1, x2, y2 = box.to_pixels(image.width, image.height)
            # PIL's rectangle includes its end pixel: keep a full-image box inside the image
            x2, y2 = min(x2, image.width - 1), min(y2, image.height - 1)
            draw.rectangle((x1, y1, x2, y2), outline=entity.colour, width=3)
            left, top, right, bottom = draw.textbbox((x1 + 4, y1 + 2), label, font=font)
            draw.rectangle((x1, y1, right + 4, bottom + 2), fill=entity.colour)
            draw.text((x1 + 4, y1 + 2), label, fill="white", font=font)
    _draw_caption(draw, caption_lines, top=image.height + 8, font=font)
    path = Path(target)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def _font(size: int) -> Any:
    """Pillow's bundled scalable font (no system font needed)."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _wrap_caption(
    caption: str, entities: Sequence[ShownEntity], width_chars: int
) -> list[list[tuple[str, str | None]]]:
    """The caption as wrapped lines of (text, colour or None) pieces; a span's characters get its colour."""
    colour_at: list[str | None] = [None] * len(caption)
    for entity in entities:
        for i in range(entity.span.start, min(entity.span.end, len(caption))):
            colour_at[i] = entity.colour
    lines: list[list[tuple[str, str | None]]] = [[]]
    length = 0
    for word_start, word in _words(caption):
        if length and length + len(word) > width_chars:
            lines.append([])
            length = 0
        for offset, char in enumerate(word):
            colour = colour_at[word_start + offset]
            line = lines[-1]
            if line and line[-1][1] == colour:
                line[-1] = (line[-1][0] + char, colour)
            else:
                line.append((char, colour))
        length += len(word)
    return lines


def _words(caption: str) -> Iterator[tuple[int, str]]:
    """(start offset, word with its trailing spaces) for each word of the caption."""
    start = 0
    while start < len(caption):
        end = start
        while end < len(caption) and not caption[end].isspace():
            end += 1
        while end < len(caption) and caption[end].isspace():
            end += 1
        yield start, caption[start:end]
        start = end


def _draw_caption(draw: Any, lines: Sequence[Sequence[tuple[str, str | None]]], top: int, font: Any) -> None:
    """Draw wrapped caption lines; coloured pieces are drawn in their colour and underlined."""
    for row, pieces in enumerate(lines):
        x, y = 8.0, top + 22 * row
        for text, colour in pieces:
            width = draw.textlength(text, font=font)
            draw.text((x, y), text, fill=colour or "#222222", font=font)
            if colour is not None:
                draw.line((x, y + 19, x + width, y + 19), fill=colour, width=2)
            x += width
