"""`grit audit OUT` and `grit inspect OUT`: check a build, and look at it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from grit_pipeline.commands.checks import STORAGE_OPTIONS_HELP, PathOrUrl, StorageOptions

if TYPE_CHECKING:
    from grit_pipeline.storage import Folder


@click.command()
@click.argument("out", type=PathOrUrl(folder=True))
@click.option("--storage-options", type=StorageOptions(), default=None, help=STORAGE_OPTIONS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (for machines).")
@click.option("--no-decode", is_flag=True, help="Skip decoding every image (faster; other checks still run).")
@click.option(
    "--check-image-size/--no-check-image-size",
    default=None,
    help="Require each image's size to equal the .json's width/height (default: as the manifest says).",
)
@click.option("--limit", default=200, show_default=True, help="Findings listed in the text report.")
def audit(out: str, storage_options: dict[str, Any] | None, as_json: bool, no_decode: bool,
          check_image_size: bool | None, limit: int) -> None:
    """Check every shard of OUT against its manifest and every sample against the invariants.

    Exits 0 when nothing is found, 1 when any check fails, 2 when OUT holds no grit build at all.
    """
    from grit_pipeline.manifests.audit import audit_build

    folder = _require_build(out, storage_options)
    report = audit_build(folder, decode_images=not no_decode, check_image_size=check_image_size)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        click.echo(report.format_text(limit=limit))
    sys.exit(0 if report.ok else 1)


@click.command()
@click.argument("out", type=PathOrUrl(folder=True))
@click.option("--storage-options", type=StorageOptions(), default=None, help=STORAGE_OPTIONS_HELP)
@click.option("--n", "count", default=50, show_default=True, help="Samples shown in the gallery.")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the HTML gallery here.",
)
@click.option("--png", "png_key", help="Render the sample with this key, boxes and labels, to KEY.png.")
@click.option(
    "--png-out", type=click.Path(dir_okay=False, path_type=Path), help="Where --png writes (default KEY.png)."
)
@click.option("--sort", type=click.Choice(("clip", "box_score", "boxes")), default=None,
              help="Show the samples of the whole build lowest first: CLIP similarity (ViT-B/32, else ViT-L/14; "
                   "unknown last), the sample's lowest box score, or its number of boxes.")
@click.option("--max-clip", type=float, default=None, help="Only samples whose CLIP similarity is <= this.")
@click.option("--max-box-score", type=float, default=None, help="Only samples with a box score <= this.")
@click.option("--min-boxes", type=click.IntRange(min=0), default=None, help="Only samples with >= this many boxes.")
@click.option("--max-boxes", type=click.IntRange(min=0), default=None, help="Only samples with <= this many boxes.")
def inspect(out: str, storage_options: dict[str, Any] | None, count: int, html_path: Path | None, png_key: str | None, png_out: Path | None,
            sort: str | None, max_clip: float | None, max_box_score: float | None, min_boxes: int | None,
            max_boxes: int | None) -> None:
    """A static HTML gallery of OUT (images, boxes, highlighted spans, shard stats, drop reasons, score
    distributions).

    Without --html and --png, writes OUT/report.html (./report.html when OUT is a URL). With --sort or a filter (--max-clip, --max-box-score,
    --min-boxes, --max-boxes) the gallery shows what a threshold would remove, in that order, and each shown
    sample is printed as one line: key, clip, box_score (its lowest), boxes.
    """
    from grit_pipeline.manifests.gallery import GalleryError, Selection, select_samples, write_gallery
    from grit_pipeline.manifests.sample_png import render_sample_png

    folder = _require_build(out, storage_options)
    for target in (html_path, png_out):
        if target is not None and not target.resolve().parent.is_dir():
            raise click.ClickException(f"cannot write {target}: folder {target.parent} does not exist")
    try:
        if png_key is not None:
            target = png_out or Path(f"{png_key}.png")
            render_sample_png(folder, png_key, target)
            click.echo(f"wrote {target}")
        selection = Selection(sort, max_clip, max_box_score, min_boxes, max_boxes)
        if selection.active:
            for sample, metrics in select_samples(folder, count, selection):
                boxes = int(metrics["boxes"] or 0)
                click.echo(f"{sample.key}\tclip={_metric(metrics['clip'])}\tbox_score={_metric(metrics['box_score'])}"
                           f"\tboxes={boxes}")
        if html_path is not None or png_key is None:
            target = html_path or (Path(folder.path("report.html")) if folder.local else Path("report.html"))
            shown = write_gallery(folder, target, count=count, selection=selection)
            click.echo(f"wrote {target} ({shown} samples)")
    except GalleryError as exc:
        raise click.ClickException(str(exc)) from exc


def _metric(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}"


def _require_build(out: str, storage_options: dict[str, Any] | None) -> Folder:
    """OUT as a Folder; exit 2 with one line when it has neither a manifest.json nor shards: it holds no grit
    build (a build with a damaged manifest still has its shards, and is audited), or cannot be read."""
    from grit_pipeline.storage import Folder, StorageError, describe_storage_error

    folder = Folder(out, storage_options)
    try:
        holds_build = folder.exists("manifest.json") or bool(folder.files("shards"))
    except StorageError as exc:
        raise click.ClickException(str(exc)) from exc
    except Exception as exc:  # an object store's own errors: endpoint, credentials, bucket
        raise click.ClickException(describe_storage_error(folder.url, exc)) from exc
    if not holds_build:
        error = click.ClickException(f"{out} holds no grit build (no manifest.json, no shards/); pass the --out "
                                     f"folder of a grit build")
        error.exit_code = 2
        raise error
    return folder
