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
