"""`grit build` and its benchmarks `grit bench shards` / `grit bench pipeline`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

_GROUNDERS = ("grounding-dino", "annotations")


@click.command("build")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--grounder", type=click.Choice(_GROUNDERS), default="grounding-dino", show_default=True,
              help="GroundingDINO on the images, or the boxes supplied with the input (annotations).")
@click.option("--detector", default=None, help="GroundingDINO model id or local folder.")
@click.option("--box-threshold", type=float, default=None, help="Keep boxes scoring above this (GRIT: 0.65).")
@click.option("--nms-iou", type=float, default=None, help="Class-agnostic NMS IoU threshold.")
@click.option("--runner", type=click.Choice(("ray", "local")), default="ray", show_default=True)
@click.option("--ray-address", default=None, help="Attach to this Ray cluster (default: RAY_ADDRESS, else a local one).")
@click.option("--images", "images_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="img2dataset folder holding the images of GRIT-20M parquet inputs.")
@click.option("--spacy-model", default=None, help="spaCy pipeline for noun chunks.")
@click.option("--mode", type=click.Choice(("expression", "phrase")), default="expression", show_default=True,
              help="Serialise referring expressions or bare noun chunks.")
@click.option("--samples-per-shard", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Split captions.jsonl and parquet inputs into shards of this many samples.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--grounder-workers", type=click.IntRange(min=1), default=1, show_default=True, help="Grounder actors (Ray).")
@click.option("--gpus-per-grounder", type=click.FloatRange(min=0.0), default=None,
              help="GPUs per grounder actor (default: 1 if CUDA).")
@click.option("--progress-interval", type=click.FloatRange(min=0.0, min_open=True), default=10.0, show_default=True,
              help="Seconds between summaries.")
@click.option("--ray-engine", type=click.Choice(["auto", "data", "actors"]), default="auto", show_default=True,
              help="Ray layout: a Ray Data pipeline (per-operator progress), one pool of plain actors over whole "
                   "shards (faster start), or auto: Ray Data when the grounder has GPUs.")
@click.option("--box-frame", type=click.Choice(("raw", "upright")), default="raw", show_default=True,
              help="Frame of supplied boxes when the row's width/height cannot tell (EXIF orientation): the "
                   "encoded pixels (as GRIT's detector read them) or the upright image.")
@click.option("--img2dataset-resize-mode", "resize_mode", default="auto", show_default=True,
              type=click.Choice(("auto", "no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")),
              help="How img2dataset resized the downloads (auto: from the sizes, and white padding for border).")
@click.option("--min-cropped-box-fraction", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.5,
              show_default=True, help="Drop a supplied box center_crop left with less of its area than this.")
@click.option("--overwrite", is_flag=True, help="Replace an existing build in --out.")
def build(inputs: tuple[str, ...], out_dir: str, grounder: str, detector: str | None, box_threshold: float | None,
          nms_iou: float | None, runner: str, ray_address: str | None, images_dir: str | None,
          spacy_model: str | None, mode: str, samples_per_shard: int, batch_size: int, grounder_workers: int,
          gpus_per_grounder: float | None, progress_interval: float, ray_engine: str, box_frame: str,
          resize_mode: str, min_cropped_box_fraction: float, overwrite: bool) -> None:
    """Build Kosmos-2-ready WebDataset shards from img2dataset folders, captions.jsonl folders or GRIT-20M parquet.

    Inputs, models, the Ray cluster and OUT are checked before anything is written: a build refused for any
    of them leaves OUT as it was (exit 2: the detector is missing; 1: anything else).
    """
    from grit_pipeline.build import OutputInUseError, run_build, summary_table

    try:
        config = make_config(inputs, out_dir, grounder=grounder, detector=detector, box_threshold=box_threshold,
                             nms_iou=nms_iou, runner=runner, ray_address=ray_address, images_dir=images_dir,
                             spacy_model=spacy_model, mode=mode, samples_per_shard=samples_per_shard,
                             batch_size=batch_size, grounder_workers=grounder_workers,
                             gpus_per_grounder=gpus_per_grounder, progress_interval=progress_interval,
                             ray_engine=ray_engine, box_frame=box_frame, resize_mode=resize_mode,
                             min_cropped_box_fraction=min_cropped_box_fraction)
        _require_detector(config)
        _require_spacy_model(config)
        _require_ray_cluster(config)
        result = run_build(config, overwrite=overwrite)
    except (OutputInUseError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(summary_table(result), err=True)
    if not result.ok:
        click.echo(f"grit build: {len(result.manifest['failed_shards'])} shard(s) failed; rerun to retry them",
                   err=True)
        sys.exit(1)


def _require_detector(config: Any) -> None:
    """Exit 2 before anything is written when GroundingDINO is needed but its checkpoint cannot be found,
    with the line `grit ground` prints for the same detector."""
    if config.grounder != "grounding-dino" or all(str(p).endswith(".parquet") for p in config.inputs):
        return  # GRIT-20M parquet rows carry their boxes: the detector is never loaded for them
    from grit_pipeline.commands.ground import detector_unavailable
    from grit_pipeline.stages.detector_loading import DetectorUnavailableError, ensure_detector_available

    try:
        ensure_detector_available(config.grounding)
    except DetectorUnavailableError as exc:
        detector_unavailable(exc)


def _require_spacy_model(config: Any) -> None:
    """Stop before anything is written when the spaCy pipeline for noun chunks is not installed (in the words
    of `grit phrases` and `grit ground`). GRIT-20M parquet rows carry their noun chunks and never load it."""
    if all(str(p).endswith(".parquet") for p in config.inputs):
        return
    import importlib.util

    name = config.text.spacy_model
    try:
        if Path(name).exists() or importlib.util.find_spec(name) is not None:
            return  # an installed package or a pipeline folder: found without importing spaCy
    except (ImportError, ValueError):
        pass
    from grit_pipeline.stages.text import load_spacy

    try:
        load_spacy(name)  # neither: spaCy's own lookup decides, and says why in its own words
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc


def _require_ray_cluster(config: Any) -> None:
    """Stop before anything is written when --ray-address (or RAY_ADDRESS) is a HOST:PORT that takes no
    connection: ray.init would retry for minutes before it gave up."""
    import socket

    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if config.runner != "ray" or not address:
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" and the like: Ray's own lookup
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3.0).close()
    except OSError as exc:
        raise click.ClickException(f"cannot reach the Ray cluster at {address} ({exc}); check --ray-address or "
                                   f"RAY_ADDRESS, or pass --runner local") from exc


def make_config(inputs: tuple[str, ...], out_dir: str, *, grounder: str, detector: str | None,
                box_threshold: float | None, nms_iou: float | None, spacy_model: str | None, mode: str,
                gpus_per_grounder: float | None, box_frame: str = "raw", resize_mode: str = "auto",
                min_cropped_box_fraction: float = 0.5, **options: object) -> object:
    """A validated BuildConfig from the command-line options (None means the stage's default)."""
    from grit_pipeline.config import BuildConfig
    from grit_pipeline.stages.annotations import AnnotationConfig
    from grit_pipeline.stages.detector_loading import GroundingConfig
    from grit_pipeline.stages.frames import FrameConfig
    from grit_pipeline.stages.serialize import SerializeConfig
    from grit_pipeline.stages.text import TextConfig

    grounding = {k: v for k, v in (("detector", detector), ("box_threshold", box_threshold),
                                   ("nms_iou", nms_iou)) if v is not None}
    annotations = {k: v for k, v in (("box_threshold", box_threshold), ("nms_iou", nms_iou)) if v is not None}
    text = {"spacy_model": spacy_model} if spacy_model else {}
    if gpus_per_grounder is None:
        gpus_per_grounder = 1.0 if grounder == "grounding-dino" and _cuda_available() else 0.0
    return BuildConfig(
        inputs=tuple(str(Path(p).resolve()) for p in inputs),
        out_dir=str(Path(out_dir).resolve()),
        grounder=grounder,
        gpus_per_grounder=gpus_per_grounder,
        text=TextConfig(**text),
        serialize=SerializeConfig(mode=mode),
        grounding=GroundingConfig(**grounding),
        annotations=AnnotationConfig(**annotations),
        frames=FrameConfig(box_frame=box_frame, resize_mode=resize_mode,
                           min_cropped_box_fraction=min_cropped_box_fraction),
        **options,  # type: ignore[arg-type]
    )


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


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
@click.option("--batch-size", type=int, default=64, show_default=True)
def bench_pipeline(n: int, runner: str, samples_per_shard: int, batch_size: int) -> None:
    """End-to-end samples/s against the slowest stage run alone (annotation grounder, small images)."""
    from grit_pipeline.benchmarks.build import bench_end_to_end

    click.echo(json.dumps(bench_end_to_end(n, runner, samples_per_shard, batch_size), indent=2))
