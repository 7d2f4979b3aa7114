"""Test images with solid coloured squares, and where a colour lies in decoded pixels (frames tests).

A square's colour is found again in any stored image by a colour threshold, independently of the code that
maps boxes between frames, so a test can check that a box lies on its square in the stored pixels.
"""

from __future__ import annotations

import io
from typing import Any

from grit_pipeline.records import Box

RED, BLUE = (220, 30, 30), (30, 30, 220)
COLOURS = {"red": RED, "blue": BLUE}
CAPTION = "a red square and a blue square"
SPANS = {"red": (0, 12), "blue": (17, 30)}


def square_scene(width: int, height: int, squares: dict[str, tuple[int, int, int, int]]) -> Any:
    """A PIL image of grey noise with solid squares, by colour name, at pixel boxes (x1, y1, x2, y2)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(width * 1000 + height)
    pixels = rng.integers(100, 160, size=(height, width, 3), dtype=np.uint8)
    for name, (x1, y1, x2, y2) in squares.items():
        pixels[y1:y2, x1:x2] = COLOURS[name]
    return Image.fromarray(pixels)


def jpeg_bytes(image: Any, orientation: int = 1) -> bytes:
    """JPEG bytes of a PIL image, with an EXIF orientation tag unless it is 1."""
    from PIL import Image

    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def colour_box(image: Any, colour: tuple[int, int, int]) -> Box | None:
    """The normalised bounding box of the pixels near `colour` (None when there are none)."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB")).astype(int)
    mask = np.abs(pixels - np.array(colour)).max(axis=2) < 60
    if mask.sum() < 4:
        return None
    ys, xs = np.nonzero(mask)
    return Box.from_pixels(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, image.width, image.height)


def box_near(box: Box, truth: Box | None, image: Any, pixels: float = 2.0) -> bool:
    """True when every corner of `box` is within `pixels` pixels of `truth` in `image` (resampling blurs edges)."""
    if truth is None:
        return False
    scale = (image.width, image.height, image.width, image.height)
    return all(abs(a - b) * s <= pixels for a, b, s in zip(box.as_tuple(), truth.as_tuple(), scale, strict=True))


def grit_entries(boxes: dict[str, list[float]], score: float = 0.9) -> list[list[float]]:
    """GRIT-20M noun_chunks entries for the caption's squares, from normalised boxes by colour name."""
    return [[float(SPANS[name][0]), float(SPANS[name][1]), *boxes[name], score] for name in boxes]
