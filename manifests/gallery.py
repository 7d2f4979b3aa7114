"""`grit inspect`: a static, self-contained HTML gallery of a build (`--png` is in sample_png.py).

The page needs no server and no network: thumbnails are inlined as base64 JPEG inside SVG figures whose
rectangles are the boxes; each box's span is highlighted in the caption in the box's colour. Below the
gallery: the build totals, a per-shard table and an inline-SVG bar chart of drop reasons.

What is drawn is what a trainer gets: the spans kept by the serialiser (expression mode, contained spans
removed) with the .json's own boxes for them (not the quantised ones).
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import itertools
import json
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grit_pipeline.manifests.audit import audit_options, shard_expectations
from grit_pipeline.manifests.manifest import SHARDS_DIR, ManifestError, load_manifest
from grit_pipeline.manifests.sample_checks import iter_tar_samples
from grit_pipeline.records import Box, GritRecord, MalformedRecordError, Span
from grit_pipeline.stages.serialize import SerializeConfig, serialize_record, serialized_entries, trim_span
from grit_pipeline.storage import FileRef, Folder, as_folder

# Ten distinct colours (matplotlib's tab10), readable on photos and on white.
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
THUMBNAIL_SIDE = 320


class GalleryError(RuntimeError):
    """The build cannot be shown: no manifest, or no sample with the requested key."""


@dataclass(frozen=True, slots=True)
class ShownEntity:
    """A kept caption span and the .json boxes (with scores) bound to it."""

    span: Span
    boxes: tuple[tuple[Box, float], ...]
    colour: str


@dataclass(frozen=True, slots=True)
class ShownSample:
    """One sample as the gallery shows it."""

    shard: str
    key: str
    record: GritRecord
    grounded_text: str
    image_bytes: bytes
    entities: tuple[ShownEntity, ...]


def kept_entities(record: GritRecord, config: SerializeConfig) -> tuple[ShownEntity, ...]:
    """The spans the serialiser keeps, each with the record's boxes on that span, coloured in order."""
    entries = serialized_entries(record, config)
    shown = []
    for index, entity in enumerate(serialize_record(record, config).entities):
        span = (entity.span.start, entity.span.end)
        boxes = tuple((e.box.clamped(), e.score) for e in entries
                      if trim_span(e.span.start, e.span.end, record.caption) == span)
        shown.append(ShownEntity(entity.span, boxes, PALETTE[index % len(PALETTE)]))
    return tuple(shown)


def _shard_paths(out: Folder, manifest: Mapping[str, Any]) -> list[FileRef]:
    """The tars of the manifest's shards that exist, in shard order."""
    shards = out.child(SHARDS_DIR)
    listing = shards.files()
    return [FileRef(shards, name) for name in sorted(shard_expectations(manifest)) if name in listing]


def _iter_shard(path: FileRef, config: SerializeConfig) -> Iterator[ShownSample]:
    """The readable samples of one tar (the audit's reader); a tar that breaks off ends early (the audit
    reports it)."""
    with path.open() as handle:
        for key, files in iter_tar_samples(handle, name=path.name):
            sample = _shown_sample(path.name, key, files, config)
            if sample is not None:
                yield sample


def _iter_shards(paths: Sequence[FileRef], config: SerializeConfig) -> Iterator[ShownSample]:
    """The readable samples of the tars, in order."""
    for path in paths:
        yield from _iter_shard(path, config)


def pick_samples(out_dir: Folder | str | Path, count: int, manifest: Mapping[str, Any] | None = None
                 ) -> list[ShownSample]:
    """Up to `count` samples spread evenly over the shards (the first of each), topped up in build order.

    `manifest`: the build's, already loaded (read here when None).
    """
    out_dir = as_folder(out_dir)
    manifest = read_manifest(out_dir) if manifest is None else manifest
    config = audit_options(manifest).serialize
    paths = _shard_paths(out_dir, manifest)
    quota = math.ceil(count / max(1, len(paths)))
    per_shard: list[list[ShownSample]] = []
    for path in paths:
        with contextlib.closing(_iter_shard(path, config)) as samples:
            per_shard.append(list(itertools.islice(samples, quota)))
    # round robin, so that cutting at `count` leaves every shard with its share
    by_rank = (shard[rank] for rank in range(quota) for shard in per_shard if rank < len(shard))
    picked = list(itertools.islice(by_rank, count))
    if len(picked) < count:
        taken = {(s.shard, s.key) for s in picked}
        with contextlib.closing(_iter_shards(paths, config)) as samples:
            extra = (s for s in samples if (s.shard, s.key) not in taken)
            picked += itertools.islice(extra, count - len(picked))
    return sorted(picked, key=lambda s: (s.shard, s.key))


def _shown_sample(
    shard: str, key: str, files: Mapping[str, bytes], config: SerializeConfig
) -> ShownSample | None:
    """The sample, or None when its .json or image is missing or malformed."""
    if "json" not in files or "jpg" not in files:
        return None
    try:
        record = GritRecord.from_row(json.loads(files["json"]))
    except (ValueError, MalformedRecordError):
        return None
    text = files.get("txt", b"").decode("utf-8", errors="replace")
    return ShownSample(shard, key, record, text, files["jpg"], kept_entities(record, config))


SORT_KEYS = ("clip", "box_score", "boxes")
"""What `grit inspect --sort` orders by, lowest first: the CLIP similarity (ViT-B/32, else ViT-L/14), the
sample's lowest box score, its number of boxes (noun_chunks entries)."""


def sample_metrics(record: GritRecord) -> dict[str, float | None]:
    """A sample's `clip`, `box_score` (its lowest) and `boxes`; None when unknown (a CLIP similarity of
    -1.0 is the .json's "unknown")."""
    clip = None
    for value in (record.clip_similarity_vitb32, record.clip_similarity_vitl14):
        if value is not None and math.isfinite(value) and value != -1.0:
            clip = float(value)
            break
    scores = [e.score for e in record.noun_chunks]
    return {"clip": clip, "box_score": min(scores) if scores else None, "boxes": float(len(record.noun_chunks))}


@dataclass(frozen=True, slots=True)
class Selection:
    """Which samples `grit inspect` shows: sorted by one of SORT_KEYS (lowest first) and/or only those at or
    under a CLIP similarity / lowest box score, or with at least / at most a number of boxes."""

    sort: str | None = None
    max_clip: float | None = None
    max_box_score: float | None = None
    min_boxes: int | None = None
    max_boxes: int | None = None

    def __post_init__(self) -> None:
        if self.sort is not None and self.sort not in SORT_KEYS:
            raise GalleryError(f"unknown sort key {self.sort!r}; expected one of {SORT_KEYS}")

    @property
    def active(self) -> bool:
        """True when it sorts or filters (otherwise the gallery spreads its samples over the shards)."""
        return any(v is not None for v in (self.sort, self.max_clip, self.max_box_score, self.min_boxes,
                                           self.max_boxes))

    def accepts(self, metrics: Mapping[str, float | None]) -> bool:
        """True when the sample passes every filter (an unknown value fails the filter on it)."""
        checks = ((self.max_clip, "clip", False), (self.max_box_score, "box_score", False),
                  (self.min_boxes, "boxes", True), (self.max_boxes, "boxes", False))
        for bound, name, is_min in checks:
            if bound is None:
                continue
            value = metrics[name]
            if value is None or (value < bound if is_min else value > bound):
                return False
        return True

    def describe(self) -> str:
        """The selection in words, for the page's heading."""
        parts = [f"lowest {self.sort} first"] if self.sort else []
        for label, value in (("clip <=", self.max_clip), ("box score <=", self.max_box_score),
                             ("boxes >=", self.min_boxes), ("boxes <=", self.max_boxes)):
            if value is not None:
                parts.append(f"{label} {value}")
        return ", ".join(parts)


def select_samples(out_dir: Folder | str | Path, count: int, selection: Selection,
                   manifest: Mapping[str, Any] | None = None) -> list[tuple[ShownSample, dict[str, float | None]]]:
    """Up to `count` samples of the whole build that pass `selection`'s filters, lowest `selection.sort`
    first (unknown values last; ties in build order), or in build order without a sort; with their metrics.
    Only `count` samples are held at a time."""
    import heapq

    out_dir = as_folder(out_dir)
    manifest = read_manifest(out_dir) if manifest is None else manifest
    config = audit_options(manifest).serialize
    paths = _shard_paths(out_dir, manifest)

    def candidates() -> Iterator[tuple[tuple[float, int], ShownSample, dict[str, float | None]]]:
        for order, sample in enumerate(_iter_shards(paths, config)):
            metrics = sample_metrics(sample.record)
            if selection.accepts(metrics):
                value = metrics[selection.sort] if selection.sort else None
                yield (math.inf if value is None else value, order), sample, metrics

    with contextlib.closing(candidates()) as found:
        best = heapq.nsmallest(count, found, key=lambda c: c[0]) if selection.sort else \
            list(itertools.islice(found, count))
    return [(sample, metrics) for _, sample, metrics in best]


def read_manifest(out_dir: Folder | str | Path) -> dict[str, Any]:
    """The build's manifest (loaded and checked by `load_manifest`), or GalleryError."""
    try:
        return load_manifest(out_dir)
    except ManifestError as exc:
        raise GalleryError(str(exc)) from exc


def write_gallery(out_dir: Folder | str | Path, html_path: str | Path, count: int = 50,
                  selection: Selection | None = None) -> int:
    """Write the self-contained HTML gallery of `count` samples, spread over the shards or, with an active
    `selection`, the ones it picks in its order; returns how many."""
    from grit_pipeline.io import write_bytes_atomic

    out = as_folder(out_dir)
    manifest = read_manifest(out)
    heading = None
    if selection is not None and selection.active:
        samples = [sample for sample, _ in select_samples(out, count, selection, manifest)]
        heading = selection.describe()
    else:
        samples = pick_samples(out, count, manifest)
    page = render_page(out.url.rsplit("/", 1)[-1] or out.url, manifest, samples, shard_table_rows(out, manifest), heading)
    write_bytes_atomic(html_path, page.encode("utf-8"))
    return len(samples)


@dataclass(frozen=True, slots=True)
class ShardRow:
    """One line of the per-shard table."""

    name: str
    status: str
    inputs: int | None
    kept: int | None
    spans: int | None
    bytes: int | None
    sha256: str | None
    drop_reasons: dict[str, int]


def shard_table_rows(out: Folder | str | Path, manifest: Mapping[str, Any]) -> list[ShardRow]:
    """Per shard, from its manifest entry: status, input/kept/span counts, size, sha256 and drop reasons."""
    listing = as_folder(out).child(SHARDS_DIR).files()
    rows = []
    for entry in manifest.get("shards", []):
        counts = entry.get("counts") or {}
        tar = str(entry.get("tar") or f"{entry.get('name')}.tar")
        status = str(entry.get("status", "complete"))
        if status == "complete" and entry.get("tar") is None:
            status = "complete (kept nothing: no tar)"
        elif status == "complete" and tar not in listing:
            status = "missing"
        rows.append(ShardRow(tar, status, counts.get("input"), counts.get("kept"), counts.get("spans"),
                             entry.get("bytes"), entry.get("sha256"), dict(entry.get("drop_reasons") or {})))  # fmt: skip
    return rows


def drop_reason_counts(manifest: Mapping[str, Any], field_name: str = "drop_reasons") -> Counter[str]:
    """Why samples (`drop_reasons`) or spans (`span_drop_reasons`) were dropped, from the manifest totals."""
    totals = manifest.get("totals") or {}
    return Counter({str(k): int(v) for k, v in (totals.get(field_name) or {}).items()})


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; background: #fafafa; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; }
.grid { display: flex; flex-wrap: wrap; gap: 16px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; width: 340px; }
.card svg { width: 100%; height: auto; display: block; background: #eee; }
.caption { margin: 8px 0 4px; line-height: 1.5; }
.caption mark { color: #000; padding: 1px 2px; border-radius: 3px; }
.meta { font-size: 12px; color: #666; }
details pre { white-space: pre-wrap; word-break: break-all; font-size: 11px; }
table { border-collapse: collapse; background: #fff; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: right; font-size: 13px; }
th { background: #eef; } td:first-child { text-align: left; }
"""


def render_page(
    title: str,
    manifest: Mapping[str, Any],
    samples: Sequence[ShownSample],
    shard_rows: Sequence[ShardRow],
    heading: str | None = None,
) -> str:
    """The whole HTML document (`heading`: how the samples were selected; default spread over the shards)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>grit inspect: {html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>grit build: {html.escape(title)}</h1>",
        _totals_html(manifest),
        f"<h2>Samples ({len(samples)}, {html.escape(heading or 'spread over the shards')})</h2>",
        '<div class="grid">',
        *(_card_html(sample) for sample in samples),
        "</div>",
        "<h2>Shards</h2>",
        _shard_table_html(shard_rows),
        "<h2>Dropped samples, by reason</h2>",
        drop_chart_svg(drop_reason_counts(manifest, "drop_reasons"), nothing="No sample was dropped."),
        "<h2>Dropped spans and boxes of kept samples, by reason</h2>",
        drop_chart_svg(drop_reason_counts(manifest, "span_drop_reasons"), nothing="No span was dropped."),
        "<h2>Score distributions (kept samples)</h2>",
        _distributions_html(manifest),
        "</body></html>",
    ]
    return "\n".join(parts)


def _totals_html(manifest: Mapping[str, Any]) -> str:
    """The manifest's totals (and timings) as a small key-value table."""
    rows = []
    for section in ("totals", "timings"):
        values = manifest.get(section)
        if isinstance(values, Mapping):
            rows += [(f"{section}.{k}", v) for k, v in values.items() if isinstance(v, (int, float, str))]
    if not rows:
        return ""
    cells = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _distributions_html(manifest: Mapping[str, Any]) -> str:
    """The totals' distributions (CLIP similarity, box score, boxes per sample): count, mean and quantiles."""
    dists = (manifest.get("totals") or {}).get("distributions") or {}
    if not dists:
        return "<p>No distribution recorded.</p>"
    names = sorted({q for d in dists.values() for q in (d.get("quantiles") or {})})
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ("distribution", "count", "mean", "min", *names, "max"))
    rows = []
    for name, dist in dists.items():
        quantiles = dist.get("quantiles") or {}
        cells = [name, dist.get("count"), dist.get("mean"), dist.get("min"), *(quantiles.get(n) for n in names),
                 dist.get("max")]
        rows.append("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _fmt(value: object) -> str:
    """A table cell: floats with 3 significant decimals, the rest as is."""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _card_html(sample: ShownSample) -> str:
    """One sample: the thumbnail with its boxes, the caption with highlighted spans, the grounded text."""
    record = sample.record
    return (
        '<div class="card">'
        f"{_figure_svg(sample)}"
        f'<div class="caption">{highlight_caption(record.caption, sample.entities)}</div>'
        f'<div class="meta">{html.escape(sample.shard)} / {html.escape(sample.key)}'
        f"{' · ' + html.escape(record.url) if record.url else ''}</div>"
        f"<details><summary>grounded text</summary><pre>{html.escape(sample.grounded_text)}</pre></details>"
        "</div>"
    )


def _figure_svg(sample: ShownSample) -> str:
    """An inline SVG: the base64 thumbnail with one rectangle (and its number) per box."""
    thumbnail, width, height = _thumbnail(sample.image_bytes)
    shapes = [
        f'<image href="data:image/jpeg;base64,{thumbnail}" x="0" y="0" width="{width}" height="{height}"/>'
    ]
    for number, entity in enumerate(sample.entities, start=1):
        label = html.escape(entity.span.text(sample.record.caption))
        for box, score in entity.boxes:
            x1, y1, x2, y2 = box.to_pixels(width, height)
            shapes.append(
                f'<rect x="{x1:.1f}" y="{y1:.1f}" width="{x2 - x1:.1f}" height="{y2 - y1:.1f}" fill="none" '
                f'stroke="{entity.colour}" stroke-width="3"><title>{label} ({score:.2f})</title></rect>'
                f'<rect x="{x1:.1f}" y="{y1:.1f}" width="16" height="16" fill="{entity.colour}"/>'
                f'<text x="{x1 + 4:.1f}" y="{y1 + 12:.1f}" font-size="12" fill="#fff">{number}</text>'
            )
    return f'<svg viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">{"".join(shapes)}</svg>'


def _thumbnail(data: bytes) -> tuple[str, int, int]:
    """Base64 JPEG of the image scaled to fit THUMBNAIL_SIDE, with its width and height."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return base64.b64encode(buffer.getvalue()).decode("ascii"), image.width, image.height


def highlight_caption(caption: str, entities: Sequence[ShownEntity]) -> str:
    """The HTML-escaped caption with each entity's span in a <mark> of its colour, numbered like its boxes."""
    parts, position = [], 0
    for number, entity in enumerate(sorted(entities, key=lambda e: e.span.start), start=1):
        start, end = entity.span.start, entity.span.end
        parts.append(html.escape(caption[position:start]))
        parts.append(
            f'<mark style="background:{entity.colour}55;border-bottom:3px solid {entity.colour}">'
            f"{html.escape(caption[start:end])}<sup>{number}</sup></mark>"
        )
        position = end
    parts.append(html.escape(caption[position:]))
    return "".join(parts)


def _shard_table_html(rows: Sequence[ShardRow]) -> str:
    """The per-shard table."""
    names = ("shard", "status", "inputs", "kept", "kept %", "spans", "MB", "sha256", "drop reasons")
    lines = ["<tr>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>"]
    for row in rows:
        ratio = f"{100 * row.kept / row.inputs:.1f}" if row.inputs and row.kept is not None else ""
        size = f"{row.bytes / 1e6:.2f}" if row.bytes is not None else ""
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(row.drop_reasons.items(), key=lambda kv: -kv[1]))
        cells = (html.escape(row.name), html.escape(row.status), _blank(row.inputs), _blank(row.kept), ratio,
                 _blank(row.spans), size, f"<code>{html.escape((row.sha256 or '')[:12])}</code>", html.escape(reasons))  # fmt: skip
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "<table>" + "".join(lines) + "</table>"


def _blank(value: int | None) -> str:
    return "" if value is None else str(value)


def drop_chart_svg(counts: Counter[str], nothing: str = "Nothing was dropped.", bar_width: int = 360) -> str:
    """A horizontal bar chart of drop reasons as inline SVG (no scripts, no network)."""
    if not counts:
        return f"<p>{html.escape(nothing)}</p>"
    items = counts.most_common()
    top = items[0][1]
    row_height, label_width = 22, 220
    height = row_height * len(items) + 8
    bars = []
    for index, (reason, count) in enumerate(items):
        y = 4 + index * row_height
        length = max(2.0, bar_width * count / top)
        colour = PALETTE[index % len(PALETTE)]
        bars.append(
            f'<text x="{label_width - 6}" y="{y + 15}" font-size="13" text-anchor="end">{html.escape(reason)}</text>'
            f'<rect x="{label_width}" y="{y + 2}" width="{length:.1f}" height="{row_height - 6}" fill="{colour}"/>'
            f'<text x="{label_width + length + 6:.1f}" y="{y + 15}" font-size="13">{count}</text>'
        )
    width = label_width + bar_width + 80
    return (
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" '
        f'role="img" aria-label="drop reasons">{"".join(bars)}</svg>'
    )


def find_sample(out_dir: Folder | str | Path, key: str) -> ShownSample:
    """The sample with this key, or GalleryError; the shard the key names is searched first, then every shard."""
    out = as_folder(out_dir)
    manifest = read_manifest(out)
    config = audit_options(manifest).serialize
    likely = _shard_of_key(key, manifest)
    for path in sorted(_shard_paths(out, manifest), key=lambda p: p.name != likely):
        with path.open() as handle:
            for member_key, files in iter_tar_samples(handle, name=path.name):
                sample = _shown_sample(path.name, key, files, config) if member_key == key else None
                if sample is not None:
                    return sample
    raise GalleryError(f"no readable sample with key {key!r} in {out.url}")


def _shard_of_key(key: str, manifest: Mapping[str, Any]) -> str | None:
    """The tar a key was written to under the build's numbering (shard * 10**key_digits + position)."""
    from grit_pipeline.shards import shard_name

    digits = (manifest.get("config") or {}).get("key_digits")
    if not key.isdigit() or not isinstance(digits, int):
        return None
    return f"{shard_name(int(key) // 10**digits)}.tar"
