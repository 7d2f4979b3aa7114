"""Orchestration of `grit build`: plan shards, guard the output folder, run a runner, write the manifest.

What runs is the stage list (`grit_pipeline.stages.stage_list`); where it runs is a runner
(`grit_pipeline.runners.local` or `.ray`), given that list, the pending shards and the shard sink
(`grit_pipeline.runners.base`), which writes every finished shard.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from grit_pipeline.config import BuildConfig
from grit_pipeline.inputs import InputShard, discover_shards, fingerprint_inputs
from grit_pipeline.manifests.manifest import (
    CONFIG_FILE,
    MANIFEST_FILE,
    SIZES_FILE,
    STATUS_COMPLETE,
    ManifestError,
    build_manifest,
    load_manifest,
    shard_entry,
    write_manifest,
)
from grit_pipeline.runners.base import Progress, Runner, ShardSink, ShardWriter
from grit_pipeline.shards import SHARDS_DIR, read_stats, shard_name
from grit_pipeline.storage import Folder, StorageError, describe_storage_error

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


def prepare_output(config: BuildConfig, overwrite: bool, write: bool = True) -> bool:
    """Refuse an OUT holding another build unless `overwrite`; with it, remove the old build's files.

    A build in OUT that finished no shard (it stopped before any: a model that could not load, say) holds
    nothing to lose and is replaced as with `overwrite`, so the build that follows the fix is not refused.
    With `write=False` only the refusal is checked, and nothing is created or changed. Returns True when
    the old build is (to be) replaced rather than resumed.
    """
    out = output_folder(config)
    if out.local and os.path.exists(out.root) and not os.path.isdir(out.root):
        raise OutputInUseError(f"{out.url} is a file, not a folder; choose another --out")
    top = out.files()
    shard_files = out.files(SHARDS_DIR)
    finished = any(name[:1].isdigit() for name in shard_files)
    if CONFIG_FILE in top:
        saved = out.read_json(CONFIG_FILE)
        previous = saved.get("fingerprint") if isinstance(saved, dict) else None
        if previous != config.fingerprint():
            if finished and not overwrite:
                raise OutputInUseError(
                    f"{out.url} holds a build made with a different config (fingerprint {str(previous)[:12]} vs "
                    f"{config.fingerprint()[:12]}); pass --overwrite to replace it, or choose another --out")
            overwrite = True  # nothing finished: nothing to lose
    elif (set(top) - {LOCK_FILE} or shard_files or _has_subfolders(out)) and not overwrite:
        raise OutputInUseError(f"{out.url} is not empty and holds no grit build; pass --overwrite or choose another --out")
    if not write:
        return overwrite
    if overwrite:
        for name in (CONFIG_FILE, MANIFEST_FILE):
            if name in top:
                out.remove(name)
        for name in shard_files:
            if name[:1].isdigit() or name.startswith(".") or name == SIZES_FILE:
                out.remove(f"{SHARDS_DIR}/{name}")
    out.makedirs()
    out.write_json(CONFIG_FILE, {"config": config.to_dict(), "fingerprint": config.fingerprint()})
    return overwrite


def _has_subfolders(out: Folder) -> bool:
    if out.local:
        return os.path.isdir(out.root) and any(entry.is_dir() for entry in os.scandir(out.root))
    try:
        return any(info.get("type") == "directory" for info in out.fs.ls(out.root, detail=True, refresh=True))
    except FileNotFoundError:
        return False


def output_folder(config: BuildConfig) -> Folder:
    """OUT as a Folder (a local folder or an object-store prefix)."""
    return Folder(config.out_dir, config.storage_options)


@contextlib.contextmanager
def output_lock(out: Folder) -> Iterator[None]:
    """Hold an exclusive lock on a local OUT for the whole build, so two builds never write one folder.

    flock locks die with their process, so a killed build never leaves a stale lock behind. Object stores
    offer no lock that dies with its holder: there, keep one build per OUT (docs/cluster.md).
    """
    if not out.local:
        yield
        return
    import fcntl

    out.makedirs()
    with open(out.path(LOCK_FILE), "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise OutputInUseError(f"another grit build is writing to {out.url}") from exc
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def discover_inputs(config: BuildConfig) -> list[InputShard]:
    """Every input shard of the build, in order; InputError (one line, naming the input) when one cannot be
    read."""
    from grit_pipeline.inputs import InputError

    shards: list[InputShard] = []
    for raw in config.inputs:  # one input at a time, so that an error names its input
        try:
            shards += discover_shards([raw], config.samples_per_shard, config.images_dir, config.storage_options)
        except InputError:
            raise
        except StorageError as exc:
            raise InputError(str(exc)) from exc
        except (OSError, ValueError) as exc:
            raise InputError(f"{raw}: cannot be read as a build input ({type(exc).__name__}: {exc})") from exc
        except Exception as exc:  # an object store's own errors: endpoint, credentials, bucket
            raise InputError(describe_storage_error(raw, exc)) from exc
    return shards


def run_build(config: BuildConfig, overwrite: bool = False, stream: TextIO = sys.stderr) -> BuildResult:
    """Build (or resume) the output of `config`; returns the manifest and failures (never raises on a shard).

    What can refuse a build is checked before OUT is touched: the inputs are discovered (InputError names
    the input that cannot be read), OUT's storage is checked (StorageError: endpoint, credentials, bucket,
    permission) and OUT's contents are checked (OutputInUseError), so a refused build leaves OUT as it was.
    A build that created a local OUT and raises before any shard is written removes OUT again.
    """
    import shutil

    started = time.time()
    shards = discover_inputs(config)
    inputs = fingerprint_inputs(config.inputs, config.storage_options)
    out = output_folder(config)
    out.check_access(write=True)
    try:
        replaced = prepare_output(config, overwrite, write=False)
        previous = {} if replaced else _previous_manifest(out)
        refuse_changed_inputs(out, previous, inputs)
    except OutputInUseError:
        raise
    except Exception as exc:
        raise StorageError(describe_storage_error(out.url, exc)) from exc
    created = out.local and not os.path.exists(out.root)
    with output_lock(out):
        try:
            return _run_build(config, replaced, stream, shards, inputs, previous, started)
        except BaseException:
            if created and not any(name[:1].isdigit() for name in out.files(SHARDS_DIR)):
                shutil.rmtree(out.root, ignore_errors=True)  # there was no OUT, and no shard was written into it
            raise


def refuse_changed_inputs(out: Folder, previous: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
    """Refuse to resume a build whose inputs changed since its manifest (`previous`) was written (a file
    rewritten under the same name, added or removed): its finished shards would no longer match the inputs."""
    recorded = previous.get("inputs") or []
    before = {entry.get("input"): entry.get("digest") for entry in recorded if isinstance(entry, dict)}
    for entry in inputs:
        digest = before.get(entry["input"])
        if digest is not None and digest != entry["digest"]:
            raise OutputInUseError(
                f"{entry['input']} changed since {out.url} was built (a file was added, removed or rewritten); "
                f"pass --overwrite to rebuild, or choose another --out")


def _run_build(config: BuildConfig, overwrite: bool, stream: TextIO, shards: list[InputShard],
               inputs: list[dict[str, Any]], previous: dict[str, Any], started: float) -> BuildResult:
    if prepare_output(config, overwrite):  # rechecked under the lock: the old build is gone
        previous = {}
    out = output_folder(config)
    folder = out.child(SHARDS_DIR)
    folder.makedirs()
    folder.remove_stale_temporaries()
    done_before = completed_shards(folder, len(shards), previous)
    pending = [(i, s) for i, s in enumerate(shards) if i not in done_before]
    progress = Progress(total_shards=len(shards), interval=config.progress_interval, stream=stream)
    progress.shards_done = len(shards) - len(pending)
    sink = ShardSink(progress)
    run_started = time.time()
    if pending:
        from grit_pipeline.stages.stage_list import build_stages

        runner_for(config)(config, build_stages(config), pending, ShardWriter(folder), sink)
    run_seconds = time.time() - run_started
    steady = progress.steady_rate()
    timings = {"started_unix": round(started, 3), "run_seconds": round(run_seconds, 3),
               "total_seconds": round(time.time() - started, 3), "shards_processed": len(pending),
               "samples_processed": progress.samples, "steady_samples_per_s": round(steady, 1) if steady else None}
    entries = [_entry(index, sink, done_before) for index in range(len(shards))]
    manifest = build_manifest(config.to_dict(), config.fingerprint(), entries,
                              models=_models(config, sink, previous.get("models") or {}),
                              inputs=inputs, timings=timings)
    write_manifest(out, manifest)
    return BuildResult(manifest, dict(sink.failures), len(shards) - len(pending))


def _entry(index: int, sink: ShardSink, done_before: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Shard `index`'s manifest entry: written in this run, complete before it, or failed."""
    name = shard_name(index)
    if index in sink.written:
        return shard_entry(name, sink.written[index])
    if index in done_before:
        return done_before[index]
    return shard_entry(name, None, sink.failures.get(index, "not written"))


def completed_shards(folder: Folder, count: int, previous: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The manifest entries of the shards among the first `count` that are complete in `folder`.

    One listing of the folder decides; a shard the previous manifest describes, whose files are listed with
    the sizes it recorded, is taken from it without reading its stats (a resumed build of 10,000 shards on
    an object store makes one LIST request per 1000 files, not a GET per shard).
    """
    listing = folder.files()
    known = {e["name"]: e for e in previous.get("shards", []) if e.get("status") == STATUS_COMPLETE}
    done: dict[int, dict[str, Any]] = {}
    for index in range(count):
        name = shard_name(index)
        if f"{name}_stats.json" not in listing:
            continue
        entry = known.get(name)
        if entry is not None and _entry_matches(entry, listing):
            done[index] = entry
            continue
        stats = read_stats(folder, index, listing)
        if stats is not None:
            done[index] = shard_entry(name, stats)
    return done


def _entry_matches(entry: dict[str, Any], listing: dict[str, dict[str, Any]]) -> bool:
    parquet = entry.get("parquet") or {}
    if (listing.get(parquet.get("name")) or {}).get("size") != parquet.get("bytes"):
        return False
    return entry.get("tar") is None or (listing.get(entry["tar"]) or {}).get("size") == entry.get("bytes")


def runner_for(config: BuildConfig) -> Runner:
    """The run function of the configured runner."""
    if config.runner == "local":
        from grit_pipeline.runners.local import run_local

        return run_local
    from grit_pipeline.runners.ray import run_ray

    return run_ray


def _previous_manifest(out: Folder) -> dict[str, Any]:
    """The manifest an earlier run of this build wrote ({} when there is none or it is unusable): its shard
    entries and grounder descriptions are kept for the shards it finished."""
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
