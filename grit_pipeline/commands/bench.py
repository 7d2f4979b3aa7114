"""`grit bench ...`: each stage's throughput against the limit for that stage, printed as JSON."""

from __future__ import annotations

import click

from grit_pipeline.cli import LazyGroup

_BENCHES = {
    "text": ("grit_pipeline.commands.text:bench_text", "Text stages vs raw nlp.pipe (and the naive nlp(c) loop)."),
    "serialize": ("grit_pipeline.commands.text:bench_serialize", "Location-token serialiser, records/s."),
    "detector": ("grit_pipeline.commands.ground:bench_detector", "Grounding stage vs a raw model forward."),
    "shards": ("grit_pipeline.commands.build:bench_shards", "Shard writer MB/s vs raw tarfile."),
    "pipeline": ("grit_pipeline.commands.build:bench_pipeline", "End-to-end samples/s vs the slowest stage and the CPU limit; --s3."),
    "clip": ("grit_pipeline.commands.bench:bench_clip", "CLIP stage vs the bare model forward (tiny CLIP, CPU)."),
    "loader": ("grit_pipeline.commands.train:bench_loader", "Trainer loader vs a plain webdataset decode loop."),
    "cluster": ("grit_pipeline.commands.bench:bench_cluster",
                "GRIT-scale build on a local multi-node Ray cluster: wall, driver peak RSS, kill and resume."),
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


@click.command("cluster")
@click.option("--shards", default=2000, show_default=True, type=click.IntRange(min=1),
              help="Input tars, one output shard each.")
@click.option("--samples", default=10000, show_default=True, type=click.IntRange(min=1),
              help="Samples in all, spread evenly over the shards.")
@click.option("--worker-nodes", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--cpus-per-node", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--image-size", default=32, show_default=True, type=click.IntRange(min=8), help="Image side, pixels.")
@click.option("--kill-after", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
              help="Fraction of the shards complete when the resume phase's build is SIGKILLed.")
@click.option("--timeout", "timeout_s", default=3600.0, show_default=True, type=click.FloatRange(min=1.0),
              help="SIGKILL any one build still running after this many seconds (reported as timed_out).")
@click.option("--json-out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the JSON here.")
def bench_cluster(shards: int, samples: int, worker_nodes: int, cpus_per_node: int, image_size: int,
                  kill_after: float, timeout_s: float, json_out: str | None) -> None:
    """Build `--shards` img2dataset tars with the Ray actors engine on a local multi-node cluster (head without
    CPUs), then SIGKILL a fresh build part-way and resume it: wall seconds, samples/s, the driver's peak RSS,
    distinct writer nodes and manifest size."""
    import json

    from grit_pipeline.benchmarks.cluster import bench_cluster as run

    if samples < shards:
        raise click.BadParameter(f"{samples} < --shards {shards}: every input tar needs a sample", param_hint="--samples")
    text = json.dumps(run(shards, samples, worker_nodes, cpus_per_node, image_size, kill_after, timeout_s), indent=2)
    if json_out:
        with open(json_out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    click.echo(text)
