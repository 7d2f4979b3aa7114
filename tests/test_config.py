"""BuildConfig: validation, the saved round trip, and what the resume fingerprint covers."""

from __future__ import annotations

import dataclasses

import pytest

from grit_pipeline.config import BuildConfig
from grit_pipeline.stages.detector_loading import GroundingConfig


def _config(**options) -> BuildConfig:
    return BuildConfig(**{"inputs": ("in",), "out_dir": "out", **options})


def test_round_trip_through_dict():
    config = _config(grounder="annotations", runner="local", stage_batch_size=7)
    assert BuildConfig.from_dict(config.to_dict()) == config


def test_invalid_values_are_refused():
    with pytest.raises(ValueError, match="grounder"):
        _config(grounder="glip")
    with pytest.raises(ValueError, match="stage_batch_size"):
        _config(stage_batch_size=0)
    with pytest.raises(ValueError, match="input"):
        BuildConfig(inputs=(), out_dir="out")


def test_fingerprint_ignores_where_and_how_fast_but_not_what_is_written():
    base = _config()
    same = [
        _config(runner="local", ray_address="ray://head:10001", out_dir="elsewhere", progress_interval=1.0),
        _config(grounding=dataclasses.replace(GroundingConfig(), preprocess_threads=3, local_files_only=True)),
    ]
    different = [
        _config(stage_batch_size=32),
        _config(grounding=dataclasses.replace(GroundingConfig(), box_threshold=0.5)),
        _config(grounding=dataclasses.replace(GroundingConfig(), dtype="float32")),
        _config(inputs=("other",)),
    ]
    assert all(c.fingerprint() == base.fingerprint() for c in same)
    assert all(c.fingerprint() != base.fingerprint() for c in different)


def test_the_cli_and_the_api_make_the_same_config(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from grit_pipeline.cli import main
    from grit_pipeline.config import build_config
    from grit_pipeline.fixtures.synthetic import generate_scenes, write_scene_folder

    folder = write_scene_folder(generate_scenes(2, seed=1, size=(48, 48)), tmp_path / "in").parent
    options = {"grounder": "annotations", "runner": "local", "nms_iou": "off", "box_threshold": 0.5}
    result = CliRunner().invoke(main, ["build", str(folder), "--out", str(tmp_path / "out"), "--grounder",
                                       "annotations", "--runner", "local", "--nms-iou", "off", "--box-threshold", "0.5"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["config"]
    api = build_config((str(folder),), str(tmp_path / "out"), **options)
    assert saved == api.to_dict()
    assert api.grounding.nms_iou is None and api.annotations.nms_iou is None and api.grounding.box_threshold == 0.5


def test_a_saved_config_reaches_every_stage_field_and_flags_override_it(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from grit_pipeline.cli import main
    from grit_pipeline.fixtures.synthetic import generate_scenes, write_scene_folder

    folder = write_scene_folder(generate_scenes(2, seed=1, size=(48, 48)), tmp_path / "in").parent
    config = {"inputs": [str(folder)], "out_dir": str(tmp_path / "out"), "grounder": "annotations",
              "runner": "local", "image": {"jpeg_quality": 80}, "text": {"pipe_batch_size": 3},
              "serialize": {"mode": "phrase"}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["build", "--config", str(path), "--mode", "expression"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["config"]
    assert saved["image"]["jpeg_quality"] == 80 and saved["text"]["pipe_batch_size"] == 3
    assert saved["serialize"]["mode"] == "expression"  # the flag wins over the file
    rerun = CliRunner().invoke(main, ["build", "--config", str(tmp_path / "out" / "config.json")])
    assert rerun.exit_code == 0 and "1 skipped" in rerun.output  # the saved config resumes its own build
    bad = CliRunner().invoke(main, ["build", "--config", str(path), "--out", str(tmp_path / "o2"), "--grounder", "glip"])
    assert bad.exit_code == 2
