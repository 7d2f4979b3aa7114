"""The Ray runner: the same stages as Ray Data operators, streaming samples from shard reads to the driver.

`ray.init()` starts an embedded local cluster unless `--ray-address` (or RAY_ADDRESS) names one to attach
to. Reading is a task per shard; the stages run in actor pools, so
models load once per worker (see `build_dataset` for the layout with and without a GPU grounder); the grounder asks for `gpus_per_grounder` GPUs (0 on CPU). Rows carry one
pickled `WorkItem` (or a `ShardHeader`) each; the driver regroups them by shard and hands complete shards
to the sink, so OUT is written by one process. Dead tasks and actors are retried by Ray (Ray Data's defaults: a
task whose worker dies is resubmitted, an actor that dies is restarted and its batch retried); if the
dataset still fails, every shard not yet written is recorded as failed and the rest of the run's output stands.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from grit_pipeline.config import BuildConfig
from grit_pipeline.inputs import InputShard
from grit_pipeline.pipeline import (
    DecodeStage,
    ExpandStage,
    GroundStage,
    PhraseStage,
    SerializeStage,
    ShardHeader,
    StageSetupError,
    WorkItem,
    read_shard,
    run_stage,
    shard_batches,
)

if TYPE_CHECKING:
    from grit_pipeline.build import Progress, ShardSink

_CHEAP_CPU = 0.1
_STAGES: dict[str, Any] = {"decode": DecodeStage, "phrases": PhraseStage, "ground": GroundStage,
                           "expand": ExpandStage, "serialize": SerializeStage}
ALL_STAGES = tuple(_STAGES)


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


def read_rows(row: dict[str, Any], key_digits: int, batch_size: int) -> list[dict[str, bytes]]:
    """Ray flat_map: one input shard -> its header row, then one row per batch of `batch_size` samples.

    A row is a whole batch so that every stage sees exactly the batches the local runner makes
    (`shard_batches`): a detector's output can depend on what it is batched with (padding, kernel choice).
    """
    index, shard = row["index"], pickle.loads(row["shard"])
    header, items = read_shard(index, shard, key_digits)
    return [{"item": pickle.dumps(header)}] + [{"item": pickle.dumps(b)} for b in shard_batches(items, batch_size)]


class StageWorker:
    """A Ray Data callable class running named pipeline stages on batches of pickled rows."""

    def __init__(self, config: dict[str, Any], names: Sequence[str]) -> None:
        built = BuildConfig.from_dict(config)
        self.stages = [_STAGES[name](built) for name in names]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Unpickle, run the stages on each batch of WorkItems (headers pass through), pickle back."""
        import numpy as np

        rows = [pickle.loads(value) for value in batch["item"]]
        for items in (row for row in rows if isinstance(row, list)):
            for stage in self.stages:
                run_stage(stage, items)
            if any(isinstance(stage, GroundStage) for stage in self.stages):
                for item in items:
                    item.release_pixels()  # later stages and the writer need the stored bytes, not the pixels
        return {"item": np.array([pickle.dumps(row) for row in rows], dtype=object)}


def run_stages_task(batch: dict[str, Any], config: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Ray map_batches task for the cheap stateless stages (decode, expand, serialise)."""
    return StageWorker(config, names)(batch)


def build_dataset(config: BuildConfig, shards: Sequence[tuple[int, InputShard]]) -> Any:
    """The Ray Data pipeline over the pending shards.

    With a GPU grounder: read tasks -> CPU actors (decode, spaCy) -> GPU actors (ground) -> CPU tasks
    (expand, serialise), so the detector is fed by as many CPU workers as the machine has. Without one, the
    grounder is a CPU stage like the others and all stages run in one CPU actor pool, one actor per core:
    the rows are then pickled once per sample instead of once per stage. Read tasks ask for a tenth of a
    CPU, and the actors leave that much free, so that reading never starves.
    """
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    config_dict = config.to_dict()
    items = [{"index": index, "shard": pickle.dumps(shard)} for index, shard in shards]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.flat_map(read_rows, fn_kwargs={"key_digits": config.key_digits, "batch_size": config.batch_size},
                     num_cpus=_CHEAP_CPU)
    common: dict[str, Any] = {"batch_size": 1, "batch_format": "numpy"}  # one row = one pipeline batch
    actor_cpus = max(_CHEAP_CPU, (cpus - 2 * _CHEAP_CPU) / cpus)
    if not config.gpus_per_grounder:
        return ds.map_batches(StageWorker, fn_constructor_args=(config_dict, ALL_STAGES), num_cpus=actor_cpus,
                              compute=ray.data.ActorPoolStrategy(size=cpus), **common)
    ds = ds.map_batches(StageWorker, fn_constructor_args=(config_dict, ("decode", "phrases")), num_cpus=actor_cpus,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cpus, initial_size=cpus), **common)
    ds = ds.map_batches(StageWorker, fn_constructor_args=(config_dict, ("ground",)),
                        compute=ray.data.ActorPoolStrategy(size=config.grounder_workers),
                        num_gpus=config.gpus_per_grounder, num_cpus=_CHEAP_CPU, **common)
    return ds.map_batches(run_stages_task, fn_kwargs={"config": config_dict, "names": ("expand", "serialize")},
                          num_cpus=_CHEAP_CPU, **common)


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


def run_ray(config: BuildConfig, shards: Sequence[tuple[int, InputShard]], sink: ShardSink,
            progress: Progress) -> None:
    """Run the pending shards on Ray; complete shards are written as soon as their last sample arrives."""
    init_ray(config.ray_address)
    headers: dict[int, ShardHeader] = {}
    buffers: dict[int, list[WorkItem]] = {index: [] for index, _ in shards}
    written: set[int] = set()
    try:
        for row in iter_results(build_dataset(config, shards)):
            if isinstance(row, ShardHeader):
                index = row.shard
                headers[index] = row
                sink.begin(index)
            else:
                index = row[0].shard
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
