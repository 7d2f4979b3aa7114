"""Frames: map boxes that arrive with the input into the frame of the STORED pixels, or say why not.

A box supplied by the input (a GRIT-20M entry, a COCO-style annotation) is normalised to the image its
author saw. The stored image can be in another frame, for two reasons:

1. **EXIF orientation.** Our decoder stores every image upright (`stages/image.py`). The source's boxes may
   be in the raw frame (the pixels as encoded, EXIF ignored) or in the upright one. The source row's
   width/height tell which when they can: a row size with the raw aspect ratio means raw, with the upright
   one upright. When the row cannot tell (no size, a square image, or an orientation that keeps the aspect:
   mirrors and the 180-degree turn), `FrameConfig.box_frame` decides; its default is `raw`, because GRIT's
   boxes come from a detector that read images without applying EXIF, as unilm's Kosmos-2 loader does too.
2. **img2dataset's resizing.** img2dataset decodes with OpenCV's IMREAD_UNCHANGED (EXIF ignored), records
   that frame's size as `original_width`/`original_height`, and stores a resized copy: `no`, `keep_ratio`
   and `keep_ratio_largest` keep the aspect ratio (the normalised frame is unchanged); `border` scales the
   longest side to the image size and pads to a square with white; `center_crop` scales the shortest side
   to the image size and crops the centre (boxes are clipped; a box left with less than
   `FrameConfig.min_cropped_box_fraction` of its area is dropped). The rounding is albumentations' (Python
   `round`, the odd padding pixel bottom/right, crop offsets floored), checked against img2dataset's code.
   Border and centre-crop both give a square: the stored pixels decide (white padding bands mean border),
   unless `FrameConfig.resize_mode` names the mode. A size pair that none of the modes explains drops the
   sample (`frame_mismatch`).

The result is a `FrameMap`: a pure function from a normalised box in the source frame to a normalised box
in the stored frame (or None when cropping removed too much of it).
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from grit_pipeline.records import Box, DropReason, GritRecord
from grit_pipeline.stages.base import Resources

if TYPE_CHECKING:
    from PIL import Image

    from grit_pipeline.config import BuildConfig
    from grit_pipeline.stages.grounding import Annotation
    from grit_pipeline.work import WorkItem

_ROTATING_ORIENTATIONS = frozenset({5, 6, 7, 8})
# Padding img2dataset's `border` mode adds (albumentations PadIfNeeded, value=[255, 255, 255]).
BORDER_COLOUR = 255
# A band is img2dataset's padding when nearly all its pixels are near white (JPEG ringing leaves a few).
_BAND_WHITE_LEVEL = 225
_BAND_WHITE_SHARE = 0.97


class BoxFrame(str, enum.Enum):
    """The frame a source's boxes are normalised to: the encoded pixels (EXIF ignored) or the upright image."""

    RAW = "raw"
    UPRIGHT = "upright"


class ResizeMode(str, enum.Enum):
    """img2dataset's `--resize_mode`; AUTO infers it from the sizes and, for a square, the stored pixels."""

    AUTO = "auto"
    NO = "no"
    KEEP_RATIO = "keep_ratio"
    KEEP_RATIO_LARGEST = "keep_ratio_largest"
    CENTER_CROP = "center_crop"
    BORDER = "border"


_ASPECT_KEEPING = frozenset({ResizeMode.NO, ResizeMode.KEEP_RATIO, ResizeMode.KEEP_RATIO_LARGEST})


@dataclass(frozen=True, slots=True)
class FrameConfig:
    """How supplied boxes are put into the stored frame when the input cannot say."""

    box_frame: BoxFrame = BoxFrame.RAW
    resize_mode: ResizeMode = ResizeMode.AUTO
    min_cropped_box_fraction: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "box_frame", BoxFrame(self.box_frame))
        object.__setattr__(self, "resize_mode", ResizeMode(self.resize_mode))
        if not 0.0 < self.min_cropped_box_fraction <= 1.0:
            raise ValueError(f"min_cropped_box_fraction must be in (0, 1], got {self.min_cropped_box_fraction}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        out = asdict(self)
        out["box_frame"], out["resize_mode"] = self.box_frame.value, self.resize_mode.value
        return out


@dataclass(frozen=True, slots=True)
class Size:
    """An image size in pixels."""

    width: int
    height: int

    def transposed(self) -> Size:
        """The size with width and height swapped (a 90-degree turn)."""
        return Size(self.height, self.width)


@dataclass(frozen=True, slots=True)
class DownloadInfo:
    """What img2dataset's KEY.json says of the image it stored: the stored size and the size it decoded (EXIF
    ignored) before resizing. Its `exif` column is not used: exifread's printable orientation names swapped
    "90 CW" and "90 CCW" between releases, so they cannot be trusted to say which way to turn."""

    stored: Size | None
    original: Size | None


@dataclass(frozen=True, slots=True)
class SourceFrame:
    """What the input says about the frame of its boxes: the row's image size (None when it gives none)."""

    size: Size | None = None


class FrameMismatchError(ValueError):
    """The stored pixels cannot be put in the frame of the source's boxes; the message says why."""


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the original raw frame lands in the downloaded image, in the download's normalised coordinates:
    x_download = offset_x + x_raw * scale_x (and the same in y). `crops` is True for center_crop."""

    scale_x: float = 1.0
    scale_y: float = 1.0
    offset_x: float = 0.0
    offset_y: float = 0.0
    crops: bool = False
    mode: str = "same_aspect"


@dataclass(frozen=True, slots=True)
class FrameMap:
    """source frame -> raw frame of the original -> downloaded image -> stored (upright) pixels.

    `source_size` is the pixel size of the source frame (the row's size, else the original's), by which
    pixel boxes (COCO `bbox`) are normalised.
    """

    source_frame: BoxFrame
    source_size: Size
    original_orientation: int
    placement: Placement
    stored_orientation: int
    min_kept_fraction: float

    def map_box(self, box: Box) -> Box | None:
        """The box in the stored frame; None when center_crop left less than the minimum share of it."""
        if self.source_frame is BoxFrame.UPRIGHT:
            box = orient_box(box, inverse_orientation(self.original_orientation))
        p = self.placement
        placed = Box(p.offset_x + box.x1 * p.scale_x, p.offset_y + box.y1 * p.scale_y,
                     p.offset_x + box.x2 * p.scale_x, p.offset_y + box.y2 * p.scale_y)
        if p.crops:
            clipped = placed.clamped()
            if placed.area() <= 0 or clipped.area() < self.min_kept_fraction * placed.area():
                return None
            placed = clipped
        return orient_box(placed, self.stored_orientation)


def orient_box(box: Box, orientation: int) -> Box:
    """A normalised box of the raw frame moved with the pixels by EXIF `orientation` (as PIL's exif_transpose)."""
    corners = [_orient_point(x, y, orientation) for x, y in ((box.x1, box.y1), (box.x2, box.y2))]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return Box(min(xs), min(ys), max(xs), max(ys))


def _orient_point(x: float, y: float, orientation: int) -> tuple[float, float]:
    return {
        1: (x, y),
        2: (1 - x, y),  # mirrored horizontally
        3: (1 - x, 1 - y),  # turned 180 degrees
        4: (x, 1 - y),  # mirrored vertically
        5: (y, x),  # transposed
        6: (1 - y, x),  # turned 90 degrees clockwise
        7: (1 - y, 1 - x),  # transversed
        8: (y, 1 - x),  # turned 90 degrees counter-clockwise
    }[orientation]


def inverse_orientation(orientation: int) -> int:
    """The orientation that undoes `orientation` (the two quarter turns undo each other; the rest self-undo)."""
    return {6: 8, 8: 6}.get(orientation, orientation)


def same_aspect(a: Size, b: Size, slack_px: float = 1.0) -> bool:
    """True when `a` and `b` have one aspect ratio, up to rounding each side of the smaller to whole pixels."""
    small, large = (a, b) if a.width * a.height <= b.width * b.height else (b, a)
    expected_width = large.width * small.height / large.height
    expected_height = large.height * small.width / large.width
    return abs(expected_width - small.width) <= slack_px + 0.5 or abs(expected_height - small.height) <= slack_px + 0.5


def resolve_frame(
    source: SourceFrame,
    download: DownloadInfo | None,
    raw_size: Size,
    stored_orientation: int,
    config: FrameConfig,
    raw_pixels: Image.Image | None = None,
) -> FrameMap:
    """The map from the source's box frame to the stored pixels, or FrameMismatchError.

    `raw_size` is the size of the stored bytes as encoded (before their own EXIF orientation),
    `stored_orientation` that orientation, `raw_pixels` the pixels in that frame (used only to tell border
    from center_crop).
    """
    if download is not None and download.stored is not None and download.stored != raw_size:
        raise FrameMismatchError(f"the image is {raw_size.width}x{raw_size.height} but its .json says "
                                 f"{download.stored.width}x{download.stored.height}")
    if download is not None and download.original is not None:
        original, placement = download.original, _placement(download.original, raw_size, config, raw_pixels)
        # a resized copy was re-encoded by img2dataset without EXIF: the original's orientation is unknown
        original_orientation = stored_orientation if placement.mode == "identity" else None
    else:
        original, placement, original_orientation = raw_size, Placement(mode="identity"), stored_orientation
    frame = _source_frame(source, original, original_orientation, config)
    source_size = source.size
    if source_size is None:  # pixel boxes are in the original's pixels, in the frame the boxes are taken in
        turned = frame is BoxFrame.UPRIGHT and original_orientation in _ROTATING_ORIENTATIONS
        source_size = original.transposed() if turned else original
    return FrameMap(frame, source_size, original_orientation or 1, placement, stored_orientation,
                    config.min_cropped_box_fraction)


def _source_frame(source: SourceFrame, raw: Size, orientation: int | None, config: FrameConfig) -> BoxFrame:
    """RAW or UPRIGHT from the row's size; the configured default when the row cannot tell."""
    if source.size is None:
        return _checked_default(config, orientation)
    raw_fits = same_aspect(source.size, raw)
    turned_fits = same_aspect(source.size, raw.transposed())
    if raw_fits and turned_fits:  # square (or nearly): any frame fits the size
        return _checked_default(config, orientation)
    if raw_fits:
        if orientation in _ROTATING_ORIENTATIONS:
            return BoxFrame.RAW
        return _checked_default(config, orientation)  # the upright frame has this aspect too
    if turned_fits:
        if orientation is None:
            raise FrameMismatchError(
                f"the row's {source.size.width}x{source.size.height} is the original {raw.width}x{raw.height} "
                "turned, and the original's EXIF orientation is unknown (the download was re-encoded)")
        if orientation in _ROTATING_ORIENTATIONS:
            return BoxFrame.UPRIGHT
    raise FrameMismatchError(f"the row's size {source.size.width}x{source.size.height} has the aspect ratio of "
                             f"neither frame of the {raw.width}x{raw.height} image (EXIF orientation {orientation or 1})")


def _checked_default(config: FrameConfig, orientation: int | None) -> BoxFrame:
    if config.box_frame is BoxFrame.UPRIGHT and orientation is None:
        raise FrameMismatchError("boxes are taken as upright, but the original's EXIF orientation is unknown "
                                 "(the download was re-encoded)")
    return config.box_frame


def _placement(original: Size, stored: Size, config: FrameConfig, raw_pixels: Image.Image | None) -> Placement:
    """Where img2dataset put the original frame in the downloaded image."""
    mode = config.resize_mode
    if original == stored and mode in (ResizeMode.AUTO, ResizeMode.NO, *_ASPECT_KEEPING):
        return Placement(mode="identity")
    if same_aspect(original, stored) and (mode is ResizeMode.AUTO or mode in _ASPECT_KEEPING):
        return Placement(mode="same_aspect")
    square = stored.width == stored.height
    if not square or mode in _ASPECT_KEEPING:
        raise FrameMismatchError(
            f"img2dataset's original {original.width}x{original.height} and the stored {stored.width}x{stored.height} "
            f"fit no resize mode" + ("" if mode is ResizeMode.AUTO else f" (configured: {mode.value})"))
    border, crop = border_placement(original, stored.width), center_crop_placement(original, stored.width)
    if mode is ResizeMode.BORDER:
        return border
    if mode is ResizeMode.CENTER_CROP:
        return crop
    if raw_pixels is None:
        raise FrameMismatchError("a square download is border or center_crop; without pixels it cannot be told")
    return border if has_white_bands(raw_pixels, original) else crop


def _scaled(original: Size, scale: float) -> Size:
    """albumentations' MaxSizeTransform: each side times the scale, rounded with Python's round, at least 1."""
    return Size(max(1, round(original.width * scale)), max(1, round(original.height * scale)))


def border_placement(original: Size, side: int) -> Placement:
    """img2dataset `border`: LongestMaxSize(side), then PadIfNeeded(side, side) centred (odd pixel bottom/right)."""
    content = _scaled(original, side / max(original.width, original.height))
    left, top = (side - content.width) // 2, (side - content.height) // 2
    return Placement(content.width / side, content.height / side, left / side, top / side, mode="border")


def center_crop_placement(original: Size, side: int) -> Placement:
    """img2dataset `center_crop`: SmallestMaxSize(side), then CenterCrop(side, side) (offsets floored)."""
    content = _scaled(original, side / min(original.width, original.height))
    left, top = (content.width - side) // 2, (content.height - side) // 2
    return Placement(content.width / side, content.height / side, -left / side, -top / side, crops=True,
                     mode="center_crop")


def has_white_bands(raw_pixels: Image.Image, original: Size) -> bool:
    """True when the bands `border` would pad for an original of this size are white in the pixels."""
    import numpy as np

    side = raw_pixels.width
    placement = border_placement(original, side)
    left, top = round(placement.offset_x * side), round(placement.offset_y * side)
    width, height = round(placement.scale_x * side), round(placement.scale_y * side)
    pixels = np.asarray(raw_pixels.convert("L"))
    bands = [pixels[:top, :], pixels[top + height:, :], pixels[:, :left], pixels[:, left + width:]]
    values = np.concatenate([band.ravel() for band in bands])
    if values.size == 0:  # nothing padded: border and center_crop place the boxes alike
        return True
    return bool(np.mean(values >= _BAND_WHITE_LEVEL) >= _BAND_WHITE_SHARE)


class FrameStage:
    """Put the boxes that come with the input (GRIT-20M entries, annotations) into the stored pixels' frame.

    Per sample, `stages/frames.py` finds the frame the boxes were given in (EXIF orientation, img2dataset's
    resize mode) and maps them; a sample whose frame cannot be found is dropped (`frame_mismatch`), a box that
    center_crop cut away is dropped (`box_cropped_out`). Samples without supplied boxes pass untouched.
    """

    name = "frames"
    resources = Resources()

    def __init__(self, config: BuildConfig) -> None:
        self.config = config.frames

    def setup(self) -> None:
        """Nothing to load."""

    def __call__(self, items: list[WorkItem]) -> list[WorkItem]:
        """Map the supplied boxes of every live, decoded item into its stored frame."""
        for item in items:
            supplied = item.sample.fields.get("annotations")
            if not item.alive or item.decoded is None or (item.source_record is None and supplied is None):
                continue
            decoded = item.decoded
            raw_pixels = decoded.image if decoded.exif_orientation == 1 else None
            try:
                frame_map = resolve_frame(item.sample.frame, item.sample.download,
                                          Size(decoded.raw_width, decoded.raw_height), decoded.exif_orientation,
                                          self.config, raw_pixels)
            except FrameMismatchError as exc:
                item.drop(DropReason.FRAME_MISMATCH, str(exc))
                continue
            dropped: Counter[DropReason] = Counter()
            if item.source_record is not None:
                item.source_record = map_record_boxes(item.source_record, frame_map, dropped)
                if not item.source_record.noun_chunks:
                    item.drop(DropReason.BOX_CROPPED_OUT, "every box lay outside the center_crop")
            if supplied is not None:
                item.annotations = map_annotations(supplied, frame_map, dropped)
            item.set_drops(self.name, dropped)
        return items


def map_record_boxes(record: GritRecord, frame_map: FrameMap, dropped: Counter[DropReason]) -> GritRecord:
    """The record with every entry's box in the stored frame; entries cropped away (with their ref_exps
    partner) are counted in `dropped` and removed."""
    from dataclasses import replace

    from grit_pipeline.records import GroundedSpan

    chunks, expressions = [], []
    for index, chunk in enumerate(record.noun_chunks):
        box = frame_map.map_box(chunk.box)
        if box is None:
            dropped[DropReason.BOX_CROPPED_OUT] += 1
            continue
        chunks.append(GroundedSpan(chunk.span, box, chunk.score))
        if index < len(record.ref_exps):
            expression = record.ref_exps[index]
            expression_box = box if expression.box == chunk.box else frame_map.map_box(expression.box)
            expressions.append(GroundedSpan(expression.span, expression_box or box, expression.score))
    return replace(record, noun_chunks=chunks, ref_exps=expressions)


def map_annotations(supplied: Any, frame_map: FrameMap, dropped: Counter[DropReason]) -> list[Annotation]:
    """Parse supplied annotations in the source frame (pixel boxes by its size) and map them to the stored one."""
    from dataclasses import replace

    from grit_pipeline.stages.annotations import parse_annotations

    size = frame_map.source_size
    mapped = []
    for annotation in parse_annotations(supplied, size.width, size.height, dropped):
        box = frame_map.map_box(annotation.box)
        if box is None:
            dropped[DropReason.BOX_CROPPED_OUT] += 1
        else:
            mapped.append(replace(annotation, box=box))
    return mapped
