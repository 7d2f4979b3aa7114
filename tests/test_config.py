"""BuildConfig: validation, the saved round trip, and what the resume fingerprint covers."""

from __future__ import annotations

import dataclasses

import pytest

from grit_pipeline.config import BuildConfig
from grit_pipeline.stages.detector_loading import GroundingConfig


def _config(**options) -> BuildConfig:
    return BuildConfig(**{"inputs": ("in",), "out_dir": "out", **options})


def test_round_trip_through_dict():
    config = _config(grounder="annotations", runner="local", batch_size=7)
    assert BuildConfig.from_dict(config.to_dict()) == config


def test_invalid_values_are_refused():
    with pytest.raises(ValueError, match="grounder"):
        _config(grounder="glip")
    with pytest.raises(ValueError, match="batch_size"):
        _config(batch_size=0)
    with pytest.raises(ValueError, match="input"):
        BuildConfig(inputs=(), out_dir="out")


def test_fingerprint_ignores_where_and_how_fast_but_not_what_is_written():
    base = _config()
    same = [
        _config(runner="local", ray_address="ray://head:10001", out_dir="elsewhere", progress_interval=1.0),
        _config(grounding=dataclasses.replace(GroundingConfig(), preprocess_threads=3, local_files_only=True)),
    ]
    different = [
        _config(batch_size=32),
        _config(grounding=dataclasses.replace(GroundingConfig(), box_threshold=0.5)),
        _config(grounding=dataclasses.replace(GroundingConfig(), dtype="float32")),
        _config(inputs=("other",)),
    ]
    assert all(c.fingerprint() == base.fingerprint() for c in same)
    assert all(c.fingerprint() != base.fingerprint() for c in different)
