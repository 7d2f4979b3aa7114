"""Kosmos-2 location-token serialisation of GRIT records, and the parsers that read it back (GRIT.md 5).

Policies (each documented in docs/serialisation.md):
- Quantisation is transformers' `coordinate_to_patch_index` on the box clamped to [0, 1]; a box with no
  area after clamping is dropped (DEGENERATE_BOX). Two boxes with the same tokens on one span are kept once.
- Spans are trimmed of surrounding whitespace; then, in caption order, the leftmost-longest span wins:
  a span inside a kept span is dropped (CONTAINED_SPAN, the paper's containment rule) and a span that
  overlaps a kept span without being inside it is dropped (CROSSING_SPAN).
- Sanitisation: every '<' and '>' of the caption becomes '‹' and '›' (same length, so offsets hold), so
  no caption text can ever form a control token; with `sanitize="drop"` a caption holding a control
  string is dropped instead (CONTROL_TOKEN_IN_CAPTION).
"""

from __future__ import annotations

import enum
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from math import ceil, floor, isfinite
from typing import TYPE_CHECKING, Any, NamedTuple

from grit_pipeline.records import GRID_DEFAULT, Box, DropReason, GritRecord, GroundedSpan, Span
from grit_pipeline.stages.base import CHEAP_CPUS, Resources

if TYPE_CHECKING:
    from grit_pipeline.config import BuildConfig
    from grit_pipeline.work import WorkItem


class TokenFormat(str, enum.Enum):
    """Spelling of the control tokens: `hf` (released checkpoints, transformers) or `paper`."""

    HF = "hf"
    PAPER = "paper"


class SpanMode(str, enum.Enum):
    """Which spans carry boxes: referring `expression`s (contained spans removed) or noun-chunk `phrase`s."""

    EXPRESSION = "expression"
    PHRASE = "phrase"


class SanitizePolicy(str, enum.Enum):
    """What to do with captions that contain control strings: `escape` them or `drop` the record."""

    ESCAPE = "escape"
    DROP = "drop"


# Every control string of either spelling (plus the sequence markers), for counting and the drop policy.
CONTROL_STRING = re.compile(
    r"</?(?:grounding|phrase|object|image|doc|chunk|line|s|p|box|delim|loc_?\d+|patch_index_\d+)>"
    r"|</delimiter_of_multi_objects/>"
)
_ESCAPE_TABLE = str.maketrans({"<": "\u2039", ">": "\u203a"})


@dataclass(frozen=True)
class SerializeConfig:
    """How records become grounded text."""

    format: TokenFormat = TokenFormat.HF
    mode: SpanMode = SpanMode.EXPRESSION
    grid: int = GRID_DEFAULT
    sanitize: SanitizePolicy = SanitizePolicy.ESCAPE

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", TokenFormat(self.format))
        object.__setattr__(self, "mode", SpanMode(self.mode))
        object.__setattr__(self, "sanitize", SanitizePolicy(self.sanitize))
        if not 1 <= self.grid <= 100:
            raise ValueError(f"grid must be in [1, 100] (patch indices have 4 digits), got {self.grid}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of this config."""
        return {"format": self.format.value, "mode": self.mode.value, "grid": self.grid, "sanitize": self.sanitize.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SerializeConfig:
        """The config from `to_dict` output."""
        return cls(**data)


class PatchBox(NamedTuple):
    """A box as two location tokens: the top-left and bottom-right cell indices (row * grid + col)."""

    top_left: int
    bottom_right: int

    def decode(self, grid: int = GRID_DEFAULT) -> Box:
        """The box these tokens stand for, exactly as transformers' `patch_index_to_coordinate`."""
        return Box(*patch_index_to_coordinate(self.top_left, self.bottom_right, grid))


def coordinate_to_patch_index(box: Box, grid: int = GRID_DEFAULT) -> PatchBox:
    """Quantise a box exactly as transformers' `coordinate_to_patch_index`; raises ValueError on no area."""
    if not (box.x2 > box.x1 and box.y2 > box.y1):
        raise ValueError(f"degenerate box {box.as_tuple()}")
    ul_x = math.floor(box.x1 * grid)
    ul_y = math.floor(box.y1 * grid)
    lr_x = math.ceil(box.x2 * grid - 1)
    lr_y = math.ceil(box.y2 * grid - 1)
    return PatchBox(ul_y * grid + ul_x, lr_y * grid + lr_x)


def patch_index_to_coordinate(ul_idx: int, lr_idx: int, grid: int = GRID_DEFAULT) -> tuple[float, float, float, float]:
    """Cell centres of the two corners, or cell edges when they share a row or a column (as transformers)."""
    cell = 1.0 / grid
    ul_x, ul_y = ul_idx % grid, ul_idx // grid
    lr_x, lr_y = lr_idx % grid, lr_idx // grid
    if ul_idx == lr_idx or ul_x == lr_x or ul_y == lr_y:
        return (ul_x * cell, ul_y * cell, lr_x * cell + cell, lr_y * cell + cell)
    return (ul_x * cell + cell / 2, ul_y * cell + cell / 2, lr_x * cell + cell / 2, lr_y * cell + cell / 2)


def quantize_box(box: Box, grid: int = GRID_DEFAULT) -> PatchBox | None:
    """The location tokens of a box clamped to [0, 1], or None when it has no area (dropped)."""
    # Inlined clamp + checks: this runs for every box of every record (see `grit bench serialize`).
    x1, y1, x2, y2 = box.x1, box.y1, box.x2, box.y2
    if not (isfinite(x1) and isfinite(y1) and isfinite(x2) and isfinite(y2)):
        return None
    x1 = 0.0 if x1 < 0.0 else (1.0 if x1 > 1.0 else x1)
    y1 = 0.0 if y1 < 0.0 else (1.0 if y1 > 1.0 else y1)
    x2 = 0.0 if x2 < 0.0 else (1.0 if x2 > 1.0 else x2)
    y2 = 0.0 if y2 < 0.0 else (1.0 if y2 > 1.0 else y2)
    if not (x2 > x1 and y2 > y1):
        return None
    ul_x, ul_y = floor(x1 * grid), floor(y1 * grid)
    # max(): for boxes thinner than float precision (y2 = 1e-181) `ceil(y2 * P - 1)` rounds to -1, before the
    # top-left cell (transformers writes an invalid index there); such a box takes its top-left cell.
    lr_x, lr_y = max(ul_x, ceil(x2 * grid - 1)), max(ul_y, ceil(y2 * grid - 1))
    return PatchBox(ul_y * grid + ul_x, lr_y * grid + lr_x)


def sanitize_caption(caption: str) -> str:
    """The caption with '<' and '>' replaced by '‹' and '›': same length, no control token possible."""
    return caption.translate(_ESCAPE_TABLE)


def count_control_strings(caption: str) -> int:
    """How many control strings (either spelling) the caption contains literally."""
    return sum(1 for _ in CONTROL_STRING.finditer(caption))


class Entity(NamedTuple):
    """A serialised span with its location tokens, in caption order."""

    span: Span
    boxes: tuple[PatchBox, ...]


@dataclass(slots=True)
class Serialized:
    """Grounded text for one record (None when the record was dropped) and what was dropped on the way."""

    text: str | None
    entities: list[Entity] = field(default_factory=list)
    dropped: Counter[DropReason] = field(default_factory=Counter)
    drop_reason: DropReason | None = None
    escaped_control_strings: int = 0


def trim_span(start: int, end: int, caption: str) -> tuple[int, int]:
    """(start, end) without surrounding whitespace; start == end when nothing is left."""
    if start == end or not (caption[start].isspace() or caption[end - 1].isspace()):
        return start, end
    text = caption[start:end]
    lead = len(text) - len(text.lstrip())
    if lead == len(text):
        return start, start
    return start + lead, end - (len(text) - len(text.rstrip()))


def group_entries(entries: list[GroundedSpan], caption: str, grid: int,
                  dropped: Counter[DropReason]) -> dict[tuple[int, int], list[PatchBox]]:
    """Trimmed (start, end) spans mapped to their distinct location tokens, in first-appearance order."""
    # Plain (start, end) keys rather than Span objects: this loop runs for every box of every record.
    groups: dict[tuple[int, int], list[PatchBox]] = {}
    n = len(caption)
    for entry in entries:
        span = entry.span
        if span.end > n:
            dropped[DropReason.SPAN_OUT_OF_CAPTION] += 1
            continue
        key = trim_span(span.start, span.end, caption)
        if key[0] == key[1]:
            dropped[DropReason.EMPTY_SPAN] += 1
            continue
        tokens = quantize_box(entry.box, grid)
        if tokens is None:
            dropped[DropReason.DEGENERATE_BOX] += 1
            continue
        boxes = groups.get(key)
        if boxes is None:
            groups[key] = [tokens]
        elif tokens in boxes:
            dropped[DropReason.DUPLICATE_BOX_TOKENS] += 1
        else:
            boxes.append(tokens)
    return groups


def select_spans(spans: list[Span], dropped: Counter[DropReason]) -> list[Span]:
    """Leftmost-longest non-overlapping spans in caption order; a span overlapping the last kept one is dropped,
    as CONTAINED_SPAN when that one contains it (`Span.contains`, the paper's rule), else as CROSSING_SPAN."""
    kept: list[Span] = []
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if kept and span.start < kept[-1].end:
            dropped[DropReason.CONTAINED_SPAN if kept[-1].contains(span) else DropReason.CROSSING_SPAN] += 1
            continue
        kept.append(span)
    return kept


# Token strings for every index a grid of up to 100 x 100 can produce, formatted once.
_HF_INDEX = [f"<patch_index_{i:04d}>" for i in range(100 * 100)]
_PAPER_INDEX = [f"<loc{i}>" for i in range(100 * 100)]


def _hf_object(boxes: tuple[PatchBox, ...]) -> str:
    return "<object>" + "</delimiter_of_multi_objects/>".join(
        _HF_INDEX[a] + _HF_INDEX[b] for a, b in boxes
    ) + "</object>"


def _paper_object(boxes: tuple[PatchBox, ...]) -> str:
    return "<box>" + "<delim>".join(_PAPER_INDEX[a] + _PAPER_INDEX[b] for a, b in boxes) + "</box>"


def render(caption: str, entities: list[Entity], token_format: TokenFormat) -> str:
    """The grounded text: `<grounding>` then the caption with each entity's span tagged and boxed.

    hf: a space before a span moves inside `<phrase>` (`of<phrase> a snowman</phrase>`), as the released
    model writes it; paper: `<p> span </p><box><locA><locB></box>` as in the paper's example.
    """
    hf_format = token_format is TokenFormat.HF
    parts = ["<grounding>"]
    pos = 0  # in caption coordinates; the caption is read as if preceded by one space
    for entity in entities:
        start, end = entity.span.start, entity.span.end
        text = caption[start:end]
        if not hf_format:
            parts.append(" " + caption[:start] if pos == 0 else caption[pos:start])
            parts.append(f"<p> {text} </p>{_paper_object(entity.boxes)}")
        elif start == 0 or (start > pos and caption[start - 1] == " "):
            if start > 0:
                parts.append(" " + caption[: start - 1] if pos == 0 else caption[pos : start - 1])
            parts.append(f"<phrase> {text}</phrase>{_hf_object(entity.boxes)}")
        else:
            parts.append(" " + caption[:start] if pos == 0 else caption[pos:start])
            parts.append(f"<phrase>{text}</phrase>{_hf_object(entity.boxes)}")
        pos = end
    parts.append(" " + caption if pos == 0 else caption[pos:])
    return "".join(parts)


def serialized_entries(record: GritRecord, config: SerializeConfig) -> list[GroundedSpan]:
    """The entries whose spans are serialised: `ref_exps` in expression mode (when the record has them), else
    `noun_chunks`."""
    return record.ref_exps if config.mode is SpanMode.EXPRESSION and record.ref_exps else record.noun_chunks


def serialize_record(record: GritRecord, config: SerializeConfig | None = None) -> Serialized:
    """Grounded text for a record in the configured spelling and span mode."""
    config = config or SerializeConfig()
    dropped: Counter[DropReason] = Counter()
    caption = record.caption
    control_strings = count_control_strings(caption) if "<" in caption else 0
    if control_strings and config.sanitize is SanitizePolicy.DROP:
        return Serialized(None, dropped=dropped, drop_reason=DropReason.CONTROL_TOKEN_IN_CAPTION)
    if "<" in caption or ">" in caption:
        caption = sanitize_caption(caption)
    groups = group_entries(serialized_entries(record, config), caption, config.grid, dropped)
    spans = select_spans([Span(*key) for key in groups], dropped)
    entities = [Entity(span, tuple(groups[span.start, span.end])) for span in spans]
    if not entities:
        return Serialized(None, dropped=dropped, drop_reason=DropReason.NO_SPAN_SERIALISED,
                          escaped_control_strings=control_strings)
    text = render(caption, entities, config.format)
    return Serialized(text, entities, dropped, None, control_strings)


@dataclass(frozen=True, slots=True)
class ParsedEntity:
    """An entity read back from grounded text: its span in the cleaned text and its decoded boxes."""

    span: Span
    text: str
    boxes: tuple[Box, ...]


_PAPER_ENTITY = re.compile(r"<p> (.*?) </p><box>((?:<loc\d+><loc\d+>)(?:<delim><loc\d+><loc\d+>)*)</box>", re.S)
_PAPER_LOC_PAIR = re.compile(r"<loc(\d+)><loc(\d+)>")


def parse_grounded_text(text: str, token_format: TokenFormat | str = TokenFormat.HF,
                        grid: int = GRID_DEFAULT) -> tuple[str, list[ParsedEntity]]:
    """Clean text and entities of grounded text; hf goes through transformers' own Kosmos-2 parser."""
    if TokenFormat(token_format) is TokenFormat.HF:
        from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes

        clean, entities = clean_text_and_extract_entities_with_bboxes(text, num_patches_per_side=grid)
        return clean, [ParsedEntity(Span(s, e), name, tuple(Box(*b) for b in boxes)) for name, (s, e), boxes in entities]
    return _parse_paper(text, grid)


def _parse_paper(text: str, grid: int) -> tuple[str, list[ParsedEntity]]:
    body = text.removeprefix("<grounding>")
    out: list[str] = []
    length = 0
    entities: list[ParsedEntity] = []
    pos = 0
    for match in _PAPER_ENTITY.finditer(body):
        out.append(body[pos : match.start()])
        length += match.start() - pos
        name = match.group(1)
        boxes = tuple(PatchBox(int(a), int(b)).decode(grid) for a, b in _PAPER_LOC_PAIR.findall(match.group(2)))
        entities.append(ParsedEntity(Span(length, length + len(name)), name, boxes))
        out.append(name)
        length += len(name)
        pos = match.end()
    out.append(body[pos:])
    clean = "".join(out)
    lead = len(clean) - len(clean.lstrip())
    shifted = [ParsedEntity(Span(e.span.start - lead, e.span.end - lead), e.text, e.boxes) for e in entities]
    return clean.strip(), shifted


class SerializeStage:
    """Grounded text with Kosmos-2 location tokens (transformers spelling by default)."""

    name = "serialize"
    resources = Resources(cpus=CHEAP_CPUS)

    def __init__(self, config: BuildConfig) -> None:
        self.config = config.serialize

    def setup(self) -> None:
        """Nothing to load."""

    def __call__(self, items: list[WorkItem]) -> list[WorkItem]:
        """Serialise every live record; a record with no serialisable span is dropped."""
        for item in items:
            if not item.alive or item.record is None:
                continue
            result = serialize_record(item.record, self.config)
            item.set_drops(self.name, result.dropped)
            if result.text is None:
                item.drop(result.drop_reason or DropReason.NO_SPAN_SERIALISED)
            else:
                item.text = result.text
                item.n_spans = len(result.entities)
        return items
