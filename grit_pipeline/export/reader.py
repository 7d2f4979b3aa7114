"""What every exporter shares: open a local build, stream its kept samples from the tars, group a sample's
boxes by span in pixels of the stored image, and stage an images folder that appears only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grit_pipeline.records import GritRecord, MalformedRecordError


class ExportError(Exception):
    """An export that cannot be made (no build, a damaged shard, an unwritable target); the message says why."""


@dataclass(slots=True)
class ExportResult:
    """What an export wrote: the file, the images folder (if any) and counts."""

    path: Path
    format: str
    samples: int = 0
    skipped: int = 0
    boxes: int = 0
    images_dir: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the terminal."""
        parts = [f"wrote {self.path} ({self.format}): {self.samples} samples"]
        if self.format != "grit20m":
            parts.append(f", {self.boxes} boxes")
        if self.skipped:
            parts.append(f", {self.skipped} kept samples skipped (no box of at least 1 pixel)")
        if self.images_dir is not None:
            parts.append(f"; images in {self.images_dir}")
        return "".join(parts)


@dataclass(slots=True)
class KeptSample:
    """One kept sample read back from a shard tar: its record, image bytes and stored image size."""

    key: str
    record: GritRecord
    image: bytes
    stored_width: int
    stored_height: int


@dataclass(slots=True)
class Region:
    """One span of a caption with all its boxes, as absolute (x1, y1, x2, y2) pixels of the stored image."""

    start: int
    end: int
    phrase: str
    boxes: list[list[float]]


def open_build(out: str | Path) -> tuple[Path, dict[str, Any]]:
    """The build folder and its manifest; ExportError when OUT is not a readable local build."""
    from grit_pipeline.manifests.manifest import ManifestError, load_manifest

    folder = Path(out)
    if "://" in str(out):
        raise ExportError(f"{out}: only local builds can be exported for now (give a folder path)")
    if not folder.is_dir():
        raise ExportError(f"{out}: no such build folder")
    try:
        manifest = load_manifest(folder)
    except ManifestError as exc:
        raise ExportError(f"{out} is not a finished grit build: {exc}") from exc
    return folder, manifest


def serialize_mode(manifest: dict[str, Any]) -> str:
    """The build's span mode (`expression` or `phrase`) from its manifest config."""
    return str(manifest.get("config", {}).get("serialize", {}).get("mode", "expression"))


def incomplete_shards(manifest: dict[str, Any]) -> list[str]:
    """Warnings for the shards the manifest records as not complete (they are not exported)."""
    return [f"shard {entry['name']} is {entry['status']}, not exported; rerun the build to complete it"
            for entry in manifest["shards"] if entry["status"] != "complete"]


def iter_kept_samples(out: Path, manifest: dict[str, Any]) -> Iterator[KeptSample]:
    """Every kept sample of the complete shards, in shard and key order, one tar member group at a time."""
    from grit_pipeline.inputs.tar import iter_tar_groups, json_member

    for entry in manifest["shards"]:
        if entry["status"] != "complete" or not entry.get("tar"):
            continue
        path = out / "shards" / entry["tar"]
        if not path.is_file():
            raise ExportError(f"{path}: listed in the manifest but missing")
        errors: list[str] = []
        skipped: list[str] = []
        count = 0
        for group in iter_tar_groups(path, errors, skipped=skipped):
            problems = group.problems + skipped
            if problems:
                raise ExportError(f"{path.name}: {problems[0]}")
            meta, problem = json_member(group.members.get("json"))
            image = group.members.get("jpg")
            if problem or not meta or image is None:
                raise ExportError(f"{path.name}: sample {group.key} lacks its {'.json' if image else '.jpg'} "
                                  f"({problem or 'missing'})")
            try:
                record = GritRecord.from_row(meta)
                width, height = int(meta["stored_width"]), int(meta["stored_height"])
            except (MalformedRecordError, KeyError, TypeError, ValueError) as exc:
                raise ExportError(f"{path.name}: sample {group.key}: bad .json: {exc}") from exc
            count += 1
            yield KeptSample(group.key, record, image, width, height)
        if errors or skipped:
            raise ExportError((errors + skipped)[0])
        if count != entry.get("samples", count):
            raise ExportError(f"{path.name}: {count} samples read, the manifest says {entry['samples']}")


def pixel_box(values: tuple[float, float, float, float], width: int, height: int) -> list[float] | None:
    """A normalised (x1, y1, x2, y2) box as pixels of a width x height image, clamped to it and rounded to
    3 decimals (as mmdetection's grit2odvg.py does); None when under 1 pixel wide or high (ODVG drops those)."""
    x1, y1, x2, y2 = (min(1.0, max(0.0, v)) for v in values)
    box = [round(x1 * width, 3), round(y1 * height, 3), round(x2 * width, 3), round(y2 * height, 3)]
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        return None
    return box


def regions_of(sample: KeptSample, mode: str) -> list[Region]:
    """One region per (whitespace-trimmed) span of the build's span mode, with all its distinct pixel boxes,
    in caption order; spans without a usable box are left out."""
    from grit_pipeline.stages.serialize import SerializeConfig, serialized_entries, trim_span

    record = sample.record
    caption = record.caption
    regions: dict[tuple[int, int], Region] = {}
    for entry in serialized_entries(record, SerializeConfig(mode=mode)):
        if entry.span.end > len(caption) or not entry.box.is_finite():
            continue
        start, end = trim_span(entry.span.start, entry.span.end, caption)
        if start == end:
            continue
        box = pixel_box(entry.box.as_tuple(), sample.stored_width, sample.stored_height)
        if box is None:
            continue
        region = regions.setdefault((start, end), Region(start, end, caption[start:end], []))
        if box not in region.boxes:
            region.boxes.append(box)
    return [regions[span] for span in sorted(regions)]


def default_images_dir(to: Path) -> Path:
    """`FILE.parent/<stem>_images`, where the images of FILE are exported by default."""
    return to.parent / f"{to.stem}_images"


def image_prefix(images_dir: Path, base: Path) -> str:
    """The images folder relative to `base` (POSIX, ending in `/`; empty when it is `base`), else absolute."""
    try:
        prefix = Path(os.path.relpath(images_dir.resolve(), base.resolve())).as_posix()
    except ValueError:
        prefix = images_dir.resolve().as_posix()
    return "" if prefix == "." else prefix + "/"


def check_targets(out: Path, to: Path, images_dir: Path | None) -> None:
    """Refuse targets inside the build, or an images folder that holds anything but a previous export's images."""
    build = out.resolve()
    for target in (to, images_dir):
        if target is not None and (target.resolve() == build or build in target.resolve().parents):
            raise ExportError(f"{target}: an export is not written inside the build {out}")
    if images_dir is not None and images_dir.exists():
        if not images_dir.is_dir():
            raise ExportError(f"{images_dir}: exists and is not a folder")
        strays = [p.name for p in images_dir.iterdir() if not (p.is_file() and p.suffix == ".jpg")]
        if strays:
            raise ExportError(f"{images_dir}: holds {strays[0]!r}, not a previous export's images; "
                              "choose another --images folder")


@contextlib.contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; on success it replaces `final` (a previous export's images),
    on an exception it is removed and `final` is left as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_image(folder: Path, key: str, data: bytes) -> None:
    """Write one sample's stored image bytes as KEY.jpg (the build's own bytes, unchanged)."""
    (folder / f"{key}.jpg").write_bytes(data)
