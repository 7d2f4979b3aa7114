"""The Ray runner: the same stages as Ray Data operators, streaming samples from shard reads to the driver.

`ray.init()` starts an embedded local cluster unless `--ray-address` (or RAY_ADDRESS) names one to attach
to. Reading, decoding and expand/serialise are tasks; spaCy and the grounder are actor pools, so models
load once per worker; the grounder asks for `gpus_per_grounder` GPUs (0 on CPU). Rows carry one
pickled `WorkItem` (or a `ShardHeader`) each; the driver regroups them by shard and hands complete shards
to the sink, so OUT is written by one process. Dead tasks and actors are retried by Ray (Ray Data's defaults: a
task whose worker dies is resubmitted, an actor that dies is restarted and its batch retried); if the
dataset still fails, every shard not yet written is recorded as failed and the rest of the run's output stands.
"""

from __future__ import annotations

import os
import pickle
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
    WorkItem,
    read_shard,
    run_stage,
)

if TYPE_CHECKING:
    from grit_pipeline.build import Progress, ShardSink

_CHEAP_CPU = 0.1
_STAGES: dict[str, Any] = {"decode": DecodeStage, "phrases": PhraseStage, "ground": GroundStage,
                           "expand": ExpandStage, "serialize": SerializeStage}


def init_ray(address: str | None) -> None:
    """Attach to `address` (or RAY_ADDRESS), else start an embedded local cluster; quiet either way."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False,
             configure_logging=False)


def read_rows(row: dict[str, Any], key_digits: int) -> list[dict[str, bytes]]:
    """Ray flat_map: one input shard -> its header row, then one row per sample."""
    index, shard = row["index"], pickle.loads(row["shard"])
    header, items = read_shard(index, shard, key_digits)
    return [{"item": pickle.dumps(header)}] + [{"item": pickle.dumps(item)} for item in items]


class StageWorker:
    """A Ray Data callable class running named pipeline stages on batches of pickled rows."""

    def __init__(self, config: dict[str, Any], names: Sequence[str]) -> None:
        built = BuildConfig.from_dict(config)
        self.stages = [_STAGES[name](built) for name in names]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Unpickle, run the stages on the WorkItems (headers pass through), pickle back."""
        import numpy as np

        rows = [pickle.loads(value) for value in batch["item"]]
        items = [row for row in rows if isinstance(row, WorkItem)]
        for stage in self.stages:
            run_stage(stage, items)
        return {"item": np.array([pickle.dumps(row) for row in rows], dtype=object)}


def run_stages_task(batch: dict[str, Any], config: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Ray map_batches task for the cheap stateless stages (decode, expand, serialise)."""
    return StageWorker(config, names)(batch)


def build_dataset(config: BuildConfig, shards: Sequence[tuple[int, InputShard]]) -> Any:
    """The Ray Data pipeline: read+decode tasks -> spaCy actors -> grounder actors -> expand+serialise tasks.

    Cheap tasks ask for a tenth of a CPU, so the model stages' actors (which hold their CPUs) never starve
    them on a small machine; spaCy actors scale up to the cores left by the grounder.
    """
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    grounder_cpus = 1.0 if config.gpus_per_grounder or config.grounder != "annotations" else _CHEAP_CPU
    config_dict = config.to_dict()
    items = [{"index": index, "shard": pickle.dumps(shard)} for index, shard in shards]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.flat_map(read_rows, fn_kwargs={"key_digits": config.key_digits}, num_cpus=_CHEAP_CPU)
    common: dict[str, Any] = {"batch_size": config.batch_size, "batch_format": "numpy"}
    ds = ds.map_batches(run_stages_task, fn_kwargs={"config": config_dict, "names": ("decode",)},
                        num_cpus=_CHEAP_CPU, **common)
    phrase_workers = max(1, cpus - int(grounder_cpus * config.grounder_workers))
    ds = ds.map_batches(StageWorker, fn_constructor_args=(config_dict, ("phrases",)), num_cpus=1,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=phrase_workers), **common)
    ds = ds.map_batches(StageWorker, fn_constructor_args=(config_dict, ("ground",)),
                        compute=ray.data.ActorPoolStrategy(size=config.grounder_workers),
                        num_gpus=config.gpus_per_grounder, num_cpus=grounder_cpus, **common)
    return ds.map_batches(run_stages_task, fn_kwargs={"config": config_dict, "names": ("expand", "serialize")},
                          num_cpus=_CHEAP_CPU, **common)


def iter_results(ds: Any) -> Iterator[ShardHeader | WorkItem]:
    """Every row of the dataset as its unpickled object, as results stream in."""
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for value in batch["item"]:
            yield pickle.loads(value)


def run_ray(config: BuildConfig, shards: Sequence[tuple[int, InputShard]], sink: ShardSink,
            progress: Progress) -> None:
    """Run the pending shards on Ray; complete shards are written as soon as their last sample arrives."""
    init_ray(config.ray_address)
    headers: dict[int, ShardHeader] = {}
    buffers: dict[int, list[WorkItem]] = {index: [] for index, _ in shards}
    written: set[int] = set()
    try:
        for row in iter_results(build_dataset(config, shards)):
            index = row.shard
            if isinstance(row, ShardHeader):
                headers[index] = row
            else:
                buffers[index].append(row)
                progress.add([row])
            header = headers.get(index)
            if header is not None and len(buffers[index]) == header.count:
                sink.write(header, buffers.pop(index))
                written.add(index)
    except Exception as exc:  # retries exhausted: the unwritten shards fail, the written ones stand
        for index, _ in shards:
            if index not in written:
                sink.fail(index, f"ray: {type(exc).__name__}: {str(exc)[:500]}")
        return
    for index, _ in shards:
        if index not in written:
            sink.fail(index, "some samples never came back from the Ray pipeline")
