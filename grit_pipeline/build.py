"""Orchestration of `grit build`: plan shards, guard the output folder, run a runner, write the manifest.

What runs is the stage list (`grit_pipeline.stages.stage_list`); where it runs is a runner
(`grit_pipeline.runners.local` or `.ray`), given that list, the pending shards and the shard sink
(`grit_pipeline.runners.base`), which writes every finished shard.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from grit_pipeline.config import BuildConfig
from grit_pipeline.inputs import InputShard, discover_shards, fingerprint_inputs
from grit_pipeline.io import write_json_atomic
from grit_pipeline.manifests.manifest import (
    CONFIG_FILE,
    MANIFEST_FILE,
    SIZES_FILE,
    ManifestError,
    build_manifest,
    load_manifest,
    shard_entry,
    write_manifest,
)
from grit_pipeline.runners.base import Progress, Runner, ShardSink
from grit_pipeline.shards import (
    SHARDS_DIR,
    ShardPaths,
    read_stats,
    remove_stale_temporaries,
    shard_name,
)

LOCK_FILE = ".grit-build.lock"


class OutputInUseError(RuntimeError):
    """OUT holds a build made with another config (or something else) and --overwrite was not given."""


@dataclass(slots=True)
class BuildResult:
    """What a build did: the manifest written, and the shards that failed."""

    manifest: dict[str, Any]
    failures: dict[int, str]
    skipped: int

    @property
    def ok(self) -> bool:
        """True when every shard is complete."""
        return not self.manifest["failed_shards"]


def prepare_output(config: BuildConfig, overwrite: bool, write: bool = True) -> None:
    """Refuse an OUT holding another build unless `overwrite`; with it, remove the old build's files.

    A build in OUT that finished no shard (it stopped before any: a model that could not load, say) holds
    nothing to lose and is replaced as with `overwrite`, so the build that follows the fix is not refused.
    With `write=False` only the refusal is checked, and nothing is created or changed.
    """
    out = Path(config.out_dir)
    saved = out / CONFIG_FILE
    ours = [saved, out / MANIFEST_FILE, out / SHARDS_DIR / SIZES_FILE]
    shards = out / SHARDS_DIR
    if out.exists() and not out.is_dir():
        raise OutputInUseError(f"{out} is a file, not a folder; choose another --out")
    if saved.is_file():
        try:
            previous = json.loads(saved.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            previous = None
        if previous != config.fingerprint():
            finished = shards.is_dir() and any(p.name[:1].isdigit() for p in shards.iterdir())
            if finished and not overwrite:
                raise OutputInUseError(
                    f"{out} holds a build made with a different config (fingerprint {str(previous)[:12]} vs "
                    f"{config.fingerprint()[:12]}); pass --overwrite to replace it, or choose another --out")
            overwrite = True  # nothing finished: nothing to lose
    elif out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()) and not overwrite:
        raise OutputInUseError(f"{out} is not empty and holds no grit build; pass --overwrite or choose another --out")
    if not write:
        return
    if overwrite:
        for path in ours:
            path.unlink(missing_ok=True)
        if shards.is_dir():
            for path in shards.iterdir():
                if path.is_file() and (path.name[:1].isdigit() or path.name.startswith(".")):
                    path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved, {"config": config.to_dict(), "fingerprint": config.fingerprint()})


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on OUT for the whole build, so two builds never write one folder.

    flock locks die with their process, so a killed build never leaves a stale lock behind.
    """
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise OutputInUseError(f"another grit build is writing to {out}") from exc
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def run_build(config: BuildConfig, overwrite: bool = False, stream: TextIO = sys.stderr) -> BuildResult:
    """Build (or resume) the output of `config`; returns the manifest and failures (never raises on a shard).

    What can refuse a build is checked before OUT is touched: the inputs are discovered (InputError names
    the input that cannot be read) and OUT is checked (OutputInUseError), so a refused build leaves OUT as
    it was. A build that created OUT and raises before any shard is written removes OUT again.
    """
    import shutil

    from grit_pipeline.inputs import InputError

    started = time.time()
    shards: list[InputShard] = []
    for raw in config.inputs:  # one input at a time, so that an error names its input
        try:
            shards += discover_shards([raw], config.samples_per_shard, config.images_dir)
        except InputError:
            raise
        except (OSError, ValueError) as exc:
            raise InputError(f"{raw}: cannot be read as a build input ({type(exc).__name__}: {exc})") from exc
    prepare_output(config, overwrite, write=False)
    out = Path(config.out_dir)
    created = not out.exists()
    with output_lock(out):
        try:
            return _run_build(config, overwrite, stream, shards, started)
        except BaseException:
            folder = out / SHARDS_DIR
            if created and not (folder.is_dir() and any(p.name[:1].isdigit() for p in folder.iterdir())):
                shutil.rmtree(out, ignore_errors=True)  # there was no OUT, and no shard was written into it
            raise


def _run_build(config: BuildConfig, overwrite: bool, stream: TextIO, shards: list[InputShard],
               started: float) -> BuildResult:
    prepare_output(config, overwrite)
    folder = Path(config.out_dir) / SHARDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    pending = [(i, s) for i, s in enumerate(shards) if not ShardPaths(folder, i).is_complete()]
    progress = Progress(total_shards=len(shards), interval=config.progress_interval, stream=stream)
    progress.shards_done = len(shards) - len(pending)
    sink = ShardSink(config, progress)
    run_started = time.time()
    if pending:
        from grit_pipeline.stages.stage_list import build_stages

        runner_for(config)(config, build_stages(config), pending, sink, progress)
    run_seconds = time.time() - run_started
    steady = progress.steady_rate()
    manifest = _finish(config, shards, sink, {"started_unix": round(started, 3), "run_seconds": round(run_seconds, 3),
                                              "total_seconds": round(time.time() - started, 3),
                                              "shards_processed": len(pending), "samples_processed": progress.samples,
                                              "steady_samples_per_s": round(steady, 1) if steady else None})
    return BuildResult(manifest, dict(sink.failures), len(shards) - len(pending))


def runner_for(config: BuildConfig) -> Runner:
    """The run function of the configured runner."""
    if config.runner == "local":
        from grit_pipeline.runners.local import run_local

        return run_local
    from grit_pipeline.runners.ray import run_ray

    return run_ray


def _finish(config: BuildConfig, shards: list[InputShard], sink: ShardSink, timings: dict[str, Any]) -> dict[str, Any]:
    folder = Path(config.out_dir) / SHARDS_DIR
    previous = _previous_manifest(Path(config.out_dir))
    previous_seconds = {e["name"]: e["seconds"] for e in previous.get("shards", []) if e.get("seconds") is not None}
    entries = []
    for index in range(len(shards)):
        stats = read_stats(folder, index)
        entry = shard_entry(shard_name(index), stats, sink.failures.get(index, "not written"))
        entry["seconds"] = sink.seconds.get(index, previous_seconds.get(entry["name"]))
        entries.append(entry)
    manifest = build_manifest(config.to_dict(), config.fingerprint(), entries,
                              models=_models(config, sink, previous.get("models") or {}),
                              inputs=fingerprint_inputs(config.inputs), timings=timings)
    write_manifest(config.out_dir, manifest)
    return manifest


def _previous_manifest(out: Path) -> dict[str, Any]:
    """The manifest an earlier run of this build wrote ({} when there is none or it is unusable): its shard
    timings and grounder descriptions are kept for the shards it finished."""
    if not (out / MANIFEST_FILE).is_file():
        return {}
    try:
        return load_manifest(out)
    except ManifestError:
        return {}


def _models(config: BuildConfig, sink: ShardSink, previous: dict[str, Any]) -> dict[str, Any]:
    """spaCy model name and version; `grounder`: the configured grounder's description (model id, revision
    or weights hash, thresholds); `grounders`: every grounder that grounded samples, by kind. Descriptions
    from an earlier run of the same build are kept on resume."""
    import importlib.metadata

    models: dict[str, Any] = {"spacy_model": config.text.spacy_model, "spacy_model_version": None}
    try:
        models["spacy_model_version"] = importlib.metadata.version(config.text.spacy_model)
    except importlib.metadata.PackageNotFoundError:
        pass
    grounders: dict[str, Any] = dict(previous.get("grounders") or {})
    grounders.update(sink.models)
    models["grounder"] = grounders.get(config.grounder, {"grounder": config.grounder})
    models["grounders"] = grounders
    return models


def summary_table(result: BuildResult) -> str:
    """The final summary: totals, drop reasons and failed shards, as aligned text."""
    totals = result.manifest["totals"]
    rows = [("shards", f"{totals['shards_complete']}/{totals['shards']} complete, {result.skipped} skipped (done before)"),
            ("input samples", str(totals["input_samples"])),
            ("kept", f"{totals['kept']} ({totals['kept_ratio']:.1%})"),
            ("spans", str(totals["spans"])),
            ("bytes", str(totals["bytes"])),
            ("run seconds", str(result.manifest["timings"]["run_seconds"]))]
    rows += [(f"drop: {k}", str(v)) for k, v in totals["drop_reasons"].items()]
    rows += [(f"FAILED {f['name']}", f["error"]) for f in result.manifest["failed_shards"]]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
