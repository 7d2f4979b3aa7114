"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any


def best_seconds(run: Callable[[], Any], repeats: int) -> float:
    """Wall seconds of the fastest of `repeats` calls of `run`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def pin_to_one_core() -> int | None:
    """Pin this process to one CPU (Linux), so figures are per core; returns the core or None."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core
