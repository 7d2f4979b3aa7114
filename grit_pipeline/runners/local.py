"""The local runner: the stage list in this process, shard after shard (debugging and small jobs)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from grit_pipeline.stages.base import StageSetupError, run_stage
from grit_pipeline.work import read_shard, shard_batches

if TYPE_CHECKING:
    from grit_pipeline.config import BuildConfig
    from grit_pipeline.inputs import InputShard
    from grit_pipeline.runners.base import ShardSink, ShardWriter
    from grit_pipeline.stages.base import Stage


def run_local(config: BuildConfig, stages: Sequence[Stage], shards: Sequence[tuple[int, InputShard]],
              writer: ShardWriter, sink: ShardSink) -> None:
    """Read, process and write each pending shard in turn; a shard that raises is recorded as failed."""
    for number, (index, shard) in enumerate(shards):
        started = time.time()
        try:
            if number == 0:
                for stage in stages:
                    stage.setup()
            header, items = read_shard(index, shard, config.key_digits)
            for batch in shard_batches(items, config.stage_batch_size):
                for stage in stages:
                    run_stage(stage, batch)
                sink.progress.add(batch)
        except StageSetupError as exc:  # no shard can succeed: record them all and stop
            for remaining, _ in shards[number:]:
                sink.fail(remaining, str(exc))
            return
        except Exception as exc:  # the shard fails alone; the run goes on
            sink.fail(index, f"{type(exc).__name__}: {exc}")
            continue
        sink.record(writer.write(header, items, started))
