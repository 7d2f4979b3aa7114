"""What every runner is given: the stage list, the pending shards, the shard writer, the sink and the progress
counter.

A runner decides only WHERE the stages run (in this process, on Ray actors); what runs is the stage list
(`grit_pipeline.stages.stage_list`). The process that finishes a shard writes it with the `ShardWriter` and
reports a small `ShardOutcome` (stats or error) to the driver's `ShardSink`.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from grit_pipeline.shards import write_shard, writer_identity
from grit_pipeline.storage import Folder
from grit_pipeline.work import ShardHeader, WorkItem, grounders_used, to_output

if TYPE_CHECKING:
    from grit_pipeline.config import BuildConfig
    from grit_pipeline.inputs import InputShard
    from grit_pipeline.stages.base import Stage


class Runner(Protocol):
    """Runs `stages` over the pending shards and hands each finished shard to `sink`."""

    def __call__(self, config: BuildConfig, stages: Sequence[Stage], shards: Sequence[tuple[int, InputShard]],
                 writer: ShardWriter, sink: ShardSink) -> None:
        """Process every shard; a shard that fails is recorded in the sink, never raised."""


@dataclass(slots=True)
class Progress:
    """Counts for the periodic one-line summary and the final table (printed to `stream`)."""

    total_shards: int
    interval: float = 10.0
    stream: TextIO = sys.stderr
    samples: int = 0
    kept: int = 0
    shards_done: int = 0
    shards_failed: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    last_print: float = field(default_factory=time.monotonic)
    first_batch: tuple[float, int] | None = None

    def add(self, items: Sequence[WorkItem]) -> None:
        """Count a processed batch; print the summary line when the interval has passed."""
        drops = Counter(getattr(item.drop_reason, "value", "unknown") for item in items if not item.alive)
        self._count(len(items), sum(1 for item in items if item.alive), drops)

    def add_stats(self, stats: dict[str, Any]) -> None:
        """Count a shard from its stats (what a Ray worker that wrote the shard sends back)."""
        self.add_counts(stats["count"], stats["kept"], stats["drop_reasons"])

    def add_counts(self, samples: int, kept: int, drops: dict[str, int]) -> None:
        """Count processed samples given as totals (a part of a shard on the Ray Data pipeline)."""
        self._count(samples, kept, Counter(drops))

    def _count(self, samples: int, kept: int, drops: Counter[str]) -> None:
        if self.first_batch is None:
            self.first_batch = (time.monotonic(), samples)
        self.samples += samples
        self.kept += kept
        self.drops.update(drops)
        if time.monotonic() - self.last_print >= self.interval:
            self.print_line()

    def print_line(self) -> None:
        """samples/s, kept ratio, shards and the top drop reasons, on one line."""
        self.last_print = time.monotonic()
        elapsed = max(self.last_print - self.started, 1e-9)
        top = ", ".join(f"{k} {v / max(self.samples, 1):.0%}" for k, v in self.drops.most_common(3)) or "none"
        print(f"[grit build] {self.samples} samples {self.samples / elapsed:.1f}/s kept {self.kept_ratio():.1%} "
              f"shards {self.shards_done}/{self.total_shards} failed {self.shards_failed} | drops: {top}",
              file=self.stream, flush=True)

    def steady_rate(self) -> float | None:
        """Samples/s from the first finished batch on: throughput without start-up (workers, model loads)."""
        if self.first_batch is None:
            return None
        seconds = time.monotonic() - self.first_batch[0]
        return (self.samples - self.first_batch[1]) / seconds if seconds > 0 else None

    def kept_ratio(self) -> float:
        """Kept samples over processed samples."""
        return self.kept / self.samples if self.samples else 0.0


@dataclass(frozen=True, slots=True)
class ShardOutcome:
    """What the process that wrote (or failed) a shard reports to the driver: small, no sample data.

    `stats` is the written shard's stats (counts, files with their digests, `written_by`, `seconds`);
    `error` says why the shard failed; `grounders` describes the grounders that grounded its samples.
    """

    shard_index: int
    stats: dict[str, Any] | None = None
    error: str | None = None
    grounders: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ShardWriter:
    """Writes finished shards into OUT/shards, in whatever process finished them (a Ray worker writes its
    own shards: no image byte goes through the driver)."""

    folder: Folder

    def write(self, header: ShardHeader, items: Sequence[WorkItem], started: float) -> ShardOutcome:
        """Write output shard `header.shard_index` from its processed items (any order; `started`: time.time()
        when its reading began); a shard that cannot be written fails alone: its outcome carries the error."""
        if header.failure is not None:
            return ShardOutcome(header.shard_index, error=header.failure)
        try:
            if len(items) != header.count:
                raise RuntimeError(f"{len(items)} of {header.count} samples came back")
            ordered = sorted(items, key=lambda item: item.position)
            outputs = [to_output(item) for item in ordered]
            stats = write_shard(self.folder, header.shard_index, outputs, header.source, header.errors,
                                written_by=writer_identity(), started=started)
        except Exception as exc:  # a shard that cannot be written fails alone
            return ShardOutcome(header.shard_index, error=f"write failed: {type(exc).__name__}: {exc}")
        return ShardOutcome(header.shard_index, stats=stats, grounders=grounders_used(ordered))


class ShardSink:
    """The driver's record of a run: each shard's outcome (stats or error) and the grounders used."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.failures: dict[int, str] = {}
        self.written: dict[int, dict[str, Any]] = {}
        self.models: dict[str, Any] = {}

    def record(self, outcome: ShardOutcome) -> None:
        """Note a shard's outcome: its stats when it was written, its error when it failed."""
        if outcome.stats is None:
            self.fail(outcome.shard_index, outcome.error or "not written")
            return
        for kind, description in outcome.grounders.items():  # by kind: GRIT-20M rows go through the annotations
            self.models.setdefault(kind, description)
        self.written[outcome.shard_index] = outcome.stats
        self.failures.pop(outcome.shard_index, None)
        self.progress.shards_done += 1

    def fail(self, index: int, error: str) -> None:
        """Record shard `index` as failed."""
        self.failures[index] = error
        self.progress.shards_failed += 1
