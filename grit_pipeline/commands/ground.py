"""`grit ground IMAGES_DIR CAPTIONS_JSONL`: the build's stage list on a captions.jsonl, rows on stdout.

It runs exactly what `grit build` runs (the same stage list, through the local runner), so for the same
input its rows are the KEY.json records a build writes; only where they go differs: kept samples to stdout
as JSON lines, dropped ones to stderr with their key and reason. Also `grit bench detector`.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from grit_pipeline.commands.build import NmsIou, default

_SAMPLES_PER_SHARD = 256  # lines read, decoded and grounded together: bounds the memory held by images


@click.command()
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("captions_jsonl", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--grounder", type=click.Choice(["grounding-dino", "annotations"]), default=None,
              help="grounding-dino: detect boxes; annotations: boxes supplied by each line (GRIT-20M entries "
                   f"or COCO-style 'annotations'). {default('grounder')}")
@click.option("--detector", default=None,
              help=f"Hub id or local directory of a transformers GroundingDINO checkpoint. {default('grounding.detector')}")
@click.option("--box-threshold", default=None, type=click.FloatRange(0.0, 1.0, max_open=True),
              help=f"Keep chunk-box pairs with score strictly above this. {default('grounding.box_threshold')}")
@click.option("--nms-iou", type=NmsIou(), default=None,
              help=f"Class-agnostic NMS IoU, or 'off'. {default('grounding.nms_iou')} (annotations: off)")
@click.option("--spacy-model", default=None, help=f"Installed spaCy pipeline. {default('text.spacy_model')}")
@click.option("--passes-per-forward", default=None, type=click.IntRange(min=1),
              help=f"Text passes (image + prompt) per detector forward. {default('grounding.passes_per_forward')}")
@click.option("--device", default=None, help=f"auto, cpu, cuda, cuda:N or mps. {default('grounding.device')}")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None,
              help=f"Autocast dtype on CUDA (auto: bf16, else fp16); CPU runs float32. {default('grounding.dtype')}")
@click.option("--offline", is_flag=True, default=None, help="Never contact the hub: load the detector from disk or cache only.")
@click.option("--max-pixels", default=None, type=click.IntRange(min=1),
              help=f"Images with more pixels (read from the header) are dropped without decoding. {default('image.max_pixels')}")
@click.option("--box-frame", type=click.Choice(("raw", "upright")), default=None,
              help=f"Frame of supplied boxes when a line's width/height cannot tell. {default('frames.box_frame')}")
def ground(images_dir: Path, captions_jsonl: Path, **options: Any) -> None:
    """Ground CAPTIONS_JSONL's noun chunks in images under IMAGES_DIR; print one KEY.json record per kept pair.

    Each line: {"image": path relative to IMAGES_DIR, "caption": str, optional "key", "url", "id",
    "width"/"height", "annotations"} or a GRIT-20M row with "image" added. Malformed lines, bad images and
    dropped pairs are reported on stderr with key and reason. Exit code 2: the detector is unavailable; 1: no
    line of CAPTIONS_JSONL is a caption line, or the spaCy model is missing.
    """
    from grit_pipeline.commands.checks import require_detector, require_spacy_model
    from grit_pipeline.config import build_config
    from grit_pipeline.inputs.captions import captions_shards
    from grit_pipeline.runners.base import Progress
    from grit_pipeline.runners.local import run_local
    from grit_pipeline.stages.stage_list import build_stages

    _require_text(captions_jsonl)
    # ground writes no OUT: its rows go to stdout, so the output folder is a placeholder that is never made
    config = build_config((str(captions_jsonl),), "-", runner="local", samples_per_shard=_SAMPLES_PER_SHARD,
                          **options)
    require_detector(config)
    require_spacy_model(config)
    shards = list(enumerate(captions_shards(str(captions_jsonl.resolve()), _SAMPLES_PER_SHARD)))
    shards = [(index, _with_images(shard, images_dir)) for index, shard in shards]
    printer = RowPrinter(Progress(len(shards), interval=float("inf")))
    run_local(config, build_stages(config), shards, printer, printer)
    click.echo("grit: summary: " + json.dumps(dict(sorted(printer.counts.items()))), err=True)
    if printer.failures:
        raise click.ClickException("; ".join(sorted(set(printer.failures.values()))))
    if printer.counts["lines"] and printer.counts["lines"] == printer.counts[_MALFORMED]:
        raise click.ClickException(f"{captions_jsonl}: none of its {printer.counts['lines']} line(s) is a JSON "
                                   f"object with string fields 'image' and 'caption'")


_MALFORMED = "malformed_record"


class RowPrinter:
    """The shard writer and sink of `grit ground`: each kept sample's KEY.json record to stdout, each dropped
    one to stderr."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.counts: Counter[str] = Counter()
        self.failures: dict[int, str] = {}

    def write(self, header: Any, items: Sequence[Any], started: float) -> Any:
        """Print the shard's samples in line order."""
        from grit_pipeline.runners.base import ShardOutcome
        from grit_pipeline.work import to_output

        if header.failure is not None:
            return ShardOutcome(header.shard_index, error=header.failure)
        for item in sorted(items, key=lambda item: item.position):
            sample = to_output(item)
            self.counts["lines"] += 1
            self.counts.update({f"span:{reason.value}": n for reason, n in sample.span_drops.items()})
            if sample.kept:
                self.counts["grounded"] += 1
                sys.stdout.write(json.dumps(sample.json_member(), ensure_ascii=False) + "\n")
                continue
            reason = sample.drop_reason.value if sample.drop_reason else "unknown"
            self.counts[reason] += 1
            detail = f": {sample.error_message}" if sample.error_message else ""
            click.echo(f"grit: skipped key {sample.source_key!r}: {reason}{detail}", err=True)
        return ShardOutcome(header.shard_index, stats={})

    def record(self, outcome: Any) -> None:
        """Note a shard that could not be printed."""
        if outcome.error is not None:
            self.fail(outcome.shard_index, outcome.error)

    def fail(self, index: int, error: str) -> None:
        """A shard that could not be processed (a model that cannot load: every shard)."""
        self.failures[index] = error


def _with_images(shard: Any, images_dir: Path) -> Any:
    """The captions shard reading its images from IMAGES_DIR rather than the jsonl's own folder."""
    from dataclasses import replace

    return replace(shard, images=str(images_dir.resolve()))


def _require_text(path: Path) -> None:
    """One line, not one warning per line, for a binary file given as CAPTIONS_JSONL."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise click.ClickException(f"{path} is not a text file ({exc.reason} in line {number}); "
                                           f"CAPTIONS_JSONL holds one JSON object a line") from exc
            if number >= 16:
                return


def detector_unavailable(exc: Exception) -> NoReturn:
    """Exit 2 with the one line every command prints for a detector it cannot find (`grit build` too)."""
    click.echo(f"grit: {exc}", err=True)
    sys.exit(2)


@click.command("detector")
@click.option("--detector", default=None, help="Checkpoint to benchmark (default: a tiny random-weight model built here).")
@click.option("--n-images", default=48, show_default=True, type=click.IntRange(min=1))
@click.option("--passes-per-forward", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True)
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1), help="Best of N runs each.")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="torch threads for both runs [default: cores - 1, leaving one core to feed the model].")
def bench_detector(detector: str | None, n_images: int, passes_per_forward: int, device: str, repeats: int,
                   threads: int | None) -> None:
    """Images/s through the grounding stage vs a raw model forward over the same batches (target ratio >= 0.90)."""
    if detector is not None:
        from grit_pipeline.stages.detector_loading import (
            DetectorUnavailableError,
            GroundingConfig,
            ensure_detector_available,
        )

        try:
            ensure_detector_available(GroundingConfig(detector=detector))
        except DetectorUnavailableError as exc:
            detector_unavailable(exc)
    from grit_pipeline.benchmarks.detector import run_detector_bench

    report = run_detector_bench(detector=detector, n_images=n_images, passes_per_forward=passes_per_forward, device=device,
                                repeats=repeats, threads=threads)
    sys.stdout.write(json.dumps(report, ensure_ascii=False) + "\n")
