"""User errors are messages: every command, given each kind of bad argument, exits non-zero with a short
message on stderr, prints no traceback and writes nothing (issue 10, section 3).

Each case runs `python -m grit_pipeline` in a sandbox folder of its own (real stderr, so a traceback printed
by anything is seen), several at a time; the sandbox's files are compared before and after. The hub is
offline (HF_HUB_OFFLINE=1) except in the case that tests the unreachable-hub probe, whose endpoint is a
closed loopback port.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from grit_pipeline.fixtures.synthetic import generate_scenes, write_scene_folder

HUB_ID = "IDEA-Research/grounding-dino-tiny"
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def _closed_port() -> int:
    """A loopback port nothing listens on (connecting is refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


CLOSED_PORT = _closed_port()


@dataclass(frozen=True)
class Case:
    """One command line in a fresh sandbox; `says`: words the message must contain."""

    id: str
    args: tuple[str, ...]
    says: str = ""
    exit_code: int | None = None  # None: any non-zero code
    stdin: str | None = None  # a sandbox file fed to stdin
    stream: str = "stderr"  # where the message goes (audit's report is its stdout)
    online: bool = False  # no HF_HUB_OFFLINE; the hub endpoint is a closed port
    env: dict[str, str] = field(default_factory=dict)


def _build(*args: str) -> tuple[str, ...]:
    return ("build", *args, "--runner", "local")


def _ground(*args: str) -> tuple[str, ...]:
    return ("ground", "scenes", "scenes/captions.jsonl", *args)


def _generate(*args: str) -> tuple[str, ...]:
    return ("generate", *args) if "--image" in args else ("generate", *args, "--image", "img.png")


CASES = [
    # grit phrases
    Case("phrases-bad-option", ("phrases", "--batch-size", "0", "a dog"), "--batch-size", 2),
    Case("phrases-missing-word-list", ("phrases", "--abstract-nouns", "nope.txt", "a dog"), "does not exist", 2),
    Case("phrases-binary-word-list", ("phrases", "--abstract-nouns", "scenes/000000.jpg", "a dog"), "--abstract-nouns"),
    Case("phrases-missing-spacy-model", ("phrases", "--spacy-model", "no_such_model", "a dog"), "not installed"),
    Case("phrases-garbage-stdin", ("phrases",), "none of the 1 line", stdin="garbage.json"),
    # grit serialize
    Case("serialize-missing-path", ("serialize", "nope.parquet"), "no such file"),
    Case("serialize-folder", ("serialize", "empty"), "a folder"),
    Case("serialize-garbage-parquet", ("serialize", "garbage.parquet"), "cannot read"),
    Case("serialize-garbage-stdin", ("serialize",), "none of the 1 row", stdin="garbage.json"),
    Case("serialize-binary-stdin", ("serialize",), "not text", stdin="scenes/000000.jpg"),
    Case("serialize-bad-option", ("serialize", "--grid", "0"), "--grid", 2),
    # grit ground
    Case("ground-missing-images", ("ground", "nope", "scenes/captions.jsonl"), "does not exist", 2),
    Case("ground-captions-is-folder", ("ground", "scenes", "empty"), "is a directory", 2),
    Case("ground-garbage-captions", ("ground", "scenes", "garbage.json", "--grounder", "annotations"), "none of its"),
    Case("ground-binary-captions", ("ground", "scenes", "scenes/000000.jpg", "--grounder", "annotations"),
         "not a text file"),
    Case("ground-bad-option", _ground("--box-threshold", "2"), "--box-threshold", 2),
    Case("ground-missing-detector", _ground("--detector", "/nonexistent/detector"), "does not exist", 2),
    Case("ground-detector-is-empty-folder", _ground("--detector", "empty"), "no config.json", 2),
    Case("ground-hub-id-offline", _ground("--detector", HUB_ID), "offline", 2),
    Case("ground-hub-unreachable", _ground("--detector", HUB_ID), "cannot be reached", 2, online=True),
    # grit build
    Case("build-missing-input", _build("nope", "--out", "OUT"), "does not exist", 2),
    Case("build-empty-folder", _build("empty", "--out", "OUT", "--grounder", "annotations"), "not an img2dataset"),
    Case("build-file-input", _build("afile.txt", "--out", "OUT", "--grounder", "annotations"), "not an img2dataset"),
    Case("build-garbage-parquet", _build("garbage.parquet", "--out", "OUT"), "garbage.parquet"),
    Case("build-bad-input-into-empty-out", _build("empty", "--out", "emptyout", "--grounder", "annotations"),
         "not an img2dataset"),
    Case("build-missing-detector", _build("scenes", "--out", "OUT", "--detector", "/nonexistent/detector"),
         "does not exist", 2),
    Case("build-hub-id-offline", _build("scenes", "--out", "OUT", "--detector", HUB_ID), "offline", 2),
    Case("build-missing-spacy-model",
         _build("scenes", "--out", "OUT", "--grounder", "annotations", "--spacy-model", "no_such_model"),
         "not installed"),
    Case("build-bad-option", _build("scenes", "--out", "OUT", "--samples-per-shard", "0"), "--samples-per-shard", 2),
    Case("build-out-is-file", _build("scenes", "--out", "afile.txt", "--grounder", "annotations"), "is a file", 2),
    Case("build-out-not-a-build", _build("scenes", "--out", "notabuild", "--grounder", "annotations"), "not empty"),
    Case("build-unreachable-ray", ("build", "scenes", "--out", "OUT", "--grounder", "annotations",
                                   "--ray-address", f"127.0.0.1:{CLOSED_PORT}"), "cannot reach the Ray cluster"),
    # grit audit / inspect
    Case("audit-missing", ("audit", "nope"), "does not exist", 2),
    Case("audit-file", ("audit", "afile.txt"), "is a file", 2),
    Case("audit-not-a-build", ("audit", "empty"), "holds no grit build", 2),
    Case("audit-garbage-manifest", ("audit", "badbuild"), "manifest", 1, stream="stdout"),
    Case("inspect-missing", ("inspect", "nope"), "does not exist", 2),
    Case("inspect-not-a-build", ("inspect", "empty"), "holds no grit build", 2),
    Case("inspect-garbage-manifest", ("inspect", "badbuild"), "cannot read"),
    Case("inspect-html-into-missing-folder", ("inspect", "badbuild", "--html", "nodir/x.html"), "does not exist"),
    # grit train
    Case("train-missing-shards", ("train", "--shards", "nope", "--out", "RUN"), "no shards at nope"),
    Case("train-empty-shards", ("train", "--shards", "empty", "--out", "RUN"), "no .tar shards"),
    Case("train-garbage-shard", ("train", "--shards", "garbage.tar", "--out", "RUN", "--workers", "1"),
         "no sample with a caption"),
    Case("train-bad-preset", ("train", "--shards", "garbage.tar", "--out", "RUN", "--preset", "nope"), "preset"),
    Case("train-bad-device", ("train", "--shards", "garbage.tar", "--out", "RUN", "--device", "nope"), "--device"),
    Case("train-missing-init", ("train", "--shards", "garbage.tar", "--out", "RUN", "--init", "/nonexistent/ckpt"),
         "--init"),
    Case("train-out-is-file", ("train", "--shards", "garbage.tar", "--out", "afile.txt"), "is a file", 2),
    Case("train-resume-garbage-config", ("train", "--shards", "garbage.tar", "--out", "badrun", "--resume"),
         "cannot resume"),
    # grit generate
    Case("generate-missing-checkpoint", _generate("--checkpoint", "/nonexistent/ckpt"), "does not exist"),
    Case("generate-hub-id-offline", _generate("--checkpoint", "no-such-owner/no-such-model"), "offline"),
    Case("generate-empty-checkpoint", _generate("--checkpoint", "emptyckpt"), "not a Kosmos-2 checkpoint"),
    Case("generate-run-without-checkpoint", _generate("--checkpoint", "emptyrun"), "latest"),
    Case("generate-garbage-image", _generate("--checkpoint", "emptyckpt", "--image", "garbage.json"),
         "as an image"),
    Case("generate-missing-image", _generate("--checkpoint", "emptyckpt", "--image", "nope.png"), "does not exist", 2),
    Case("generate-png-into-missing-folder", _generate("--checkpoint", "emptyckpt", "--png", "nodir/x.png"),
         "does not exist"),
    # grit bench
    Case("bench-unknown", ("bench", "nope"), "No such command", 2),
    Case("bench-loader-missing-shards", ("bench", "loader", "--shards", "nope"), "no shards at nope"),
    Case("bench-loader-garbage-shard", ("bench", "loader", "--shards", "garbage.tar", "--samples", "10",
                                        "--repeats", "1"), "cannot read the shards"),
    Case("bench-detector-missing", ("bench", "detector", "--detector", "/nonexistent/detector"), "does not exist", 2),
    Case("bench-pipeline-bad-option", ("bench", "pipeline", "--runner", "nope"), "--runner", 2),
]
# Pairs that must print the very same line: a missing detector, whichever command meets it.
SAME_MESSAGE = [("build-missing-detector", "ground-missing-detector"), ("build-missing-detector", "bench-detector-missing"),
                ("build-hub-id-offline", "ground-hub-id-offline")]


def _fixtures(root: Path) -> Path:
    """The files every sandbox starts with: good inputs to pair with the bad ones, and the bad ones."""
    write_scene_folder(generate_scenes(3, seed=3, size=(48, 48)), root / "scenes")
    for folder in ("empty", "emptyout", "emptyckpt", "emptyrun", "notabuild", "badbuild", "badrun"):
        (root / folder).mkdir()
    (root / "afile.txt").write_text("hello\n")
    (root / "garbage.json").write_text("{not json\n")
    (root / "garbage.parquet").write_text("not a parquet file\n")
    (root / "garbage.tar").write_text("not a tar file\n")
    (root / "emptyrun" / "latest").write_text("step_00000001")
    (root / "notabuild" / "precious.txt").write_text("keep me")
    (root / "badbuild" / "manifest.json").write_text("{not json")
    (root / "badrun" / "config.json").write_text("{not json")
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 30)).save(root / "img.png")
    return root


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its content digest (folders: 'dir')."""
    tree = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        tree[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    before: dict[str, str]
    after: dict[str, str]


def _env(case: Case, hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE")}
    env.update({"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **case.env})
    if case.online:
        env.pop("HF_HUB_OFFLINE")
        for name in _PROXY_VARIABLES:
            env.pop(name, None)
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{CLOSED_PORT}"
    return env


def _run(case: Case, template: Path, base: Path, hf_home: Path) -> Outcome:
    sandbox = base / case.id
    shutil.copytree(template, sandbox)
    before = _snapshot(sandbox)
    stdin = open(sandbox / case.stdin, "rb") if case.stdin else subprocess.DEVNULL  # noqa: SIM115
    try:
        done = subprocess.run([sys.executable, "-m", "grit_pipeline", *case.args], cwd=sandbox, stdin=stdin,
                              capture_output=True, text=True, env=_env(case, hf_home), timeout=300)
    finally:
        if case.stdin:
            stdin.close()
    return Outcome(done.returncode, done.stdout, done.stderr, before, _snapshot(sandbox))


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> dict[str, Outcome]:
    """Every selected case (and the SAME_MESSAGE pairs), run a few at a time."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if getattr(item, "originalname", "") == "test_a_bad_argument_is_a_message_and_writes_nothing"}
    if any(getattr(item, "originalname", "") == "test_commands_say_the_same_about_a_missing_detector"
           for item in request.session.items):
        selected |= {name for pair in SAME_MESSAGE for name in pair}
    template = _fixtures(tmp_path_factory.mktemp("template"))
    base, hf_home = tmp_path_factory.mktemp("sandboxes"), tmp_path_factory.mktemp("hf-home")
    cases = [case for case in CASES if case.id in selected]
    with ThreadPoolExecutor(max_workers=min(4, (os.cpu_count() or 1) + 1)) as pool:
        results = pool.map(lambda case: _run(case, template, base, hf_home), cases)
        return {case.id: outcome for case, outcome in zip(cases, results, strict=True)}


@pytest.mark.integration  # ~60 `python -m grit_pipeline` processes: about 2 minutes on 2 cores
@pytest.mark.timeout(600)  # the first case pays for the module fixture that runs them all
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_bad_argument_is_a_message_and_writes_nothing(case: Case, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes[case.id]
    shown = f"exit {outcome.returncode}\n--- stdout\n{outcome.stdout}\n--- stderr\n{outcome.stderr}"
    assert outcome.returncode != 0, shown
    if case.exit_code is not None:
        assert outcome.returncode == case.exit_code, shown
    assert "Traceback" not in outcome.stderr + outcome.stdout, shown
    message = outcome.stderr if case.stream == "stderr" else outcome.stdout
    lines = [line for line in message.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 4, shown  # one line, or click's usage line, hint and error
    assert case.says in message, shown
    if case.stream == "stderr":
        assert outcome.stdout == "", shown  # nothing half-printed either
    assert outcome.after == outcome.before, "files changed: " + str(
        sorted(set(outcome.after.items()) ^ set(outcome.before.items())))


@pytest.mark.integration  # shares the subprocess fixture above
@pytest.mark.timeout(600)
def test_commands_say_the_same_about_a_missing_detector(outcomes: dict[str, Outcome]) -> None:
    for first, second in SAME_MESSAGE:
        assert outcomes[first].stderr == outcomes[second].stderr, (first, second)
        assert outcomes[first].stderr.startswith("grit: ") and len(outcomes[first].stderr.splitlines()) == 1


# ---------------------------------------------------------------------------------------- in process


def test_offline_never_touches_the_network(monkeypatch, tmp_path) -> None:
    from grit_pipeline.model.generate import CheckpointError, resolve_checkpoint
    from grit_pipeline.stages.detector_loading import (
        DetectorUnavailableError,
        GroundingConfig,
        ensure_detector_available,
    )

    def no_network(*args, **kwargs):
        raise AssertionError("the network was touched while offline")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(DetectorUnavailableError, match="offline"):
        ensure_detector_available(GroundingConfig(detector=HUB_ID))
    with pytest.raises(CheckpointError, match="offline"):
        resolve_checkpoint("no-such-owner/no-such-model")


def test_the_hub_probe_honours_hf_endpoint(monkeypatch) -> None:
    from grit_pipeline.stages.detector_loading import hub_unreachable

    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{CLOSED_PORT}")
    assert f"127.0.0.1:{CLOSED_PORT} cannot be reached" in (hub_unreachable(timeout=3.0) or "")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_unreachable(timeout=3.0) is None


def test_a_build_that_stops_before_any_shard_leaves_out_as_it_was(monkeypatch, tmp_path) -> None:
    """Refused inputs and a runner that cannot start leave no OUT behind; a build whose model could not load
    (every shard failed, none written) does not block the build that follows the fix."""
    import grit_pipeline.build as build_module
    from grit_pipeline.build import run_build
    from grit_pipeline.config import BuildConfig
    from grit_pipeline.inputs import InputError
    from grit_pipeline.stages.text import TextConfig

    scenes = tmp_path / "in"
    write_scene_folder(generate_scenes(3, seed=4, size=(48, 48)), scenes)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"

    def config(inputs: Path, **options) -> BuildConfig:
        return BuildConfig(inputs=(str(inputs),), out_dir=str(out), grounder="annotations", runner="local", **options)

    with pytest.raises(InputError):
        run_build(config(tmp_path / "empty"))
    assert not out.exists()

    def runner_that_cannot_start(*args):
        raise RuntimeError("the cluster is down")

    monkeypatch.setattr(build_module, "runner_for", lambda config: runner_that_cannot_start)
    with pytest.raises(RuntimeError, match="cluster is down"):
        run_build(config(scenes))
    assert not out.exists()
    monkeypatch.undo()

    no_model = run_build(config(scenes, text=TextConfig(spacy_model="no_such_spacy_model")))
    assert not no_model.ok and no_model.manifest["totals"]["shards_complete"] == 0
    fixed = run_build(config(scenes))  # another config: refused before, when OUT held a build that kept nothing
    assert fixed.ok and fixed.manifest["totals"]["kept"] == 3
