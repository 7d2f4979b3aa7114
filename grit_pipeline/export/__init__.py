"""`grit export`: a build as detector trainers read it (MM-Grounding-DINO's ODVG, MDETR's COCO-style JSON,
GRIT-20M parquet). Every exporter streams the build sample by sample and writes atomically."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from grit_pipeline.export.reader import ExportError, ExportResult

FORMATS = ("odvg", "mdetr", "grit20m")


def export_build(out: str | Path, fmt: str, to: str | Path, images_dir: str | Path | None = None) -> ExportResult:
    """Export the local build OUT to `to` in format `fmt` (odvg, mdetr or grit20m); raises ExportError."""
    from grit_pipeline.export.grit20m import export_grit20m
    from grit_pipeline.export.mdetr import export_mdetr
    from grit_pipeline.export.odvg import export_odvg

    exporters: dict[str, Callable[..., ExportResult]] = {"odvg": export_odvg, "mdetr": export_mdetr}
    if fmt == "grit20m":
        if images_dir is not None:
            raise ExportError("--images does not apply to --format grit20m (it exports no images)")
        return export_grit20m(out, to)
    if fmt not in exporters:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return exporters[fmt](out, to, images_dir)


__all__ = ["FORMATS", "ExportError", "ExportResult", "export_build"]
