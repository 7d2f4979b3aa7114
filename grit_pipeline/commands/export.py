"""`grit export OUT --format odvg|mdetr|grit20m --to FILE`: a build in the formats detector trainers read."""

from __future__ import annotations

from pathlib import Path

import click

from grit_pipeline.export import FORMATS


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="odvg: MM-Grounding-DINO grounding JSON lines; mdetr: MDETR's COCO-style JSON; "
                   "grit20m: parquet in the GRIT-20M columns, kept rows only.")
@click.option("--to", "to", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The file to write (replaced atomically when the export succeeds).")
@click.option("--images", "images_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="odvg/mdetr: folder for the images as KEY.jpg [default: FILE's folder / <stem>_images].")
def export(out: Path, fmt: str, to: Path, images_dir: Path | None) -> None:
    """Export the local build OUT (kept samples only, streamed) for detector trainers."""
    from grit_pipeline.export import ExportError, export_build

    try:
        result = export_build(out, fmt, to, images_dir)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot write {to}: {exc}") from exc
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(result.summary())
