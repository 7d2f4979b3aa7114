"""The Ray runner: the stage list it is given, in Ray actors, whole shards read by the workers, written by the
driver.

`ray.init()` starts an embedded local cluster unless `--ray-address` (or RAY_ADDRESS) names one to attach
to. The pools come from the stages' declared resources, never from their names (`stage_pools`): consecutive
stages that declare the same resources share a pool. When no stage asks for a GPU, every stage (reading
included) runs in one pool of plain Ray actors, one per core, each taking whole shards (`run_actor_pool`);
otherwise a Ray Data pipeline chains the pools (`run_dataset`): the first reads its shards itself, a pool
with a fixed number of workers (the grounder) gets exactly that many actors, the rest run as tasks. Either way models load once per
worker, the image bytes travel from the worker that reads them to the driver and nowhere else, and the
driver writes every output shard, so OUT is written by one process. A dead actor is restarted and its
work retried by Ray; a shard that still fails is recorded as failed and the rest of the run's output stands.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from grit_pipeline.config import BuildConfig
from grit_pipeline.inputs import InputShard
from grit_pipeline.shards import OutputSample
from grit_pipeline.stages.base import Resources, Stage, StageSetupError, run_stage
from grit_pipeline.work import ShardHeader, WorkItem, grounders_used, read_shard, shard_batches, to_output

if TYPE_CHECKING:
    from grit_pipeline.runners.base import Progress, ShardSink

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


def init_ray(address: str | None) -> None:
    """Attach to `address` (or RAY_ADDRESS), else start an embedded local cluster; quiet either way."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:  # attach with the cluster's own settings (Ray Client "ray://" included)
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)


@dataclass(frozen=True, slots=True)
class ShardTask:
    """`input_shard` to be read, as output shard `shard_index`, by the first actor pool."""

    shard_index: int
    input_shard: InputShard


@dataclass(frozen=True, slots=True)
class ShardResult:
    """What a pool actor sends back for a shard: its header, its samples in position order, the grounders used."""

    header: ShardHeader
    outputs: list[OutputSample]
    grounders: dict[str, dict[str, Any]]


class StageWorker:
    """Runs some stages of the list: a plain Ray actor (`shard`) or a Ray Data callable class (`__call__`).

    A shard is cut into the batches every runner makes (`shard_batches`), one row each, so a stage whose
    output depends on its batch-mates (a detector's padding) computes what the local runner computes.
    """

    def __init__(self, stages: Sequence[Stage], indices: Sequence[int], key_digits: int, stage_batch_size: int) -> None:
        self.key_digits = key_digits
        self.stage_batch_size = stage_batch_size
        self.stages = [stages[index] for index in indices]
        for stage in self.stages:
            stage.setup()

    def __call__(self, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Each input row's output rows: a read shard's header then its processed batches; headers pass through.

        Yielding row by row lets Ray Data ship a shard's results without holding them all in one batch.
        """
        for value in batch["item"]:
            for row in self.process(pickle.loads(value)):
                yield _rows([row])

    def process(self, row: ShardTask | ShardHeader | list[WorkItem]) -> Iterator[ShardHeader | list[WorkItem]]:
        """Read a shard task, or run the stages on one batch of WorkItems (a header passes through)."""
        if isinstance(row, ShardTask):
            header, items = read_shard(row.shard_index, row.input_shard, self.key_digits)
            yield header
            for items_batch in shard_batches(items, self.stage_batch_size):
                yield self.run(items_batch)
        elif isinstance(row, list):
            yield self.run(row)
        else:
            yield row

    def process_shard(self, task: ShardTask) -> ShardResult:
        """A whole shard, read and processed, as the writer's samples (the CPU actor pool's method).

        The conversion to `OutputSample`s happens here, in parallel, not in the driver: they unpickle an
        order of magnitude faster than WorkItems, and the driver's time is taken from the workers' cores.
        """
        rows = self.process(task)
        header = next(rows)
        items = [item for batch in rows for item in batch]
        return ShardResult(header, [to_output(item) for item in items], grounders_used(items))

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


def run_stages_task(batch: dict[str, Any], stages: Sequence[Stage], indices: Sequence[int]) -> dict[str, Any]:
    """Ray map_batches task for a pool of stages that loads no model and keeps no state between batches."""
    worker = StageWorker(stages, indices, key_digits=0, stage_batch_size=1)  # never reads: rows are batches
    return _rows([out for value in batch["item"] for out in worker.process(pickle.loads(value))])


def build_dataset(config: BuildConfig, stages: Sequence[Stage], shards: Sequence[tuple[int, InputShard]]) -> Any:
    """The Ray Data pipeline over the pending shards: one operator per stage pool.

    The first pool reads each shard itself (the image bytes make one Ray hop fewer than with separate read
    tasks), in actors sized to the cluster's CPUs; a pool that declares a number of workers (the grounder:
    `--grounder-workers`, each with `--gpus-per-grounder`) gets exactly that many actors; the others run as
    tasks.
    """
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    pools = stage_pools(stages)
    tasks = [{"item": pickle.dumps(ShardTask(index, shard))} for index, shard in shards]
    ds = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
    common: dict[str, Any] = {"batch_size": 1, "batch_format": "numpy"}  # one input row = one shard or batch
    for number, pool in enumerate(pools):
        resources = pool.resources
        if number == 0:  # leave room for the other pools' tasks
            actor_cpus = max(_FEEDER_CPU_MARGIN, (cpus - (len(pools) - 1) * _FEEDER_CPU_MARGIN) / cpus)
            ds = ds.map_batches(StageWorker, fn_constructor_args=(stages, pool.indices, config.key_digits,
                                                                  config.stage_batch_size),
                                num_cpus=min(resources.cpus, actor_cpus), num_gpus=resources.gpus,
                                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cpus, initial_size=cpus),
                                **common)
        elif resources.workers is not None:
            ds = ds.map_batches(StageWorker, fn_constructor_args=(stages, pool.indices, config.key_digits,
                                                                  config.stage_batch_size),
                                compute=ray.data.ActorPoolStrategy(size=resources.workers),
                                num_gpus=resources.gpus, num_cpus=resources.cpus, **common)
        else:
            ds = ds.map_batches(run_stages_task, fn_kwargs={"stages": stages, "indices": pool.indices},
                                num_cpus=resources.cpus, num_gpus=resources.gpus, **common)
    return ds


def iter_results(ds: Any) -> Iterator[ShardHeader | list[WorkItem]]:
    """Every row of the dataset (a shard header or a processed batch), as results stream in."""
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
            sink: ShardSink, progress: Progress) -> None:
    """Run the pending shards on Ray; complete shards are written as soon as their last sample arrives.

    `ray_engine="data"` (and "auto" when a stage declares GPUs): the stage pools form a Ray Data pipeline
    (`run_dataset`); `"actors"` (and "auto" otherwise): every stage runs in one pool of plain Ray actors,
    one per core (`run_actor_pool`).
    """
    init_ray(config.ray_address)
    wants_gpus = any(stage.resources.gpus for stage in stages)
    if config.ray_engine == "data" or (config.ray_engine == "auto" and wants_gpus):
        run_dataset(config, stages, shards, sink, progress)
    else:
        run_actor_pool(config, stages, shards, sink, progress)


# Restarts of a dead actor and retries of its task: a shard whose worker keeps dying fails alone.
_ACTOR_RESTARTS = 3
_TASKS_IN_FLIGHT_PER_ACTOR = 2  # the next shard waits in the actor while the driver fetches and writes one


def run_actor_pool(config: BuildConfig, stages: Sequence[Stage], shards: Sequence[tuple[int, InputShard]],
                   sink: ShardSink, progress: Progress) -> None:
    """All stages in one pool of CPU actors, one per core, each reading and processing whole shards.

    Plain actors rather than a Ray Data pipeline: a single fused operator gains nothing from Ray Data's
    streaming executor, which costs seconds per build to start (its stats actor, executor and
    operator start-up; measured by `grit bench pipeline`). The actors are created first thing, so their
    processes import and set up while the driver submits. Ray restarts an actor that dies and retries its
    shard (`_ACTOR_RESTARTS` times); a shard that still fails is recorded and the others go on. A result is
    a whole shard (its header and batches), fetched by the driver and written at once.
    """
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    worker_class = ray.remote(StageWorker).options(num_cpus=1, max_restarts=_ACTOR_RESTARTS,
                                                   max_task_retries=_ACTOR_RESTARTS)
    every_stage = tuple(range(len(stages)))
    actors = [worker_class.remote(stages, every_stage, config.key_digits, config.stage_batch_size)
              for _ in range(min(cpus, len(shards)))]
    queue = [ShardTask(index, shard) for index, shard in reversed(shards)]  # popped from the end: in order
    in_flight: dict[Any, tuple[Any, ShardTask]] = {}

    def submit(actor: Any) -> None:
        if queue:
            task = queue.pop()
            sink.begin(task.shard_index)
            in_flight[actor.process_shard.remote(task)] = (actor, task)

    for _ in range(_TASKS_IN_FLIGHT_PER_ACTOR):
        for actor in actors:
            submit(actor)
    import pyarrow.parquet  # noqa: F401 - the writer's import, done while the workers start rather than after
    while in_flight:
        (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        actor, task = in_flight.pop(ref)
        submit(actor)
        try:
            result: ShardResult = ray.get(ref)
        except Exception as exc:  # retries exhausted, or a stage that cannot start
            message = error_message(exc)
            if _is_setup_error(exc):  # no shard can succeed: record them all and stop
                for failed in [task, *(t for _, t in in_flight.values()), *queue]:
                    sink.fail(failed.shard_index, message)
                return
            sink.fail(task.shard_index, message)
            continue
        progress.add_outputs(result.outputs)
        sink.write_outputs(result.header, result.outputs, result.grounders)


def _is_setup_error(exc: BaseException) -> bool:
    return isinstance(exc, StageSetupError) or "StageSetupError: " in str(exc)


def run_dataset(config: BuildConfig, stages: Sequence[Stage], shards: Sequence[tuple[int, InputShard]],
                sink: ShardSink, progress: Progress) -> None:
    """The GPU layout on Ray Data; if the dataset fails after its retries, every unwritten shard fails."""
    headers: dict[int, ShardHeader] = {}
    buffers: dict[int, list[WorkItem]] = {index: [] for index, _ in shards}
    written: set[int] = set()
    try:
        for row in iter_results(build_dataset(config, stages, shards)):
            if isinstance(row, ShardHeader):
                index = row.shard_index
                headers[index] = row
                sink.begin(index)
            else:
                index = row[0].shard_index
                sink.begin(index)
                buffers[index].extend(row)
                progress.add(row)
            header = headers.get(index)
            if header is not None and len(buffers[index]) == header.count:
                sink.write(header, buffers.pop(index))
                written.add(index)
    except Exception as exc:  # retries exhausted: the unwritten shards fail, the written ones stand
        message = error_message(exc)
        for index, _ in shards:
            if index not in written:
                sink.fail(index, message)
        return
    for index, _ in shards:
        if index not in written:
            sink.fail(index, "some samples never came back from the Ray pipeline")
