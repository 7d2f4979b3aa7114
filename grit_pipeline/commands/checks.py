"""Checks every command that builds or grounds makes before it writes anything: the detector, the CLIP
model, the spaCy model and the Ray cluster are there, each failure one line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click


def require_detector(config: Any) -> None:
    """Exit 2 before anything is written when GroundingDINO is needed but its checkpoint cannot be found,
    with the line `grit ground` prints for the same detector."""
    if config.grounder != "grounding-dino" or all(str(p).endswith(".parquet") for p in config.inputs):
        return  # GRIT-20M parquet rows carry their boxes: the detector is never loaded for them
    import dataclasses

    from grit_pipeline.commands.ground import detector_unavailable
    from grit_pipeline.stages.detector_loading import DetectorUnavailableError, ensure_detector_available

    try:
        ensure_detector_available(config.grounding)
        if config.agreement.enabled:  # the second detector must be there too
            ensure_detector_available(dataclasses.replace(config.grounding, detector=config.agreement.detector,
                                                          revision=None))
    except DetectorUnavailableError as exc:
        detector_unavailable(exc)


def require_clip_model(config: Any) -> None:
    """Exit 2 before anything is written when a CLIP model is given but its checkpoint cannot be found."""
    if config.clip.model is None:
        return
    from grit_pipeline.commands.ground import detector_unavailable
    from grit_pipeline.stages.clip import ClipUnavailableError, ensure_clip_available

    try:
        ensure_clip_available(config.clip)
    except ClipUnavailableError as exc:
        detector_unavailable(exc)  # the same one line and exit status 2 as a missing detector


def require_spacy_model(config: Any) -> None:
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


def require_ray_cluster(config: Any) -> None:
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


class PathOrUrl(click.ParamType):
    """A local path or a URL (s3://, gs://, ...; checked later by the command itself). A local path must exist
    unless `exists` is False, and must not be a file when `folder`."""

    name = "PATH|URL"

    def __init__(self, exists: bool = True, folder: bool = False) -> None:
        self.exists = exists
        self.folder = folder

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """The value as given; a local path that breaks the rules above is a usage error."""
        from grit_pipeline.storage import is_url

        text = os.fspath(value)
        if is_url(text) and not text.startswith("file://"):
            return text
        local = text.removeprefix("file://")
        if self.exists and not os.path.exists(local):
            self.fail(f"{text!r} does not exist", param, ctx)
        if self.folder and os.path.isfile(local):
            self.fail(f"{text!r} is a file, not a folder", param, ctx)
        return text


class StorageOptions(click.ParamType):
    """--storage-options: a JSON object passed to fsspec's filesystem of every URL."""

    name = "JSON"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dict[str, Any]:
        """The parsed object."""
        from grit_pipeline.storage import parse_storage_options

        if isinstance(value, dict):
            return value
        try:
            return parse_storage_options(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


STORAGE_OPTIONS_HELP = ("fsspec storage options for every URL, as a JSON object (e.g. '{\"anon\": true}'); S3's "
                        "endpoint, region and credentials come from the AWS environment variables and files.")
