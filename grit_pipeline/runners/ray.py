"""The Ray runner: the stage list it is given, in Ray workers that read their shards and write them.

`ray.init()` starts an embedded local cluster unless `--ray-address` (or RAY_ADDRESS) names one to attach
to. The pools come from the stages' declared resources, never from their names (`stage_pools`): consecutive
stages that declare the same resources share a pool. When no stage asks for a GPU, every stage (reading
and writing included) runs in one pool of plain Ray actors, one per core, each taking whole shards
(`run_actor_pool`). Otherwise a Ray Data pipeline chains the pools over pipeline batches (`run_dataset`):
the first reads its shards itself, a pool with a fixed number of workers (the grounder) gets exactly that
many actors, the rest run as tasks, and one `ShardAssembler` per node writes each shard when its last batch
arrives. Either way models load once per worker and the shards are written to OUT (local or object storage)
by the workers: the driver plans shards, schedules them and collects each shard's stats for the manifest,
and no image byte passes through it. A dead worker is restarted and its work retried; the shards of a
lost actor pool worker go to the others; a shard that still fails is recorded as failed and the rest of the
run's output stands.
"""

from __future__ import annotations

import os
import pickle
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from grit_pipeline.config import BuildConfig
from grit_pipeline.inputs import InputShard
from grit_pipeline.runners.base import ShardOutcome, ShardWriter
from grit_pipeline.stages.base import Resources, Stage, StageSetupError, run_stage
from grit_pipeline.work import ShardHeader, WorkItem, read_shard, shard_batches

if TYPE_CHECKING:
    from grit_pipeline.runners.base import ShardSink

_FEEDER_CPU_MARGIN = 0.1  # CPU share left free per pool that follows the first, for its tasks


@dataclass(frozen=True, slots=True)
class StagePool:
    """Consecutive stages that declare the same resources, run by the same workers."""

    indices: tuple[int, ...]
    resources: Resources


def stage_pools(stages: Sequence[Stage]) -> list[StagePool]:
    """The stage list cut where the declared resources change."""
    pools: list[StagePool] = []
    for index, stage in enumerate(stages):
        if pools and pools[-1].resources == stage.resources:
            pools[-1] = StagePool((*pools[-1].indices, index), stage.resources)
        else:
            pools.append(StagePool((index,), stage.resources))
    return pools


# The object-store settings a driver has in its environment; the workers of a cluster it attaches to get the
# same (Ray's runtime_env), so `AWS_ENDPOINT_URL=... grit build s3://...` means the same on every node. Nodes
# with their own credentials (an instance role) need none of them.
FORWARDED_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                         "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                         "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_REQUEST_CHECKSUM_CALCULATION",
                         "AWS_RESPONSE_CHECKSUM_VALIDATION", "NO_PROXY", "no_proxy")


def init_ray(address: str | None) -> None:
    """Attach to `address` (or RAY_ADDRESS), passing the driver's object-store variables to the workers;
    else start an embedded local cluster (its workers inherit this environment). Quiet either way."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:  # attach with the cluster's own settings (Ray Client "ray://" included)
        forwarded = {name: os.environ[name] for name in FORWARDED_ENVIRONMENT if name in os.environ}
        ray.init(address=address, runtime_env={"env_vars": forwarded} if forwarded else None)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)


@dataclass(frozen=True, slots=True)
class ShardTask:
    """`input_shard` to be read, as output shard `shard_index`, by the first stage pool."""

    shard_index: int
    input_shard: InputShard


@dataclass(slots=True)
class ShardPart:
    """One pipeline batch of a shard on its way through the Ray Data pipeline; the header rides along."""

    header: ShardHeader
    items: list[WorkItem]
    started: float  # time.time() when reading the shard began, for the shard's seconds in the manifest


@dataclass(frozen=True, slots=True)
class PartDone:
    """What reaches the driver for one part of a shard: its counts, for the progress line."""

    shard_index: int
    samples: int
    kept: int
    drops: dict[str, int]


def part_done(part: ShardPart) -> PartDone:
    """The counts of a processed part."""
    drops: dict[str, int] = {}
    for item in part.items:
        if not item.alive:
            reason = getattr(item.drop_reason, "value", "unknown")
            drops[reason] = drops.get(reason, 0) + 1
    return PartDone(part.header.shard_index, len(part.items), sum(1 for i in part.items if i.alive), drops)


LOST_WRITER = "the shard's writer was lost with its node"  # an outcome's error that a fresh pipeline retries


class ShardAssembler:
    """Collects the parts of the shards given to it and writes each shard when its last part arrives (the
    Ray Data layout's writer: one per node, so shards are written on every node and none by the driver).

    Holds only the shards in flight; a shard whose part failed upstream is discarded.
    """

    def __init__(self, writer: ShardWriter) -> None:
        self.writer = writer
        self.pending: dict[int, tuple[ShardHeader, float, list[WorkItem]]] = {}
        self.discarded: set[int] = set()

    def add(self, part: ShardPart) -> ShardOutcome | None:
        """Keep a processed part; the shard's outcome once it is written, else None."""
        index = part.header.shard_index
        if index in self.discarded:
            return None
        header, started, items = self.pending.setdefault(index, (part.header, part.started, []))
        items.extend(part.items)
        if len(items) < header.count:
            return None
        del self.pending[index]
        return self.writer.write(header, items, started)

    def discard(self, shard_index: int) -> None:
        """Forget a shard that failed upstream (its other parts are dropped as they arrive)."""
        self.pending.pop(shard_index, None)
        self.discarded.add(shard_index)


class StageWorker:
    """Runs some stages of the list: a plain Ray actor over whole shards (`process_shard`, which also writes
    them), or a Ray Data callable class over shard parts (`__call__`; the last pool hands its parts to the
    shard's `ShardAssembler`). What goes back to the driver is a `ShardOutcome` or a part's counts, never
    samples.

    A shard is cut into the batches every runner makes (`shard_batches`), so a stage whose output depends on
    its batch-mates (a detector's padding) computes what the local runner computes.
    """

    def __init__(self, stages: Sequence[Stage], indices: Sequence[int], key_digits: int, stage_batch_size: int,
                 writer: ShardWriter | None = None, assemblers: Sequence[Any] = (), assembles: bool = False) -> None:
        self.key_digits = key_digits
        self.stage_batch_size = stage_batch_size
        self.writer = writer
        self.assemblers = list(assemblers)
        self.assembles = assembles
        self.stages = [stages[index] for index in indices]
        for stage in self.stages:
            stage.setup()

    def __call__(self, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Ray Data: each input row's output rows, yielded one by one so a shard streams part by part."""
        for value in batch["item"]:
            for row in self.parts(pickle.loads(value)):
                yield _rows([row])

    def process_shard(self, task: ShardTask) -> ShardOutcome:
        """A whole shard read, processed and written (the actor pool's method)."""
        assert self.writer is not None, "the actor pool's workers write their shards"
        started = time.time()
        header, items = read_shard(task.shard_index, task.input_shard, self.key_digits)
        if header.failure is not None:
            return ShardOutcome(header.shard_index, error=header.failure)
        try:
            for batch in shard_batches(items, self.stage_batch_size):
                self.run(batch)
        except StageSetupError:
            raise
        except Exception as exc:  # the shard fails alone; the run goes on
            return ShardOutcome(header.shard_index, error=f"{type(exc).__name__}: {exc}")
        return self.writer.write(header, items, started)

    def parts(self, row: ShardTask | ShardPart | ShardOutcome | PartDone
              ) -> Iterator[ShardPart | ShardOutcome | PartDone]:
        """Read a shard task into parts, or run this worker's stages on a part; outcomes and counts pass."""
        if isinstance(row, (ShardOutcome, PartDone)):
            yield row
            return
        if isinstance(row, ShardPart):
            yield from self._process(row)
            return
        started = time.time()
        header, items = read_shard(row.shard_index, row.input_shard, self.key_digits)
        if header.failure is not None:
            yield ShardOutcome(header.shard_index, error=header.failure)
            return
        for batch in shard_batches(items, self.stage_batch_size) or [[]]:  # an empty shard is one empty part
            yield from self._process(ShardPart(header, batch, started))

    def _process(self, part: ShardPart) -> Iterator[ShardPart | ShardOutcome | PartDone]:
        import ray

        index = part.header.shard_index
        try:
            self.run(part.items)
        except StageSetupError:
            raise
        except Exception as exc:  # the shard fails alone; its other parts are dropped by its assembler
            if self.assemblers:
                ray.get(self._assembler(index).discard.remote(index))
            yield ShardOutcome(index, error=f"{type(exc).__name__}: {exc}")
            return
        if not self.assembles:
            yield part
            return
        yield part_done(part)
        try:
            outcome = ray.get(self._assembler(index).add.remote(part))
        except ray.exceptions.RayActorError as exc:  # its node was lost: the shard fails alone, a rerun redoes it
            outcome = ShardOutcome(index, error=f"{LOST_WRITER}: {error_message(exc)}")
        if outcome is not None:
            yield outcome

    def _assembler(self, shard_index: int) -> Any:
        return self.assemblers[shard_index % len(self.assemblers)]

    def run(self, items: list[WorkItem]) -> list[WorkItem]:
        """The worker's stages, in order, on one pipeline batch."""
        for stage in self.stages:
            run_stage(stage, items)
        return items


def _rows(rows: Sequence[Any]) -> dict[str, Any]:
    import numpy as np

    column = np.empty(len(rows), dtype=object)  # filled one by one: numpy must not unpack the bytes
    for position, row in enumerate(rows):
        column[position] = pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL)
    return {"item": column}


def run_stages_task(batch: dict[str, Any], stages: Sequence[Stage], indices: Sequence[int], key_digits: int,
                    stage_batch_size: int, assemblers: Sequence[Any], assembles: bool) -> Iterator[dict[str, Any]]:
    """Ray map_batches task for a pool of stages that loads no model and keeps no state between batches."""
    yield from StageWorker(stages, indices, key_digits, stage_batch_size, None, assemblers, assembles)(batch)


def start_assemblers(writer: ShardWriter) -> list[Any]:
    """One ShardAssembler per node that has CPUs (pinned to it), so every node writes shards."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0]
    assembler_class = ray.remote(ShardAssembler)
    # hard affinity: with soft affinity Ray 2.60 placed every zero-CPU assembler on one node
    pinned = [NodeAffinitySchedulingStrategy(node, soft=False) for node in sorted(nodes)]
    return [assembler_class.options(num_cpus=0, scheduling_strategy=strategy).remote(writer) for strategy in pinned] \
        or [assembler_class.options(num_cpus=0).remote(writer)]


def build_dataset(config: BuildConfig, stages: Sequence[Stage], shards: Sequence[tuple[int, InputShard]],
                  assemblers: Sequence[Any]) -> Any:
    """The Ray Data pipeline over the pending shards: one operator per stage pool, one row per shard part
    (a pipeline batch).

    The first pool reads each shard itself, in actors sized to the cluster's CPUs; a pool that declares a
    number of workers (the grounder: `--grounder-workers`, each with `--gpus-per-grounder`) gets exactly that
    many actors; the others run as tasks. The last pool hands each part to its shard's assembler, which
    writes the shard when its last part arrives, so the rows reaching the driver are counts and outcomes.
    """
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    pools = stage_pools(stages)
    tasks = [{"item": pickle.dumps(ShardTask(index, shard))} for index, shard in shards]
    ds = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
    common: dict[str, Any] = {"batch_size": 1, "batch_format": "numpy"}  # one row = one shard task or part
    for number, pool in enumerate(pools):
        resources = pool.resources
        args = (stages, pool.indices, config.key_digits, config.stage_batch_size)
        last = {"assemblers": assemblers, "assembles": number == len(pools) - 1}
        if number == 0:  # leave room for the other pools' tasks
            actor_cpus = max(_FEEDER_CPU_MARGIN, (cpus - (len(pools) - 1) * _FEEDER_CPU_MARGIN) / cpus)
            ds = ds.map_batches(StageWorker, fn_constructor_args=(*args, None), fn_constructor_kwargs=last,
                                num_cpus=min(resources.cpus, actor_cpus), num_gpus=resources.gpus,
                                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cpus, initial_size=cpus),
                                max_restarts=_ACTOR_RESTARTS, max_task_retries=_ACTOR_RESTARTS, **common)
        elif resources.workers is not None:
            ds = ds.map_batches(StageWorker, fn_constructor_args=(*args, None), fn_constructor_kwargs=last,
                                compute=ray.data.ActorPoolStrategy(size=resources.workers),
                                num_gpus=resources.gpus, num_cpus=resources.cpus,
                                max_restarts=_ACTOR_RESTARTS, max_task_retries=_ACTOR_RESTARTS, **common)
        else:
            ds = ds.map_batches(run_stages_task, fn_args=(*args, assemblers, number == len(pools) - 1),
                                num_cpus=resources.cpus, num_gpus=resources.gpus, max_retries=_ACTOR_RESTARTS,
                                **common)
    return ds


def iter_rows(ds: Any) -> Iterator[ShardOutcome | PartDone]:
    """Every row the pipeline sends back (a part's counts or a shard's outcome), as they arrive."""
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for value in batch["item"]:
            yield pickle.loads(value)


def error_message(exc: BaseException) -> str:
    """The root cause of a Ray failure in one line (a StageSetupError's own message when there is one)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StageSetupError):
            return str(current)
        current = getattr(current, "cause", None) or current.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:  # Ray wraps user errors and keeps only their traceback text
        if "StageSetupError: " in line:
            return line.split("StageSetupError: ", 1)[1]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return f"ray: {type(exc).__name__}: {(errors or lines or [''])[-1]}"[:500]


def run_ray(config: BuildConfig, stages: Sequence[Stage], shards: Sequence[tuple[int, InputShard]],
            writer: ShardWriter, sink: ShardSink) -> None:
    """Run the pending shards on Ray; each shard is written by the worker that finishes it.

    `ray_engine="data"` (and "auto" when a stage declares GPUs): the stage pools form a Ray Data pipeline
    (`run_dataset`); `"actors"` (and "auto" otherwise): every stage runs in one pool of plain Ray actors,
    one per core (`run_actor_pool`).
    """
    init_ray(config.ray_address)
    wants_gpus = any(stage.resources.gpus for stage in stages)
    if config.ray_engine == "data" or (config.ray_engine == "auto" and wants_gpus):
        run_dataset(config, stages, shards, writer, sink)
    else:
        run_actor_pool(config, stages, shards, writer, sink)


# Restarts of a dead actor and retries of its task: a shard whose worker keeps dying fails alone.
_ACTOR_RESTARTS = 3
_TASKS_IN_FLIGHT_PER_ACTOR = 2  # the next shard waits in the actor while it writes one


def run_actor_pool(config: BuildConfig, stages: Sequence[Stage], shards: Sequence[tuple[int, InputShard]],
                   writer: ShardWriter, sink: ShardSink) -> None:
    """All stages in one pool of CPU actors, one per core, each reading, processing and writing whole shards.

    Plain actors rather than a Ray Data pipeline: a single fused operator gains nothing from Ray Data's
    streaming executor, which costs seconds per build to start (its stats actor, executor and
    operator start-up; measured by `grit bench pipeline`). The actors are created first thing, so their
    processes import and set up while the driver submits. Ray restarts an actor whose process dies and
    retries its task (`_ACTOR_RESTARTS` times); when the actor itself is lost (its node gone), its shards go
    back to the queue for the actors that still answer (`_SHARD_ATTEMPTS` in all). A shard that still fails
    is recorded and the others go on. What comes back is a shard's outcome: its stats, never its samples.
    """
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    worker_class = ray.remote(StageWorker).options(num_cpus=1, max_restarts=_ACTOR_RESTARTS,
                                                   max_task_retries=_ACTOR_RESTARTS, scheduling_strategy="SPREAD")
    every_stage = tuple(range(len(stages)))
    actors = [worker_class.remote(stages, every_stage, config.key_digits, config.stage_batch_size, writer)
              for _ in range(min(cpus, len(shards)))]
    queue = [ShardTask(index, shard) for index, shard in reversed(shards)]  # popped from the end: in order
    in_flight: dict[Any, tuple[Any, ShardTask]] = {}
    attempts: dict[int, int] = {}

    def submit(actor: Any) -> None:
        if queue:
            task = queue.pop()
            attempts[task.shard_index] = attempts.get(task.shard_index, 0) + 1
            in_flight[actor.process_shard.remote(task)] = (actor, task)

    for _ in range(_TASKS_IN_FLIGHT_PER_ACTOR):
        for actor in actors:
            submit(actor)
    while in_flight:
        (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        actor, task = in_flight.pop(ref)
        try:
            outcome: ShardOutcome = ray.get(ref)
        except Exception as exc:  # a lost worker or node, retries exhausted, or a stage that cannot start
            message = error_message(exc)
            if _is_setup_error(exc):  # no shard can succeed: record them all and stop
                for failed in [task, *(t for _, t in in_flight.values()), *queue]:
                    sink.fail(failed.shard_index, message)
                return
            if _is_lost_worker(exc) and attempts[task.shard_index] < _SHARD_ATTEMPTS:
                # its actor (or node) is gone or restarting somewhere it may never fit: the shard goes back
                # to the queue for the actors that still answer, and this one gets no more work
                queue.append(task)
                actors = [a for a in actors if a is not actor]
                if not actors:
                    for failed in [*(t for _, t in in_flight.values()), *queue]:
                        sink.fail(failed.shard_index, f"every Ray worker was lost ({message})")
                    return
                for survivor in actors:  # an idle survivor takes the requeued shard at once
                    if not any(a is survivor for a, _ in in_flight.values()):
                        submit(survivor)
                continue
            submit(actor)
            sink.fail(task.shard_index, message)
            continue
        submit(actor)
        _record(outcome, sink)


_SHARD_ATTEMPTS = 3  # a shard whose worker is lost is resubmitted to another worker up to this many times in all


def _is_lost_worker(exc: BaseException) -> bool:
    import ray.exceptions

    return isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError,
                            ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError))


def _record(outcome: ShardOutcome, sink: ShardSink) -> None:
    if outcome.stats is not None:
        sink.progress.add_stats(outcome.stats)
    sink.record(outcome)


def _is_setup_error(exc: BaseException) -> bool:
    return isinstance(exc, StageSetupError) or "StageSetupError: " in str(exc)


def run_dataset(config: BuildConfig, stages: Sequence[Stage], shards: Sequence[tuple[int, InputShard]],
                writer: ShardWriter, sink: ShardSink) -> None:
    """The GPU layout on Ray Data. Shards the pipeline lost (their assembler died with its node, or the
    dataset failed after Ray's retries) go through a fresh pipeline again, with assemblers on the nodes
    still alive, `_SHARD_ATTEMPTS` times in all; what is still lost then is recorded as failed."""
    pending = list(shards)
    for attempt in range(1, _SHARD_ATTEMPTS + 1):
        lost = _run_dataset_once(config, stages, pending, writer, sink)
        if not lost:
            return
        if attempt == _SHARD_ATTEMPTS:
            for index, message in sorted(lost.items()):
                sink.fail(index, message)
            return
        pending = [(index, shard) for index, shard in pending if index in lost]


def _run_dataset_once(config: BuildConfig, stages: Sequence[Stage], shards: Sequence[tuple[int, InputShard]],
                      writer: ShardWriter, sink: ShardSink) -> dict[int, str]:
    """One Ray Data pipeline over `shards`; returns the shards it lost (index -> why), recording the rest."""
    done: set[int] = set()
    lost: dict[int, str] = {}
    try:
        for row in iter_rows(build_dataset(config, stages, shards, start_assemblers(writer))):
            if isinstance(row, PartDone):
                sink.progress.add_counts(row.samples, row.kept, row.drops)
            elif row.error is not None and row.error.startswith(LOST_WRITER):
                lost[row.shard_index] = row.error
            else:
                done.add(row.shard_index)
                sink.record(row)
    except Exception as exc:  # retries exhausted, or a stage that cannot start
        message = error_message(exc)
        if _is_setup_error(exc):  # no shard can succeed: record them all, try nothing again
            for index, _ in shards:
                if index not in done:
                    sink.fail(index, message)
            return {}
        return {index: message for index, _ in shards if index not in done}
    never = "the shard never came back from the Ray pipeline"
    return {index: lost.get(index, never) for index, _ in shards if index not in done}
