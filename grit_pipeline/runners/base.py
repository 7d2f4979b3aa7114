"""What every runner is given: the stage list, the pending shards, the shard sink and the progress counter.

A runner decides only WHERE the stages run (in this process, on Ray actors); what runs is the stage list
(`grit_pipeline.stages.stage_list`), and every finished shard goes to the `ShardSink`, which writes it.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from grit_pipeline.records import DropReason
from grit_pipeline.shards import SHARDS_DIR, OutputSample, write_shard
from grit_pipeline.work import ShardHeader, WorkItem, grounders_used, to_output

if TYPE_CHECKING:
    from grit_pipeline.config import BuildConfig
    from grit_pipeline.inputs import InputShard
    from grit_pipeline.stages.base import Stage


class Runner(Protocol):
    """Runs `stages` over the pending shards and hands each finished shard to `sink`."""

    def __call__(self, config: BuildConfig, stages: Sequence[Stage], shards: Sequence[tuple[int, InputShard]],
                 sink: ShardSink, progress: Progress) -> None:
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
        self._count([(item.alive, item.drop_reason) for item in items])

    def add_outputs(self, samples: Sequence[OutputSample]) -> None:
        """Count finished samples given as the shard writer's OutputSamples (what Ray workers send back)."""
        self._count([(sample.kept, sample.drop_reason) for sample in samples])

    def _count(self, outcomes: Sequence[tuple[bool, DropReason | None]]) -> None:
        if self.first_batch is None:
            self.first_batch = (time.monotonic(), len(outcomes))
        for kept, reason in outcomes:
            self.samples += 1
            if kept:
                self.kept += 1
            else:
                self.drops[getattr(reason, "value", "unknown")] += 1
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


class ShardSink:
    """Receives each shard's header and processed items from a runner and writes the output shard."""

    def __init__(self, config: BuildConfig, progress: Progress) -> None:
        self.folder = Path(config.out_dir) / SHARDS_DIR
        self.progress = progress
        self.failures: dict[int, str] = {}
        self.started: dict[int, float] = {}
        self.seconds: dict[int, float] = {}
        self.models: dict[str, Any] = {}

    def begin(self, index: int) -> None:
        """Note that work on shard `index` has started (for its timing in the manifest)."""
        self.started.setdefault(index, time.monotonic())

    def write(self, header: ShardHeader, items: Sequence[WorkItem]) -> None:
        """Write output shard `header.shard_index` from its items (any order); failures are recorded, not raised."""
        if header.failure is not None:
            self.fail(header.shard_index, header.failure)
            return
        try:
            ordered = sorted(items, key=lambda item: item.position)
            outputs = [to_output(item) for item in ordered]
        except Exception as exc:  # a shard that cannot be written fails alone
            self.fail(header.shard_index, f"write failed: {type(exc).__name__}: {exc}")
            return
        self.write_outputs(header, outputs, grounders_used(ordered))

    def write_outputs(self, header: ShardHeader, outputs: Sequence[OutputSample],
                      grounders: dict[str, dict[str, Any]]) -> None:
        """Write output shard `header.shard_index` from its finished samples in position order and the descriptions
        of the grounders that grounded them; failures are recorded, not raised."""
        if header.failure is not None:
            self.fail(header.shard_index, header.failure)
            return
        try:
            if len(outputs) != header.count:
                raise RuntimeError(f"{len(outputs)} of {header.count} samples came back")
            for kind, description in grounders.items():  # by kind: GRIT-20M rows go through the annotation grounder
                self.models.setdefault(kind, description)
            write_shard(self.folder, header.shard_index, outputs, header.source, header.errors)
            if header.shard_index in self.started:
                self.seconds[header.shard_index] = round(time.monotonic() - self.started[header.shard_index], 3)
            self.progress.shards_done += 1
        except Exception as exc:  # a shard that cannot be written fails alone
            self.fail(header.shard_index, f"write failed: {type(exc).__name__}: {exc}")

    def fail(self, index: int, error: str) -> None:
        """Record shard `index` as failed."""
        self.failures[index] = error
        self.progress.shards_failed += 1
