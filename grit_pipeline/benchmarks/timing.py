"""Timing helpers shared by the benchmarks (and `grit bench loader`): the one best-of-N timer."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(slots=True)
class Best:
    """The best of a run's timed calls: shortest wall and CPU seconds (this process, all threads), top rate."""

    wall_s: float = math.inf
    cpu_s: float = math.inf
    rate: float = 0.0


def best_of(runs: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, Best]:
    """Per name, the best of `repeats` timed calls; each call returns how much work it did (items, megabytes)
    and its rate is that over its wall seconds. The runs take turns, so a load that drifts on a shared
    machine hits all of them alike: the one best-of-N timer of every benchmark."""
    best = {name: Best() for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            work = run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            found = best[name]
            found.wall_s, found.cpu_s = min(found.wall_s, wall), min(found.cpu_s, cpu)
            found.rate = max(found.rate, work / wall)
    return best


def best_rates(runs: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Per name, the best rate of `best_of`."""
    return {name: found.rate for name, found in best_of(runs, repeats).items()}


def pin_to_one_core() -> int | None:
    """Pin this process to one CPU (Linux), so figures are per core; returns the core or None."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core
