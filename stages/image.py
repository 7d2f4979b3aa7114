"""Hardened image decoding shared by every stage: bytes in, RGB pixels and the bytes to store out.

Orientation convention (one for the whole project): EXIF orientation is applied once, here. The stored
image is the orientation-corrected one, so every box refers to the pixels that any standard reader gets from
the stored bytes, whether or not it honours EXIF. Concretely:

- no EXIF rotation and a plain RGB or grayscale JPEG/PNG/WebP: the original bytes are stored untouched;
- otherwise (rotation, CMYK, palette, alpha, 16-bit, other formats, animations): the corrected RGB pixels
  are re-encoded as JPEG (`ImageConfig.jpeg_quality`) and stored instead; `DecodedImage.reencoded` is True.

Transparent pixels are composited on white (web logos and cut-outs are drawn for white pages). Failures
raise `ImageDecodeError` carrying a DropReason, never a bare PIL exception or warning.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from grit_pipeline.records import DropReason
from grit_pipeline.stages.base import Resources

if TYPE_CHECKING:
    from PIL import Image

    from grit_pipeline.config import BuildConfig
    from grit_pipeline.work import WorkItem

PIL_MAX_IMAGE_PIXELS = 89_478_485
"""PIL's own decompression-bomb warning limit (about 0.25 GB of RGBA); our default pixel limit."""

_PASSTHROUGH_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_PASSTHROUGH_MODES = {"RGB", "L"}
_EXIF_ORIENTATION_TAG = 0x0112
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """Decoding limits and the re-encoding quality; the same for every stage of a run."""

    max_pixels: int = PIL_MAX_IMAGE_PIXELS
    min_side: int = 8
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be positive, got {self.min_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


@dataclass(slots=True)
class DecodedImage:
    """An image ready for the detector: RGB pixels (upright), their size, the bytes to write to the shard, and
    the size of the encoded pixels before their EXIF orientation was applied (`raw_width`, `raw_height`)."""

    image: Image.Image
    width: int
    height: int
    stored_bytes: bytes
    reencoded: bool
    extension: str
    source_format: str | None = None
    source_mode: str | None = None
    exif_orientation: int = 1
    raw_width: int = 0
    raw_height: int = 0
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.raw_width or not self.raw_height:  # no orientation applied: the raw frame is the stored one
            self.raw_width, self.raw_height = self.width, self.height


class ImageDecodeError(ValueError):
    """An image that cannot be used; `reason` is the DropReason to count it under."""

    def __init__(self, reason: DropReason, message: str):
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason


def decode_image(data: bytes, config: ImageConfig | None = None) -> DecodedImage:
    """Decode `data` under the project's orientation and colour conventions, or raise ImageDecodeError."""
    config = config or ImageConfig()
    if not data:
        raise ImageDecodeError(DropReason.IMAGE_EMPTY, "zero bytes")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoded = _decode(data, config)
    decoded.warnings.extend(str(w.message) for w in caught)
    return decoded


def _decode(data: bytes, config: ImageConfig) -> DecodedImage:
    image = _open_checked(data, config)
    source_format, source_mode = image.format, image.mode
    animated = bool(getattr(image, "is_animated", False))
    _load(image)
    orientation = _exif_orientation(image)
    rgb = _to_rgb(_apply_orientation(image, orientation))
    passthrough = (
        orientation == 1 and not animated and source_format in _PASSTHROUGH_FORMATS and source_mode in _PASSTHROUGH_MODES
    )
    if passthrough:
        stored, extension = data, _PASSTHROUGH_FORMATS[source_format]
    else:
        stored, extension = encode_jpeg(rgb, config.jpeg_quality), "jpg"
    return DecodedImage(
        image=rgb,
        width=rgb.width,
        height=rgb.height,
        stored_bytes=stored,
        reencoded=not passthrough,
        extension=extension,
        source_format=source_format,
        source_mode=source_mode,
        exif_orientation=orientation,
        raw_width=image.width,
        raw_height=image.height,
    )


def _open_checked(data: bytes, config: ImageConfig) -> Image.Image:
    """Open lazily (header only) and apply the size limits before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's hard limit (2x its warning limit) fired first
        raise ImageDecodeError(DropReason.IMAGE_TOO_LARGE, str(exc)) from exc
    except UnidentifiedImageError as exc:
        if data.startswith(_IMAGE_SIGNATURES):  # a known format cut before its header ended
            raise ImageDecodeError(DropReason.IMAGE_TRUNCATED, "image header is incomplete") from exc
        raise ImageDecodeError(DropReason.IMAGE_UNDECODABLE, "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageDecodeError(_reason_for(exc), f"{type(exc).__name__}: {exc}") from exc
    width, height = image.size
    if width * height > config.max_pixels:
        raise ImageDecodeError(
            DropReason.IMAGE_TOO_LARGE, f"{width}x{height} exceeds the {config.max_pixels}-pixel limit"
        )
    if min(width, height) < config.min_side:
        raise ImageDecodeError(DropReason.IMAGE_TOO_SMALL, f"{width}x{height} has a side under {config.min_side} px")
    return image


def _load(image: Image.Image) -> None:
    """Decode the pixels, mapping PIL's many failure types to a DropReason."""
    from PIL import Image

    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(DropReason.IMAGE_TOO_LARGE, str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
        raise ImageDecodeError(_reason_for(exc), f"{type(exc).__name__}: {exc}") from exc


def _reason_for(exc: BaseException) -> DropReason:
    message = str(exc).lower()
    if isinstance(exc, EOFError) or "truncated" in message or "premature end" in message:
        return DropReason.IMAGE_TRUNCATED
    return DropReason.IMAGE_UNDECODABLE


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8); 1 when absent or unreadable (what browsers do with broken EXIF)."""
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - corrupt EXIF blocks raise anything; the pixels are still fine
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    from PIL import Image

    transposes = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }
    method = transposes.get(orientation)
    return image if method is None else image.transpose(method)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels: alpha composited on white, 16/32-bit and float modes scaled to 8 bits."""
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(image)
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer or float grayscale to 8 bits instead of PIL's clipping convert."""
    import numpy as np
    from PIL import Image

    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        peak = 1.0 if values.size and values.max() <= 1.0 else 255.0
        scaled = values / peak * 255.0
    else:
        scaled = values / 257.0 if values.size and values.max() > 255 else values
    eight_bit = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(eight_bit).convert("RGB")


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    """JPEG bytes of an RGB image (no EXIF, so no reader can rotate it again)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def read_image_file(path: str, config: ImageConfig | None = None) -> DecodedImage:
    """Read and decode an image file; a missing or unreadable file raises ImageDecodeError(IMAGE_MISSING)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ImageDecodeError(DropReason.IMAGE_MISSING, f"{path}: {exc.strerror or exc}") from exc
    return decode_image(data, config)


class DecodeStage:
    """Decode each image (EXIF orientation, size limits) per the image stage's convention."""

    name = "decode"
    resources = Resources()

    def __init__(self, config: BuildConfig) -> None:
        self.config = config.image

    def setup(self) -> None:
        """Nothing to load."""

    def __call__(self, items: list[WorkItem]) -> list[WorkItem]:
        """Decode the images of the live items; undecodable ones are dropped with the decoder's reason."""
        for item in items:
            if not item.alive or item.sample.image is None:
                continue
            try:
                item.decoded = decode_image(item.sample.image, self.config)
            except ImageDecodeError as exc:
                item.drop(exc.reason, str(exc))
        return items
