"""`grit eval ...`: grounding benchmarks (issue 13). `grit eval score` scores a predictions file.

To add a subcommand, decorate it with `@eval_group.command("name")` in this module (or in a module imported
from here) and run its body inside `with user_errors():`, which turns any EvalError (and OSError) into one
clear line on stderr and exit status 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn evaluation user errors (EvalError, OSError) into a one-line click error (exit 1)."""
    from grit_pipeline.eval import EvalError

    try:
        yield
    except EvalError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise click.ClickException(f"cannot access{where}: {exc.strerror or exc}") from exc


@click.group(name="eval", context_settings={"help_option_names": ["-h", "--help"]})
def eval_group() -> None:
    """Grounding benchmarks as the Kosmos-2 paper reports them (Flickr30k Entities, RefCOCO/+/g).

    Generation writes public predictions (JSON lines {"id", "boxes", "text"}); `score` scores any such file.
    """


@eval_group.command("score")
@click.option(
    "--annotations",
    "annotations_path",
    required=True,
    type=click.Path(path_type=Path),
    help="MDETR annotation json: final_flickr_separateGT_*.json / mergedGT, or finetune_refcoco*_*.json.",
)
@click.option(
    "--predictions",
    "predictions_path",
    required=True,
    type=click.Path(path_type=Path),
    help='Predictions, JSON lines {"id": ..., "boxes": [[x1, y1, x2, y2], ...], "text": ...}.',
)
def score(annotations_path: Path, predictions_path: Path) -> None:
    """Score a predictions file against MDETR annotations; prints the metrics as one JSON object.

    Flickr30k: recall@1/5/10 and upper_bound, ANY-box and MERGED-box, overall (and per phrase type when the
    annotations carry types). RefCOCO/+/g: acc@0.5 by IoU and by GIoU, per dataset_name.
    """
    from grit_pipeline.eval.scoring import score_files

    with user_errors():
        metrics = score_files(annotations_path, predictions_path)
    click.echo(json.dumps(metrics, indent=2))


def _generation_options(command: click.Command) -> click.Command:
    """The options `grit eval flickr30k` and `grit eval refcoco` share."""
    options = [
        click.option("--annotations", "annotations_path", required=True, type=click.Path(path_type=Path),
                     help="MDETR annotation json (final_flickr_separateGT_*.json, finetune_refcoco*_*.json)."),
        click.option("--images", "images_dir", required=True, type=click.Path(path_type=Path),
                     help="Folder holding the images the annotations' file_name entries name."),
        click.option("--checkpoint", required=True,
                     help="A `grit train` run or checkpoint folder, or a transformers Kosmos-2 checkpoint "
                          "(microsoft/kosmos-2-patch14-224 layout: hub id or local folder)."),
        click.option("--predictions", "predictions_path", type=click.Path(path_type=Path), default=None,
                     help="Where to write the predictions [default: <annotations stem>.predictions.jsonl here]."),
        click.option("--queries-per-batch", default=32, show_default=True, type=click.IntRange(min=1),
                     help="Prompts generated together (same-length prompts are batched)."),
        click.option("--device", default=None, help="cuda, cpu, ... [default: cuda when available]."),
        click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1)),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _generate_and_score(kind: str, annotations_path: Path, images_dir: Path, checkpoint: str,
                        predictions_path: Path | None, queries_per_batch: int, device: str | None,
                        max_new_tokens: int) -> None:
    """Kosmos-2's prompts and greedy decoding on every query, the public predictions file, then its score."""
    from grit_pipeline.eval import EvalError
    from grit_pipeline.eval.annotations import load_annotations
    from grit_pipeline.eval.generation import (
        flickr_queries,
        generate_predictions,
        load_grounding_model,
        missing_images,
        refexp_queries,
    )
    from grit_pipeline.eval.predictions import Prediction, write_predictions
    from grit_pipeline.eval.scoring import score
    from grit_pipeline.model.generate import CheckpointError

    with user_errors():
        annotations = load_annotations(annotations_path)
        if annotations.kind != kind:
            raise EvalError(f"{annotations_path} holds {annotations.kind} annotations; use `grit eval "
                            f"{'flickr30k' if annotations.kind == 'flickr' else 'refcoco'}`")
        if kind == "flickr":
            queries = flickr_queries(annotations.sentences, images_dir)
        else:
            queries = refexp_queries(annotations.expressions, images_dir)
        missing = missing_images(queries)
        if missing:
            raise EvalError(f"{len(missing)} image(s) missing under {images_dir}, first: {missing[0]}")
        try:
            model, processor = load_grounding_model(checkpoint, device)
        except CheckpointError as exc:
            raise EvalError(str(exc)) from exc
        generated = generate_predictions(model, processor, queries, batch_size=queries_per_batch, device=device,
                                         max_new_tokens=max_new_tokens)
        predictions = [Prediction.from_dict(row) for row in generated]
        target = predictions_path or Path(f"{annotations_path.stem}.predictions.jsonl")
        write_predictions(target, predictions)
        metrics = score(annotations, predictions)
    metrics["predictions_file"] = str(target)
    click.echo(json.dumps(metrics, indent=2))


@eval_group.command("flickr30k")
@_generation_options
def flickr30k(**options: object) -> None:
    """Phrase grounding on Flickr30k Entities with Kosmos-2's protocol; writes predictions, prints the metrics.

    One prompt per scored phrase: `<grounding>` + the caption up to the phrase + ` <phrase>` + phrase +
    `</phrase>`, greedy decoding; the boxes generated for the phrase, in order, are its ranked predictions.
    """
    _generate_and_score("flickr", **options)  # type: ignore[arg-type]


@eval_group.command("refcoco")
@_generation_options
def refcoco(**options: object) -> None:
    """Referring expression comprehension on RefCOCO/+/g with Kosmos-2's protocol; writes predictions, prints
    acc@0.5 (IoU and GIoU) per dataset. Prompt: `<grounding><phrase>` + expression + `</phrase>`."""
    _generate_and_score("refcoco", **options)  # type: ignore[arg-type]
