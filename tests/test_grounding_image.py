"""Hardened image decoding: EXIF orientation convention, colour modes, broken and hostile inputs."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import pytest
from PIL import Image, ImageFile

from grit_pipeline.records import Box, DropReason
from grit_pipeline.stages.image import ImageConfig, ImageDecodeError, decode_image, read_image_file


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _reason(data: bytes, config: ImageConfig | None = None) -> DropReason:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, config)
    return info.value.reason


def _plain_read(data: bytes) -> Image.Image:
    """What a reader that ignores EXIF sees."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def test_plain_rgb_jpeg_keeps_its_original_bytes():
    data = _encode(Image.new("RGB", (64, 48), (200, 30, 30)), "JPEG")
    decoded = decode_image(data)
    assert decoded.stored_bytes is data and not decoded.reencoded
    assert (decoded.width, decoded.height, decoded.extension) == (64, 48, "jpg")
    assert decoded.image.mode == "RGB"


def test_grayscale_png_is_passed_through_but_decoded_to_rgb():
    data = _encode(Image.new("L", (20, 20), 77), "PNG")
    decoded = decode_image(data)
    assert not decoded.reencoded and decoded.extension == "png"
    assert decoded.image.getpixel((3, 3)) == (77, 77, 77)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_rotation_is_applied_and_boxes_refer_to_the_stored_pixels(fmt):
    # 60 wide x 30 high as stored in the file; a red block in its top-left corner.
    raw = Image.new("RGB", (60, 30), (255, 255, 255))
    raw.paste((255, 0, 0), (0, 0, 15, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    data = _encode(raw, fmt, exif=exif.tobytes())

    decoded = decode_image(data)
    assert decoded.reencoded and decoded.exif_orientation == 6
    assert (decoded.width, decoded.height) == (30, 60)
    # after a clockwise turn the file's top-left corner is shown at the top-right
    red_box = Box.from_pixels(20, 0, 30, 15, decoded.width, decoded.height)

    stored = _plain_read(decoded.stored_bytes)  # a reader that ignores EXIF
    assert stored.size == (decoded.width, decoded.height)
    assert Image.open(io.BytesIO(decoded.stored_bytes)).getexif().get(0x0112) in (None, 1)
    x1, y1, x2, y2 = red_box.to_pixels(*stored.size)
    centre = stored.getpixel((int((x1 + x2) / 2), int((y1 + y2) / 2)))
    assert centre[0] > 200 and centre[1] < 60 and centre[2] < 60
    assert stored.getpixel((3, 3))[1] > 200  # top-left is white now
    assert decoded.image.getpixel((25, 5))[0] > 200 and decoded.image.getpixel((25, 5))[1] < 60


def test_cmyk_is_converted_and_reencoded():
    decoded = decode_image(_encode(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"))
    assert decoded.source_mode == "CMYK" and decoded.reencoded
    r, g, b = decoded.image.getpixel((10, 10))
    assert r > 200 and g < 60 and b < 60
    assert _plain_read(decoded.stored_bytes).mode == "RGB"


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (0, 0, 8, 16))
    data = _encode(image, "PNG", transparency=0)
    decoded = decode_image(data)
    assert decoded.image.getpixel((12, 8)) == (255, 255, 255)
    assert decoded.image.getpixel((2, 8))[0] > 200 and decoded.image.getpixel((2, 8))[1] < 60


def test_plain_palette_image_is_converted():
    decoded = decode_image(_encode(Image.new("RGB", (16, 16), (0, 0, 255)).convert("P"), "PNG"))
    assert decoded.source_mode == "P" and decoded.reencoded
    assert decoded.image.getpixel((1, 1))[2] > 200


@pytest.mark.parametrize(("mode", "value", "expected"), [("LA", (10, 0), 255), ("LA", (10, 255), 10)])
def test_la_alpha_is_composited_on_white(mode, value, expected):
    decoded = decode_image(_encode(Image.new(mode, (16, 16), value), "PNG"))
    assert decoded.image.getpixel((4, 4)) == (expected,) * 3


def test_rgba_half_transparent_black_becomes_grey():
    decoded = decode_image(_encode(Image.new("RGBA", (16, 16), (0, 0, 0, 128)), "PNG"))
    assert decoded.image.getpixel((4, 4))[0] == pytest.approx(127, abs=2)


def test_16_bit_grayscale_is_scaled_not_clipped():
    decoded = decode_image(_encode(Image.new("I;16", (16, 16), 40000), "PNG"))
    assert decoded.source_mode.startswith("I")
    assert decoded.image.getpixel((4, 4)) == (156, 156, 156)  # 40000 / 257, where a clip would give 255


def test_animated_gif_keeps_its_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(buffer.getvalue())
    assert decoded.reencoded and decoded.extension == "jpg"
    assert decoded.image.getpixel((8, 8))[0] > 200


def test_zero_bytes_is_image_empty():
    assert _reason(b"") is DropReason.IMAGE_EMPTY


def test_garbage_is_undecodable():
    assert _reason(b"<html>not an image</html>" * 20) is DropReason.IMAGE_UNDECODABLE


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_image_truncated(fmt):
    noise = Image.effect_noise((128, 128), 60).convert("RGB")
    data = _encode(noise, fmt)
    assert _reason(data[: len(data) // 2]) is DropReason.IMAGE_TRUNCATED


def test_header_cut_short_is_truncated():
    data = _encode(Image.new("RGB", (32, 32)), "PNG")
    assert _reason(data[:20]) is DropReason.IMAGE_TRUNCATED


@pytest.mark.parametrize("size", [(7, 100), (100, 3), (1, 1)])
def test_images_under_8_px_on_a_side_are_too_small(size):
    assert _reason(_encode(Image.new("RGB", size), "PNG")) is DropReason.IMAGE_TOO_SMALL


def _png_with_header_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR claims width x height (the pixel data stays tiny)."""
    data = bytearray(_encode(Image.new("RGB", (8, 8)), "PNG"))
    ihdr = bytearray(data[12:29])  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.mark.parametrize(
    ("width", "height", "config"),
    [
        (100_000, 100_000, ImageConfig()),  # beyond PIL's own hard limit
        (10_000, 10_000, ImageConfig()),  # between PIL's warning and error limits: our limit decides
        (200, 200, ImageConfig(max_pixels=10_000)),  # a configured limit
    ],
)
def test_decompression_bombs_are_rejected_from_the_header_without_decoding(monkeypatch, width, height, config):
    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a PIL DecompressionBombWarning escaping would fail here
        assert _reason(_png_with_header_size(width, height), config) is DropReason.IMAGE_TOO_LARGE


def test_pil_warnings_are_recorded_not_raised(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 12x12 = 144 px: PIL warns (it raises only past 200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = decode_image(_encode(Image.new("RGB", (12, 12)), "PNG"))
    assert len(decoded.warnings) == 1 and "decompression bomb" in decoded.warnings[0]


def test_missing_file_is_image_missing(tmp_path):
    with pytest.raises(ImageDecodeError) as info:
        read_image_file(str(tmp_path / "nope.jpg"))
    assert info.value.reason is DropReason.IMAGE_MISSING


def test_image_config_validates():
    with pytest.raises(ValueError):
        ImageConfig(min_side=0)
    with pytest.raises(ValueError):
        ImageConfig(jpeg_quality=0)
