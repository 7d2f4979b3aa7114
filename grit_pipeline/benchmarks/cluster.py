"""`grit bench cluster`: a GRIT-scale build (thousands of shards) on a local multi-node Ray cluster, and what it
costs the driver.

The input is an img2dataset folder with one tar per output shard, tiny images cycling through a handful of
generated scenes, each sample's .json carrying GRIT-20M noun_chunks (so the annotations grounder keeps it).
Phase 1 builds it with `grit build --runner ray --ray-engine actors` as a subprocess attached to the cluster,
sampling the driver's peak RSS (VmHWM) from /proc; phase 2 SIGKILLs a fresh build part-way through and
resumes it. The driver only plans, schedules and collects per-shard stats, so its peak RSS should stay flat
as the shard count grows; this measures that, together with the wall time and who wrote the shards.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POLL_S = 0.2  # how often the driver's /proc/PID/status and OUT/shards are sampled
SCENES = 8  # distinct encoded images; a handful is enough, the shard count is what is being scaled
STDERR_TAIL_LINES = 15
TRACE_EVERY_S = 2.0  # spacing of the driver's RSS-over-time trace (RSS against shards done shows what grows)
TRACE_POINTS = 30


@dataclass(slots=True)
class DriverRun:
    """One `grit build` subprocess as observed from outside: wall time, exit, peak RSS, whether it was killed."""

    wall_s: float
    returncode: int | None
    peak_rss_kb: int | None
    killed: bool
    timed_out: bool
    stderr_tail: list[str]
    rss_trace: list[tuple[float, float, int]]  # (seconds since start, VmRSS MB, shards complete on disk)

    def summary(self) -> dict[str, Any]:
        """The run's figures for the JSON report."""
        return {
            "wall_s": round(self.wall_s, 2),
            "exit_code": self.returncode,
            "driver_peak_rss_mb": None if self.peak_rss_kb is None else round(self.peak_rss_kb / 1024, 1),
            "killed": self.killed,
            "timed_out": self.timed_out,
            # One string, not a JSON list, so that the indented report stays readable; at most TRACE_POINTS.
            "driver_rss_trace": "; ".join(f"{s:g}s {mb:g}MB {done}sh" for s, mb, done in self._trace_points()),
        }

    def _trace_points(self) -> list[tuple[float, float, int]]:
        """At most TRACE_POINTS of the trace, evenly spaced, the last always included."""
        step = max(1, math.ceil(len(self.rss_trace) / TRACE_POINTS))
        points = self.rss_trace[::step]
        if self.rss_trace and points[-1] is not self.rss_trace[-1]:
            points.append(self.rss_trace[-1])
        return points


def shard_sizes(shards: int, samples: int) -> list[int]:
    """`samples` spread evenly over `shards` (the first `samples % shards` shards take one more)."""
    return [samples // shards + (1 if index < samples % shards else 0) for index in range(shards)]


def write_cluster_input(folder: Path, shards: int, samples: int, image_size: int) -> Path:
    """An img2dataset folder of `shards` tars holding `samples` samples in all, with GRIT-20M noun_chunks."""
    from grit_pipeline.fixtures.img2dataset import Img2DatasetSample, scene_samples, write_img2dataset_folder
    from grit_pipeline.fixtures.synthetic import generate_scenes

    # Encoding is the slow part of a sample, so a few scenes are encoded once and every sample reuses one;
    # url and GRIT id stay unique, as in a real download.
    templates = scene_samples(generate_scenes(SCENES, seed=0, size=(image_size, image_size)))
    number = 0
    per_shard: list[list[Img2DatasetSample]] = []
    for size in shard_sizes(shards, samples):
        rows = []
        for _ in range(size):
            template = templates[number % len(templates)]
            rows.append(dataclasses.replace(template, url=f"https://example.com/{number}.jpg",
                                            extra={**template.extra, "id": number}))
            number += 1
        per_shard.append(rows)
    return write_img2dataset_folder(per_shard, folder)


def memory_kb(pid: int) -> tuple[int | None, int | None]:
    """(VmHWM, VmRSS) of a running process in kB; None once it has exited (a zombie has no memory map left)."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    found[line[:5]] = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return found.get("VmHWM"), found.get("VmRSS")


def complete_shards_on_disk(shards_dir: Path) -> int:
    """How many shards have their completion marker (NNNNN_stats.json) in OUT/shards."""
    try:
        return sum(1 for entry in os.scandir(shards_dir) if entry.name.endswith("_stats.json"))
    except FileNotFoundError:
        return 0


def run_driver(command: list[str], env: dict[str, str], log_prefix: Path, timeout_s: float,
               shards_done: Callable[[], int], kill_when: Callable[[], bool] | None = None) -> DriverRun:
    """Run `command` in its own session, sampling its peak RSS every POLL_S (and its RSS with `shards_done()`
    every TRACE_EVERY_S); SIGKILL its process group once `kill_when()` holds (or at `timeout_s`)."""
    stdout_path, stderr_path = log_prefix.with_suffix(".stdout"), log_prefix.with_suffix(".stderr")
    # Files, not pipes: a build's output is never read while it runs, and a full pipe would stall it.
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        start = time.perf_counter()
        # Its own session, so that SIGKILL reaches the whole group, as a killed job's would.
        process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        peak: int | None = None
        trace: list[tuple[float, float, int]] = []
        killed = timed_out = False
        try:
            while True:
                # Read before poll(): once poll() reaps the process its /proc entry is gone, so the last value
                # read while it was alive is its peak.
                hwm, rss = memory_kb(process.pid)
                peak = hwm or peak
                if process.poll() is not None:
                    break
                elapsed = time.perf_counter() - start
                if rss is not None and (not trace or elapsed - trace[-1][0] >= TRACE_EVERY_S):
                    trace.append((round(elapsed, 1), round(rss / 1024, 1), shards_done()))
                if kill_when is not None and not killed and kill_when():
                    os.killpg(process.pid, signal.SIGKILL)
                    killed = True
                elif time.perf_counter() - start > timeout_s and not timed_out:
                    os.killpg(process.pid, signal.SIGKILL)
                    timed_out = True
                time.sleep(POLL_S)
        finally:
            if process.poll() is None:  # an error in this loop: leave no build running
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        wall = time.perf_counter() - start
    tail = stderr_path.read_text(encoding="utf-8", errors="replace").splitlines()[-STDERR_TAIL_LINES:]
    return DriverRun(wall, process.returncode, peak, killed, timed_out, tail, trace)


def manifest_figures(out: Path, worker_node_ids: list[str]) -> dict[str, Any]:
    """What OUT/manifest.json says: complete shards, distinct writer nodes, its size, totals and timings."""
    from grit_pipeline.manifests.manifest import MANIFEST_FILE, STATUS_COMPLETE

    path = out / MANIFEST_FILE
    if not path.is_file():
        return {"manifest": None}
    manifest = json.loads(path.read_text(encoding="utf-8"))
    entries = manifest.get("shards", [])
    complete = [entry for entry in entries if entry.get("status") == STATUS_COMPLETE]
    nodes = {(entry.get("written_by") or {}).get("node") for entry in complete}
    totals, timings = manifest.get("totals", {}), manifest.get("timings", {})
    return {
        "shards_in_manifest": len(entries),
        "shards_complete": len(complete),
        "failed_shards": [f"{f.get('name')}: {f.get('error')}" for f in manifest.get("failed_shards", [])][:5],
        "distinct_writer_nodes": len(nodes),
        # None (or the driver's node) here would mean the driver wrote shards, which it must not
        "writer_nodes_are_worker_nodes": nodes <= set(worker_node_ids),
        "manifest_bytes": path.stat().st_size,
        "input_samples": totals.get("input_samples"),
        "kept": totals.get("kept"),
        "run_seconds": timings.get("run_seconds"),
        "total_seconds": timings.get("total_seconds"),
        "shards_processed": timings.get("shards_processed"),
        "steady_samples_per_s": timings.get("steady_samples_per_s"),
    }


def bench_cluster(shards: int, samples: int, worker_nodes: int, cpus_per_node: int, image_size: int,
                  kill_after: float, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Full build, then kill-and-resume, of `shards` one-tar img2dataset shards on a local Ray cluster: wall
    seconds, samples/s, the driver's peak RSS, writer nodes and manifest size."""
    import ray

    from grit_pipeline.fixtures.ray_cluster import local_cluster

    if samples < shards:
        raise ValueError(f"--samples ({samples}) must be at least --shards ({shards}): no input tar may be empty")
    report: dict[str, Any] = {
        "benchmark": "cluster",
        "parameters": {"shards": shards, "samples": samples, "worker_nodes": worker_nodes,
                       "cpus_per_node": cpus_per_node, "image_size": image_size, "kill_after": kill_after,
                       "timeout_s": timeout_s},
        "cpus": os.cpu_count(),
        "ray_version": ray.__version__,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    root = Path(tempfile.mkdtemp(prefix="grit-bench-cluster-"))
    try:
        start = time.perf_counter()
        inputs = write_cluster_input(root / "in", shards, samples, image_size)
        report["input_generation_s"] = round(time.perf_counter() - start, 2)
        report["input_bytes"] = sum(entry.stat().st_size for entry in os.scandir(inputs))

        start = time.perf_counter()
        with local_cluster(worker_nodes, cpus_per_node) as cluster:
            report["cluster_start_s"] = round(time.perf_counter() - start, 2)
            env = {**os.environ, **cluster.environment()}
            workers = cluster.worker_node_ids()

            def command(out: Path) -> list[str]:
                return [sys.executable, "-m", "grit_pipeline", "build", str(inputs), "--out", str(out),
                        "--runner", "ray", "--ray-engine", "actors", "--grounder", "annotations",
                        "--progress-interval", "30"]

            full_out = root / "out-full"
            full = run_driver(command(full_out), env, root / "full", timeout_s,
                              lambda: complete_shards_on_disk(full_out / "shards"))
            report["full_build"] = {**full.summary(), "samples_per_s": round(samples / full.wall_s, 1),
                                    **manifest_figures(full_out, workers)}
            if full.returncode != 0:
                report["full_build"]["stderr_tail"] = full.stderr_tail

            resume_out = root / "out-resume"
            shards_dir = resume_out / "shards"
            kill_at = max(1, math.ceil(kill_after * shards))
            seen: list[int] = []  # the count that triggered the kill

            def reached() -> bool:
                seen[:] = [complete_shards_on_disk(shards_dir)]
                return seen[0] >= kill_at

            first = run_driver(command(resume_out), env, root / "killed", timeout_s,
                               lambda: complete_shards_on_disk(shards_dir), kill_when=reached)
            done_at_exit = complete_shards_on_disk(shards_dir)
            resumed = run_driver(command(resume_out), env, root / "resumed", timeout_s,
                                 lambda: complete_shards_on_disk(shards_dir))
            figures = manifest_figures(resume_out, workers)
            skipped = shards - (figures.get("shards_processed") or 0)
            report["kill_and_resume"] = {
                "kill_at_shards": kill_at,
                "killed_run": first.summary(),
                "shards_complete_at_kill": seen[0] if seen else None,
                "shards_complete_when_killed_driver_exited": done_at_exit,
                # Shards the resume found complete beyond those on disk when the killed driver exited: written
                # by the killed job's workers after its driver died (its actors outlive it for a while).
                "shards_skipped_by_resume": skipped,
                "shards_written_after_driver_exit": skipped - done_at_exit,
                "resumed_run": {**resumed.summary(), **figures},
                "resume_s": round(resumed.wall_s, 2),
                "resume_driver_peak_rss_mb": resumed.summary()["driver_peak_rss_mb"],
                "all_shards_complete": figures.get("shards_complete") == shards,
            }
            if not first.killed:
                report["kill_and_resume"]["note"] = "the first run ended before the kill point: nothing was resumed"
            if resumed.returncode != 0:
                report["kill_and_resume"]["resumed_run"]["stderr_tail"] = resumed.stderr_tail
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["note"] = ("wall_s: from starting the `grit build` subprocess to its exit (interpreter start, attaching "
                      "to the cluster, discovery, the build, the manifest); samples_per_s: samples over that; "
                      "driver_peak_rss_mb: the driver process's VmHWM sampled every 0.2 s, the last value read "
                      "before it exited; the cluster's own start is cluster_start_s, outside every wall_s")
    return report
