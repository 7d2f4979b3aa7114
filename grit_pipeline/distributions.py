"""The score distributions of a shard and of a build: CLIP similarity, box score, boxes per sample.

Each distribution is kept as a fixed-bin histogram (CLIP similarity and box score: bins 0.01 wide; boxes
per sample: one bin per count) plus count, min, max and sum. Histograms, counts, minima, maxima and sums
merge exactly, so a build's totals are the merge of its shards' and equal what one shard holding every
sample would give. Quantiles are read from the histogram (nearest rank): the lower edge of the bin holding
the q-th value, exact for boxes per sample, within 0.01 below the true value for the scores.
See docs/output-format.md ("Distributions").
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

SCORE_BIN = 0.01
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
CLIP_COLUMNS = ("clip_similarity_vitb32", "clip_similarity_vitl14")


def _bin_digits(width: float) -> int:
    return max(0, -math.floor(math.log10(width) + 1e-9))


def _bin_index(value: float, width: float) -> int:
    return math.floor(value / width + 1e-9)


def _bin_key(index: int, width: float) -> str:
    return f"{index * width:.{_bin_digits(width)}f}"


def distribution(values: Iterable[float], width: float) -> dict[str, Any] | None:
    """The distribution of `values` (non-finite ones skipped) in bins `width` wide; None when empty."""
    kept = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not kept:
        return None
    counts = Counter(_bin_index(v, width) for v in kept)
    return _with_quantiles({
        "count": len(kept),
        "min": min(kept),
        "max": max(kept),
        "sum": round(math.fsum(kept), 9),
        "bin_width": width,
        "histogram": {_bin_key(i, width): counts[i] for i in sorted(counts)},
    })


def _with_quantiles(dist: dict[str, Any]) -> dict[str, Any]:
    width = dist["bin_width"]
    bins = sorted((round(float(k) / width), n) for k, n in dist["histogram"].items())
    count = dist["count"]
    quantiles = {}
    for q in QUANTILES:
        rank, seen = max(1, math.ceil(q * count)), 0
        for index, n in bins:
            seen += n
            if seen >= rank:
                quantiles[f"p{round(q * 100):02d}"] = round(index * width, _bin_digits(width))
                break
    dist["mean"] = round(dist["sum"] / count, 6)
    dist["quantiles"] = quantiles
    return dist


def merge_distributions(parts: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """The exact merge of distributions of the same bin width (None ones skipped); None when all are."""
    present = [p for p in parts if p]
    if not present:
        return None
    widths = {p["bin_width"] for p in present}
    if len(widths) != 1:
        raise ValueError(f"cannot merge distributions of bin widths {sorted(widths)}")
    width = widths.pop()
    counts: Counter[int] = Counter()
    for part in present:
        for key, n in part["histogram"].items():
            counts[round(float(key) / width)] += int(n)
    return _with_quantiles({
        "count": sum(p["count"] for p in present),
        "min": min(p["min"] for p in present),
        "max": max(p["max"] for p in present),
        "sum": round(math.fsum(p["sum"] for p in present), 9),
        "bin_width": width,
        "histogram": {_bin_key(i, width): counts[i] for i in sorted(counts)},
    })


def row_distributions(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The distributions over kept samples' GRIT-20M rows: each CLIP column that has a value, the box scores
    (one per noun_chunks entry) and the boxes per sample (noun_chunks entries)."""
    rows = list(rows)
    out: dict[str, Any] = {}
    for column in CLIP_COLUMNS:
        dist = distribution((r.get(column) for r in rows), SCORE_BIN)
        if dist is not None:
            out[column] = dist
    scores = (float(e[6]) for r in rows for e in (r.get("noun_chunks") or []) if len(e) > 6)
    for name, dist in (("box_score", distribution(scores, SCORE_BIN)),
                       ("boxes_per_sample", distribution((len(r.get("noun_chunks") or []) for r in rows), 1))):
        if dist is not None:
            out[name] = dist
    return out


def merge_all(parts: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
    """Every named distribution merged over `parts` (shards' `distributions`)."""
    names = sorted({name for part in parts if part for name in part})
    merged = {name: merge_distributions([(part or {}).get(name) for part in parts]) for name in names}
    return {name: dist for name, dist in merged.items() if dist is not None}
