"""Synthetic grounded scenes: coloured shapes on varied backgrounds, with captions and exact boxes.

Each scene's caption names its shapes as noun chunks ("a red circle above a blue square"); every shape's
box is the tight pixel bounding box of the pixels drawn for it, and it is bound to the character span of
its noun chunk. Used by the demo (as a captions.jsonl input of `grit build`) and by the trainer's tests.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grit_pipeline.records import Box, GritRecord, GroundedSpan, Span

if TYPE_CHECKING:
    from PIL import Image

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")

# Saturated fills, far from the muted background palette, so every shape stands out.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 20),
    "orange": (245, 130, 20),
    "purple": (140, 40, 180),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}

_BACKGROUNDS = ((128, 128, 128), (196, 186, 160), (90, 120, 120), (160, 140, 170), (110, 130, 90))
_BACKGROUND_STYLES = ("plain", "gradient", "noise", "stripes")

# relation -> (caption words, where the first shape goes relative to the second)
_RELATIONS: dict[str, str] = {
    "above": "above",
    "below": "below",
    "left": "to the left of",
    "right": "to the right of",
    "next": "next to",
}


@dataclass(frozen=True, slots=True)
class SceneObject:
    """One drawn shape: what it is, its exact box and the caption span (its noun chunk) that names it."""

    shape: str
    colour: str
    box: Box
    span: Span

    def annotation(self) -> dict[str, Any]:
        """The shape in the captions.jsonl annotation format: category, box [x1,y1,x2,y2], span [start,end]."""
        return {"category": self.shape, "box": list(self.box.as_tuple()), "span": self.span.as_list()}


@dataclass(frozen=True, slots=True, eq=False)
class Scene:
    """A generated image with its caption and the shapes it contains."""

    key: str
    caption: str
    objects: tuple[SceneObject, ...]
    image: Image.Image

    @property
    def width(self) -> int:
        """Image width in pixels."""
        return self.image.width

    @property
    def height(self) -> int:
        """Image height in pixels."""
        return self.image.height

    def to_record(self) -> GritRecord:
        """The scene as a GRIT record in phrase mode (each ref_exp is a copy of its noun chunk), score 1."""
        entries = [GroundedSpan(o.span, o.box, 1.0) for o in self.objects]
        return GritRecord(
            key=self.key,
            caption=self.caption,
            noun_chunks=list(entries),
            ref_exps=list(entries),
            width=self.width,
            height=self.height,
        )


def generate_scenes(n: int, seed: int = 0, size: tuple[int, int] = (224, 224)) -> list[Scene]:
    """`n` reproducible scenes of one to three shapes; the same (n, seed, size) gives the same scenes."""
    rng = random.Random(seed)
    return [_make_scene(f"{index:06d}", rng, size) for index in range(n)]


def write_scene_folder(scenes: Sequence[Scene], out_dir: str | Path, quality: int = 95) -> Path:
    """Write KEY.jpg images plus captions.jsonl (the annotation input format of `grit build`); returns the jsonl path."""
    from grit_pipeline.io import atomic_path

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for scene in scenes:
        image_name = f"{scene.key}.jpg"
        with atomic_path(folder / image_name) as tmp:
            scene.image.save(tmp, format="JPEG", quality=quality)
        entry = {
            "image": image_name,
            "caption": scene.caption,
            "key": scene.key,
            "annotations": [o.annotation() for o in scene.objects],
        }
        lines.append(json.dumps(entry, ensure_ascii=False))
    jsonl = folder / "captions.jsonl"
    with atomic_path(jsonl) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return jsonl


def _make_scene(key: str, rng: random.Random, size: tuple[int, int]) -> Scene:
    """One scene: pick shapes and a layout, draw them, and write the caption with each shape's span."""
    count = rng.choice((1, 2, 2, 2, 3))
    colours = rng.sample(sorted(COLOURS), count)
    shapes = [rng.choice(SHAPES) for _ in range(count)]
    relation = rng.choice(sorted(_RELATIONS)) if count == 2 else None
    cells = _layout(count, relation, rng)
    image = _background(size, rng)
    objects_pixels = [
        _draw_shape(image, shape, COLOURS[colour], cell, rng)
        for shape, colour, cell in zip(shapes, colours, cells, strict=True)
    ]
    caption, spans = _caption(shapes, colours, relation, rng)
    objects = tuple(
        SceneObject(shape, colour, Box.from_pixels(*bbox, image.width, image.height), span)
        for shape, colour, bbox, span in zip(shapes, colours, objects_pixels, spans, strict=True)
    )
    return Scene(key=key, caption=caption, objects=objects, image=image)


def _layout(count: int, relation: str | None, rng: random.Random) -> list[tuple[float, float, float, float]]:
    """Disjoint cells (normalised x1, y1, x2, y2), one per shape, consistent with the caption's relation."""
    if count == 1:
        return [(0.1, 0.1, 0.9, 0.9)]
    if count == 3:
        return [(0.0, 0.0, 1 / 3, 1.0), (1 / 3, 0.0, 2 / 3, 1.0), (2 / 3, 0.0, 1.0, 1.0)]
    top, bottom = (0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)
    left, right = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
    if relation == "above":
        return [top, bottom]
    if relation == "below":
        return [bottom, top]
    if relation == "left":
        return [left, right]
    if relation == "right":
        return [right, left]
    return [left, right] if rng.random() < 0.5 else [right, left]


def _background(size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A muted background: plain, a gradient, noise or stripes."""
    import numpy as np
    from PIL import Image

    width, height = size
    base = np.array(rng.choice(_BACKGROUNDS), dtype=np.float32)
    style = rng.choice(_BACKGROUND_STYLES)
    pixels = np.broadcast_to(base, (height, width, 3)).copy()
    if style == "gradient":
        ramp = np.linspace(-40, 40, height, dtype=np.float32)[:, None, None]
        pixels = pixels + ramp
    elif style == "noise":
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 12, size=(height, width, 1))
        pixels = pixels + noise.astype(np.float32)
    elif style == "stripes":
        period = rng.randrange(8, 24)
        stripe = ((np.arange(width) // period) % 2 * 25).astype(np.float32)[None, :, None]
        pixels = pixels + stripe
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def _draw_shape(
    image: Image.Image,
    shape: str,
    colour: tuple[int, int, int],
    cell: tuple[float, float, float, float],
    rng: random.Random,
) -> tuple[int, int, int, int]:
    """Draw one shape inside `cell`; returns the tight pixel box (x1, y1, x2, y2) of the pixels drawn."""
    from PIL import Image, ImageDraw

    width, height = image.size
    cx1, cy1, cx2, cy2 = cell[0] * width, cell[1] * height, cell[2] * width, cell[3] * height
    side = min(cx2 - cx1, cy2 - cy1)
    extent = side * rng.uniform(0.45, 0.8)
    centre_x = rng.uniform(cx1 + extent / 2 + 1, cx2 - extent / 2 - 1)
    centre_y = rng.uniform(cy1 + extent / 2 + 1, cy2 - extent / 2 - 1)
    mask = Image.new("L", image.size, 0)
    _draw_outline(ImageDraw.Draw(mask), shape, centre_x, centre_y, extent / 2)
    bbox = mask.getbbox()
    if bbox is None:  # cannot happen for extents of several pixels; guards a tiny `size`
        raise ValueError(f"shape too small to draw at size {image.size}")
    image.paste(Image.new("RGB", image.size, colour), (0, 0), mask)
    return bbox


def _draw_outline(draw: Any, shape: str, cx: float, cy: float, radius: float) -> None:
    """Fill `shape` (value 255) centred at (cx, cy) within `radius` on a mask."""
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    elif shape == "square":
        draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius), fill=255)


def _polygon(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """Vertices of a triangle, diamond, hexagon or five-pointed star."""
    if shape == "star":
        angles = [-math.pi / 2 + i * math.pi / 5 for i in range(10)]
        radii = [radius if i % 2 == 0 else radius * 0.45 for i in range(10)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles, strict=True)]
    sides = {"triangle": 3, "diamond": 4, "hexagon": 6}[shape]
    return [
        (
            cx + radius * math.cos(-math.pi / 2 + i * 2 * math.pi / sides),
            cy + radius * math.sin(-math.pi / 2 + i * 2 * math.pi / sides),
        )
        for i in range(sides)
    ]


def _caption(
    shapes: Sequence[str], colours: Sequence[str], relation: str | None, rng: random.Random
) -> tuple[str, list[Span]]:
    """The caption naming each shape as a noun chunk ("a red circle"), and each shape's span in it."""
    phrases = [f"{_article(colour)} {colour} {shape}" for shape, colour in zip(shapes, colours, strict=True)]
    prefix = rng.choice(("", "", "a photo of ", "a drawing of "))
    # Alternating filler text and phrases: parts[1], parts[3], ... are the shapes' phrases, in order.
    if len(phrases) == 1:
        parts = [prefix, phrases[0], rng.choice(("", " on a plain background"))]
    elif len(phrases) == 2:
        parts = [prefix, phrases[0], f" {_RELATIONS[relation or 'next']} ", phrases[1], ""]
    else:
        parts = [prefix, phrases[0], ", ", phrases[1], " and ", phrases[2], ""]
    caption, spans = "", []
    for index, part in enumerate(parts):
        if index % 2 == 1:
            spans.append(Span(len(caption), len(caption) + len(part)))
        caption += part
    return caption, spans


def _article(word: str) -> str:
    """'an' before a vowel sound, else 'a'."""
    return "an" if word[0] in "aeiou" else "a"
