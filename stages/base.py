"""What a stage is: a small class over a batch of WorkItems that declares the resources it runs on.

Every stage has a `name`, `resources` (CPUs and GPUs per worker, and how many workers it wants: the Ray
runner forms its pools from these, never from names), `setup()` (load what every batch needs, once per
worker; a model that cannot load raises StageSetupError) and `__call__(items)`, which fills in or drops
the live items of a batch and never raises for one bad sample. `run_stage` runs a stage on a batch and,
when the batch raises anyway, retries sample by sample so that only the culprit is dropped.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from grit_pipeline.records import DropReason

if TYPE_CHECKING:
    from grit_pipeline.work import WorkItem


CHEAP_CPUS = 0.1
"""The CPU share of a stage that does little per sample and loads no model (assembly, serialisation)."""


class StageSetupError(RuntimeError):
    """A stage cannot start (its model is missing or fails to load): fatal for the run, never a sample's fault."""


@dataclass(frozen=True, slots=True)
class Resources:
    """What one worker of a stage needs: CPUs, GPUs, and a fixed number of workers (None: one per CPU)."""

    cpus: float = 1.0
    gpus: float = 0.0
    workers: int | None = None


class Stage(Protocol):
    """One step of the build over batches of WorkItems."""

    name: str
    resources: Resources

    def setup(self) -> None:
        """Load what every batch needs, once per worker (StageSetupError when it cannot)."""

    def __call__(self, items: list[WorkItem]) -> list[WorkItem]:
        """Fill in or drop the live items of one batch; return the batch."""


def run_stage(stage: Stage, items: list[WorkItem]) -> list[WorkItem]:
    """Run a stage on a batch; when the batch raises, retry item by item so only the bad sample is dropped.

    A StageSetupError (a model that cannot load) is not a sample's fault and propagates.
    """
    try:
        return stage(items)
    except StageSetupError:
        raise
    except Exception:  # a bug or a poisoned sample: isolate it rather than failing the shard
        # Stages are idempotent on an item (they recompute, skip dropped items and replace their drop
        # counts), so re-running the items the failed batch call already touched is safe.
        return [_run_one(stage, item) for item in items]


def _run_one(stage: Stage, item: WorkItem) -> WorkItem:
    try:
        return stage([item])[0]
    except StageSetupError:
        raise
    except Exception as exc:  # the sample itself is bad: drop it with the stage's error
        item.drop(DropReason.STAGE_ERROR, f"{stage.name}: {type(exc).__name__}: {exc}")
        item.error_message = f"{item.error_message} | {_last_frame()}"
        return item


def _last_frame() -> str:
    frames = traceback.extract_tb(sys.exc_info()[2])
    return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else ""


def cuda_available() -> bool:
    """True when torch is importable and sees a CUDA device (stages then declare GPUs by default)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
