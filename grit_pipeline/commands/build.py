"""`grit build` and its benchmarks `grit bench shards` / `grit bench pipeline`."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from grit_pipeline.commands.checks import STORAGE_OPTIONS_HELP, PathOrUrl, StorageOptions
from grit_pipeline.config import NMS_OFF, BuildConfig, build_config, load_config_file

_GROUNDERS = ("grounding-dino", "annotations")
_DEFAULTS = BuildConfig(inputs=("-",), out_dir="-")


def default(path: str) -> str:
    """`[default: X]` for a help text, read from the config's own defaults (the CLI keeps none of its own);
    None reads "off"."""
    value: Any = _DEFAULTS
    for part in path.split("."):
        value = getattr(value, part)
    return f"[default: {'off' if value is None else getattr(value, 'value', value)}]"


class NmsIou(click.ParamType):
    """A float in (0, 1], or "off" to disable NMS."""

    name = "iou|off"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | str:
        """The IoU as a float, or NMS_OFF."""
        if isinstance(value, float) or value == NMS_OFF:
            return value
        if str(value).strip().lower() in ("off", "none"):
            return NMS_OFF
        try:
            iou = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'off'", param, ctx)
        if not 0.0 < iou <= 1.0:
            self.fail(f"{iou} is not in (0, 1]", param, ctx)
        return iou


@click.command("build")
@click.argument("inputs", nargs=-1, type=PathOrUrl())
@click.option("--out", "out_dir", type=PathOrUrl(exists=False, folder=True), default=None,
              help="Output folder or URL (s3://bucket/prefix, gs://...); default: the config file's.")
@click.option("--storage-options", type=StorageOptions(), default=None, help=STORAGE_OPTIONS_HELP)
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="A saved config.json (OUT/config.json) or a config object: every field of every stage; the "
                   "other options override it.")
@click.option("--grounder", type=click.Choice(_GROUNDERS), default=None,
              help=f"GroundingDINO on the images, or the boxes supplied with the input. {default('grounder')}")
@click.option("--detector", default=None, help=f"GroundingDINO model id or local folder. {default('grounding.detector')}")
@click.option("--box-threshold", type=click.FloatRange(0.0, 1.0, max_open=True), default=None,
              help=f"Keep boxes scoring above this. {default('grounding.box_threshold')}")
@click.option("--nms-iou", type=NmsIou(), default=None,
              help=f"Class-agnostic NMS IoU, or 'off'. {default('grounding.nms_iou')} (annotations: off)")
@click.option("--runner", type=click.Choice(("ray", "local")), default=None, help=default("runner"))
@click.option("--ray-address", default=None, help="Attach to this Ray cluster (default: RAY_ADDRESS, else a local one).")
@click.option("--images", "images_dir", default=None, type=PathOrUrl(),
              help="img2dataset folder holding the images of GRIT-20M parquet inputs.")
@click.option("--spacy-model", default=None, help=f"spaCy pipeline for noun chunks. {default('text.spacy_model')}")
@click.option("--mode", type=click.Choice(("expression", "phrase")), default=None,
              help=f"Serialise referring expressions or bare noun chunks. {default('serialize.mode')}")
@click.option("--samples-per-shard", type=click.IntRange(min=1), default=None,
              help=f"Split captions.jsonl and parquet inputs into shards of this many samples. "
                   f"{default('samples_per_shard')}")
@click.option("--stage-batch-size", type=click.IntRange(min=1), default=None,
              help=f"Samples per pipeline batch, the unit every stage works on. {default('stage_batch_size')}")
@click.option("--grounder-workers", type=click.IntRange(min=1), default=None,
              help=f"Grounder actors (Ray). {default('grounder_workers')}")
@click.option("--gpus-per-grounder", type=click.FloatRange(min=0.0), default=None,
              help="GPUs per grounder actor. [default: 1 if CUDA]")
@click.option("--progress-interval", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help=f"Seconds between summaries. {default('progress_interval')}")
@click.option("--ray-engine", type=click.Choice(["auto", "data", "actors"]), default=None,
              help="Ray layout: a Ray Data pipeline (per-operator progress), one pool of plain actors over whole "
                   f"shards (faster start), or auto: Ray Data when a stage wants GPUs. {default('ray_engine')}")
@click.option("--box-frame", type=click.Choice(("raw", "upright")), default=None,
              help="Frame of supplied boxes when the row's width/height cannot tell (EXIF orientation): the "
                   f"encoded pixels (as GRIT's detector read them) or the upright image. {default('frames.box_frame')}")
@click.option("--img2dataset-resize-mode", "resize_mode", default=None,
              type=click.Choice(("auto", "no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")),
              help="How img2dataset resized the downloads (auto: from the sizes, and white padding for border). "
                   f"{default('frames.resize_mode')}")
@click.option("--min-cropped-box-fraction", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Drop a supplied box center_crop left with less of its area than this. "
                   f"{default('frames.min_cropped_box_fraction')}")
@click.option("--clip-model", default=None,
              help=f"CLIP model id or local folder: image-text similarity into the GRIT-20M column of the model "
                   f"(ViT-B/32, ViT-L/14) or its own. {default('clip.model')} (off)")
@click.option("--min-clip-similarity", type=click.FloatRange(-1.0, 1.0), default=None,
              help=f"Drop pairs whose CLIP similarity is below this (needs --clip-model). {default('clip.min_similarity')}")
@click.option("--recompute-clip", is_flag=True, default=None,
              help=f"Recompute the CLIP column even where the input carries it. {default('clip.recompute')}")
@click.option("--quality", type=click.Choice(("strict", "off")), default=None,
              help="Box-quality preset: strict turns on every filter at the values of docs/output-format.md, off "
                   "turns them off; the flags below override it. [default: off]")
@click.option("--max-box-area-fraction", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Remove a box covering more of the image than this (box_too_large). "
                   f"{default('quality.max_box_area_fraction')}")
@click.option("--min-box-side", type=click.FloatRange(min=0.0), default=None,
              help="Remove a box whose shorter side is under this many stored pixels (box_too_small). "
                   f"{default('quality.min_box_side_px')}")
@click.option("--max-boxes-per-phrase", type=click.IntRange(min=1), default=None,
              help="Keep at most this many boxes per phrase, the highest-scoring (too_many_boxes). "
                   f"{default('quality.max_boxes_per_phrase')}")
@click.option("--min-image-side", type=click.IntRange(min=1), default=None,
              help="Drop a sample whose stored image has a side under this many pixels "
                   f"(image_too_small_for_quality). {default('quality.min_image_side_px')}")
@click.option("--agreement-detector", default=None,
              help="A second GroundingDINO checkpoint: a box is kept only when it finds a box for the same "
                   f"phrase with IoU >= --agreement-iou (GranD's rule). {default('agreement.detector')}")
@click.option("--agreement-iou", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help=f"IoU the second detector's box must reach. {default('agreement.iou')}")
@click.option("--overwrite", is_flag=True, help="Replace an existing build in --out.")
def build(inputs: tuple[str, ...], out_dir: str | None, config_file: str | None, overwrite: bool,
          **options: Any) -> None:
    """Build Kosmos-2-ready WebDataset shards from img2dataset folders, captions.jsonl folders or GRIT-20M parquet.

    Inputs, models, the Ray cluster and OUT are checked before anything is written: a build refused for any
    of them leaves OUT as it was (exit 2: the detector is missing; 1: anything else).
    """
    from grit_pipeline.build import OutputInUseError, run_build, summary_table
    from grit_pipeline.commands.checks import (
        require_clip_model,
        require_detector,
        require_ray_cluster,
        require_spacy_model,
    )
    from grit_pipeline.storage import StorageError

    try:
        base = load_config_file(config_file) if config_file else None
        config = build_config(inputs or None, out_dir, base=base, **options)
        require_detector(config)
        require_clip_model(config)
        require_spacy_model(config)
        require_ray_cluster(config)
        result = run_build(config, overwrite=overwrite)
    except (OutputInUseError, StorageError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(summary_table(result), err=True)
    if not result.ok:
        click.echo(f"grit build: {len(result.manifest['failed_shards'])} shard(s) failed; rerun to retry them",
                   err=True)
        sys.exit(1)


@click.command("shards")
@click.option("--samples", type=int, default=2000, show_default=True)
@click.option("--image-kb", type=int, default=32, show_default=True, help="Payload size of each image.")
@click.option("--repeats", type=int, default=3, show_default=True)
def bench_shards(samples: int, image_kb: int, repeats: int) -> None:
    """Shard-writer MB/s against raw tarfile writing of the same payloads (target ratio >= 0.8)."""
    from grit_pipeline.benchmarks.build import bench_shard_writer

    click.echo(json.dumps(bench_shard_writer(samples, image_kb * 1024, repeats), indent=2))


@click.command("pipeline")
@click.option("--n", type=int, default=2000, show_default=True, help="Samples (10,000 for the headline figure).")
@click.option("--runner", type=click.Choice(("local", "ray")), default="local", show_default=True)
@click.option("--samples-per-shard", type=int, default=1000, show_default=True)
@click.option("--stage-batch-size", type=int, default=64, show_default=True)
@click.option("--s3", "compare_s3", is_flag=True,
              help="Also build with OUT on a loopback S3 server (moto, from the dev extra) and report its speed "
                   "over the local build's (target >= 0.8).")
def bench_pipeline(n: int, runner: str, samples_per_shard: int, stage_batch_size: int, compare_s3: bool) -> None:
    """End-to-end samples/s against the slowest stage run alone and against the CPU limit (efficiency, target
    >= 0.8), annotation grounder, small images."""
    from grit_pipeline.benchmarks.build import bench_end_to_end

    click.echo(json.dumps(bench_end_to_end(n, runner, samples_per_shard, stage_batch_size, compare_s3), indent=2))
