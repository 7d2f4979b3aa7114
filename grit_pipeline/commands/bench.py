"""`grit bench ...`: each stage's throughput against the limit for that stage, printed as JSON."""

from __future__ import annotations

import click

from grit_pipeline.cli import LazyGroup

_BENCHES = {
    "text": ("grit_pipeline.commands.text:bench_text", "Text stages vs raw nlp.pipe (and the naive nlp(c) loop)."),
    "serialize": ("grit_pipeline.commands.text:bench_serialize", "Location-token serialiser, records/s."),
    "detector": ("grit_pipeline.commands.ground:bench_detector", "Grounding stage vs a raw model forward."),
    "shards": ("grit_pipeline.commands.build:bench_shards", "Shard writer MB/s vs raw tarfile."),
    "pipeline": ("grit_pipeline.commands.build:bench_pipeline", "End-to-end samples/s vs the slowest stage."),
    "loader": ("grit_pipeline.commands.train:bench_loader", "Trainer loader vs a plain webdataset decode loop."),
}


@click.group(cls=LazyGroup, lazy_commands=_BENCHES)
def bench() -> None:
    """Throughput benchmarks; each prints JSON with the stage's rate, its baseline and the ratio."""
