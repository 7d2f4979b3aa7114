"""Resume and atomicity: reruns skip complete shards, other configs are refused, SIGKILL + rerun is byte-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from grit_pipeline.build import OutputInUseError, run_build
from grit_pipeline.cli import main
from grit_pipeline.config import BuildConfig
from grit_pipeline.fixtures.digests import shard_digests
from grit_pipeline.fixtures.synthetic import generate_scenes, write_scene_folder
from grit_pipeline.stages.serialize import SerializeConfig
from grit_pipeline.storage import Folder


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume") / "in"
    write_scene_folder(generate_scenes(12, seed=9, size=(48, 48)), folder)
    return folder


def _config(inputs: Path, out: Path, **options) -> BuildConfig:
    values = {"grounder": "annotations", "runner": "local", "samples_per_shard": 4, **options}
    return BuildConfig(inputs=(str(inputs),), out_dir=str(out), **values)


def _digests(out: Path) -> dict[str, str]:
    stats = [json.loads(p.read_text()) for p in (out / "shards").glob("*_stats.json")]
    assert all(s["written_by"]["pid"] > 0 and s["seconds"] >= 0 for s in stats)
    return shard_digests(out)


def test_rerun_skips_complete_shards_and_rebuilds_incomplete_ones(tmp_path: Path, captions: Path) -> None:
    out = tmp_path / "out"
    first = run_build(_config(captions, out))
    before = _digests(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("0*")}  # sizes.json is rewritten
    second = run_build(_config(captions, out, progress_interval=1.0))  # how a run goes is not its config
    assert second.skipped == 3 and second.manifest["timings"]["shards_processed"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("0*")} == mtimes
    assert second.manifest["totals"] == first.manifest["totals"]
    (out / "shards" / "00001_stats.json").unlink()
    (out / "shards" / "00001.tar").write_bytes(b"half a tar")
    third = run_build(_config(captions, out))
    assert third.skipped == 2 and _digests(out) == before


def test_another_config_is_refused_unless_overwrite(tmp_path: Path, captions: Path) -> None:
    out = tmp_path / "out"
    run_build(_config(captions, out))
    phrase_mode = _config(captions, out, serialize=SerializeConfig(mode="phrase"))
    with pytest.raises(OutputInUseError, match="different config"):
        run_build(phrase_mode)
    assert run_build(phrase_mode, overwrite=True).ok
    assert load_mode(out) == "phrase"
    outcome = CliRunner().invoke(main, ["build", str(captions), "--out", str(out), "--grounder", "annotations",
                                        "--runner", "local", "--samples-per-shard", "4"])
    assert outcome.exit_code != 0 and "--overwrite" in outcome.output


def load_mode(out: Path) -> str:
    from grit_pipeline.manifests.manifest import load_manifest

    return load_manifest(out)["config"]["serialize"]["mode"]


def test_a_folder_that_is_not_a_build_is_not_touched(tmp_path: Path, captions: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputInUseError, match="not empty"):
        run_build(_config(captions, out))
    assert (out / "precious.txt").read_text() == "keep me"


def _build_command(inputs: Path, out: Path) -> list[str]:
    grit = Path(sys.executable).parent / "grit"  # the console script installed next to this interpreter
    return [str(grit), "build", str(inputs), "--out", str(out),
            "--grounder", "annotations", "--runner", "local", "--samples-per-shard", "5", "--batch-size", "4"]


@pytest.mark.slow
def test_sigkill_then_rerun_gives_byte_identical_shards(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    write_scene_folder(generate_scenes(60, seed=2, size=(96, 96)), inputs)
    reference = tmp_path / "reference"
    subprocess.run(_build_command(inputs, reference), check=True, capture_output=True, env=_env())
    out = tmp_path / "out"
    for wanted_stats in (1, 4):  # kill twice at different points, then finish
        _run_until_killed(_build_command(inputs, out), out, wanted_stats)
    assert len(list((out / "shards").glob("*_stats.json"))) < 12, "the kills came too late to test anything"
    subprocess.run(_build_command(inputs, out), check=True, capture_output=True, env=_env())
    assert _digests(out) == _digests(reference)
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _run_until_killed(command: list[str], out: Path, wanted_stats: int) -> None:
    """Start the build and SIGKILL it once `wanted_stats` shards are complete (or it finished)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if len(list((out / "shards").glob("*_stats.json"))) >= wanted_stats if (out / "shards").is_dir() else False:
            break
        time.sleep(0.01)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()


def test_config_round_trips_and_its_fingerprint_ignores_only_where_it_runs(tmp_path: Path) -> None:
    config = _config(tmp_path, tmp_path / "out", serialize=SerializeConfig(mode="phrase"))
    again = BuildConfig.from_dict(config.to_dict())
    assert again == config and again.fingerprint() == config.fingerprint()
    elsewhere = _config(tmp_path, tmp_path / "other", runner="ray", ray_address="ray://head:10001")
    assert elsewhere.fingerprint() == _config(tmp_path, tmp_path / "out").fingerprint()
    assert _config(tmp_path, tmp_path / "out", stage_batch_size=7).fingerprint() != elsewhere.fingerprint()
    with pytest.raises(ValueError, match="key_digits"):
        _config(tmp_path, tmp_path / "out", key_digits=3, samples_per_shard=10_000)
    with pytest.raises(ValueError, match="grounder"):
        _config(tmp_path, tmp_path / "out", grounder="glip")


def test_two_builds_never_write_one_folder(tmp_path: Path, captions: Path) -> None:
    from grit_pipeline.build import output_lock

    out = tmp_path / "out"
    with output_lock(Folder(out)), pytest.raises(OutputInUseError, match="another grit build"):
        run_build(_config(captions, out))
    assert run_build(_config(captions, out)).ok  # the lock went with its holder


def test_resuming_after_an_input_changed_is_refused(tmp_path: Path, captions: Path) -> None:
    import shutil

    inputs = shutil.copytree(captions, tmp_path / "in")
    out = tmp_path / "out"
    assert run_build(_config(inputs, out)).ok
    lines = (inputs / "captions.jsonl").read_text().splitlines()
    (inputs / "captions.jsonl").write_text("\n".join(reversed(lines)) + "\n")  # same size, new content and mtime
    with pytest.raises(OutputInUseError, match="changed since"):
        run_build(_config(inputs, out))
    assert run_build(_config(inputs, out), overwrite=True).ok
