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
    "clip": ("grit_pipeline.commands.bench:bench_clip", "CLIP stage vs the bare model forward (tiny CLIP, CPU)."),
    "loader": ("grit_pipeline.commands.train:bench_loader", "Trainer loader vs a plain webdataset decode loop."),
}


@click.group(cls=LazyGroup, lazy_commands=_BENCHES)
def bench() -> None:
    """Throughput benchmarks; each prints JSON with the stage's rate, its baseline and the ratio."""


@click.command("clip")
@click.option("--clip-model", default=None, help="Checkpoint to benchmark (default: a tiny random-weight CLIP built here).")
@click.option("--n-images", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--images-per-forward", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True)
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1), help="Best of N runs each.")
def bench_clip(clip_model: str | None, n_images: int, images_per_forward: int, device: str, repeats: int) -> None:
    """CLIP stage pairs/s against the bare processor + model forward on the same batches (target ratio >= 0.9)."""
    import json

    from grit_pipeline.benchmarks.clip import bench_clip_stage

    click.echo(json.dumps(bench_clip_stage(clip_model, n_images, images_per_forward, device, repeats), indent=2))
