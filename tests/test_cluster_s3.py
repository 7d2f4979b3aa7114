"""Cluster-real builds: inputs and OUT on a loopback S3 server (moto), a Ray cluster of several nodes on
127.0.0.1, workers that write their own shards, resume after SIGKILL, a lost node, audit and training
streaming from S3, and storage mistakes as one line. Every server and cluster is started and stopped here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from grit_pipeline.fixtures.digests import shard_digests
from grit_pipeline.fixtures.ray_cluster import LocalCluster, local_cluster
from grit_pipeline.fixtures.s3_server import S3Server, create_bucket, flip_byte, s3_environment, s3_server
from grit_pipeline.fixtures.synthetic import generate_scenes, write_scene_folder

pytestmark = pytest.mark.integration

BUCKET = "grit"
SAMPLES_PER_SHARD = "2"
GRIT = str(Path(sys.executable).with_name("grit"))


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[tuple[S3Server, dict[str, str]]]:
    """The server, and the environment of a process that talks to it (credentials from variables only)."""
    with s3_server() as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
        env.update(s3_environment(server))
        create_bucket(server, BUCKET)
        yield server, env


@pytest.fixture(scope="module")
def s3_inputs(tmp_path_factory, s3) -> str:
    """A captions folder of 16 generated scenes (8 shards of 2), uploaded to s3://grit/in."""
    import s3fs

    _, env = s3
    folder = write_scene_folder(generate_scenes(16, seed=11, size=(64, 64)), tmp_path_factory.mktemp("in") / "in").parent
    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key="testing", secret="testing")
    fs.put(str(folder) + "/", f"{BUCKET}/in/", recursive=True)
    return f"s3://{BUCKET}/in"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, s3, s3_inputs) -> dict[str, str]:
    """The local runner's build of the S3 inputs into a local folder: what every other build must equal."""
    _, env = s3
    out = tmp_path_factory.mktemp("reference") / "out"
    done = _grit(["build", s3_inputs, "--out", str(out), "--runner", "local"], env)
    assert done.returncode == 0, done.stderr
    return shard_digests(out)


@pytest.fixture(scope="module")
def cluster(s3) -> Iterator[LocalCluster]:
    """A head without CPUs and two worker nodes of one CPU and one logical GPU each: every task runs on a
    worker node, and the GPU layout can be scheduled on this CPU machine."""
    with local_cluster(worker_nodes=2, cpus_per_node=1, gpus_per_worker=1) as handle:
        yield handle


def _grit(args: list[str], env: dict[str, str], timeout: float = 240,
          samples_per_shard: str = SAMPLES_PER_SHARD) -> subprocess.CompletedProcess[str]:
    common = ["--grounder", "annotations", "--samples-per-shard", samples_per_shard] if args[0] == "build" else []
    return subprocess.run([GRIT, *args, *common], env=env, capture_output=True, text=True, timeout=timeout)


def _s3_digests(s3: tuple[S3Server, dict[str, str]], url: str) -> dict[str, str]:
    server, _ = s3
    options = {"endpoint_url": server.endpoint_url, "key": "testing", "secret": "testing"}
    return shard_digests(url, options)


def _manifest(s3: tuple[S3Server, dict[str, str]], url: str) -> dict:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3[0].endpoint_url, key="testing", secret="testing", skip_instance_cache=True)
    return json.loads(fs.cat_file(url.removeprefix("s3://") + "/manifest.json"))


@pytest.mark.parametrize("layout", [
    pytest.param(["--ray-engine", "actors"], id="actor-pool"),
    pytest.param(["--ray-engine", "data", "--gpus-per-grounder", "1"], id="gpu-layout-on-ray-data"),
])
def test_a_multi_node_cluster_builds_s3_to_s3_like_the_local_runner(s3, s3_inputs, reference, cluster,
                                                                      layout) -> None:
    out = f"s3://{BUCKET}/out-{layout[1]}"
    env = {**s3[1], **cluster.environment()}
    done = _grit(["build", s3_inputs, "--out", out, "--runner", "ray", "--progress-interval", "0.2", *layout], env)
    assert done.returncode == 0, done.stderr
    assert _s3_digests(s3, out) == reference
    manifest = _manifest(s3, out)
    writers = [entry["written_by"] for entry in manifest["shards"]]
    nodes = {writer["node"] for writer in writers}
    # the workers wrote the shards, on both worker nodes; the driver (this machine's CLI process) wrote none
    assert len(nodes) == 2 and nodes <= set(cluster.worker_node_ids()), writers
    assert all(entry["seconds"] > 0 for entry in manifest["shards"])
    assert "[grit build]" in done.stderr and "8/8 complete" in done.stderr


def test_the_gpu_layout_runs_a_tiny_detector_on_logical_gpus_and_its_workers_write(s3, s3_inputs, cluster,
                                                                                   tmp_path) -> None:
    """GroundingDINO (a tiny random one) in the Ray Data layout's GPU actor pool, on the logical GPUs of the
    worker nodes; the shards are written on both nodes, never by the driver, and pass the audit."""
    from grit_pipeline.fixtures.detector import build_tiny_grounding_dino

    detector = build_tiny_grounding_dino(tmp_path / "detector")
    out = f"s3://{BUCKET}/out-tiny-detector"
    env = {**s3[1], **cluster.environment()}
    command = [GRIT, "build", s3_inputs, "--out", out, "--runner", "ray", "--ray-engine", "data",
               "--gpus-per-grounder", "1", "--grounder", "grounding-dino", "--detector", str(detector),
               "--box-threshold", "0.2", "--samples-per-shard", SAMPLES_PER_SHARD]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = _manifest(s3, out)
    assert manifest["totals"]["shards_complete"] == 8 and manifest["totals"]["kept"] > 0
    assert manifest["models"]["grounder"]["detector"] == str(detector)
    nodes = {entry["written_by"]["node"] for entry in manifest["shards"]}
    assert nodes == set(cluster.worker_node_ids())
    audited = _grit(["audit", out, "--no-decode"], env)
    assert audited.returncode == 0, audited.stdout[-2000:]


def test_a_node_lost_mid_build_loses_no_shard(s3, s3_inputs, reference) -> None:
    """A worker node is killed while shards are in flight (one sample per shard here, so that the loss lands
    mid-build): its shards go to the surviving node's worker and the build completes, every shard whole."""
    out = f"s3://{BUCKET}/out-node-loss"
    lost, survivor = _lose_a_node_mid_build(s3, s3_inputs, out, ["--ray-engine", "actors"], gpus_per_worker=0)
    manifest = _manifest(s3, out)
    assert manifest["totals"]["shards_complete"] == 16 and manifest["totals"]["kept"] == 16
    writers = {entry["written_by"]["node"] for entry in manifest["shards"]}
    assert survivor in writers and writers <= {lost, survivor}
    one_per_shard = {name: digest for name, digest in _s3_digests(s3, out).items() if name != "sizes.json"}
    assert len(one_per_shard) == 16 * 3  # tar, parquet and stats of every shard, nothing else


def _wait_for_stats(fs, out: str, wanted: int, process: subprocess.Popen, timeout: float = 180) -> int:
    """Wait until `wanted` shards are complete (or the process ended); returns how many are."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fs.invalidate_cache()
        try:
            done = len([p for p in fs.ls(out.removeprefix("s3://") + "/shards") if p.endswith("_stats.json")])
        except FileNotFoundError:
            done = 0
        if done >= wanted or process.poll() is not None:
            return done
        time.sleep(0.05)
    raise TimeoutError("no shard was written")


def test_sigkill_twice_then_rerun_on_s3_is_byte_identical(s3, s3_inputs, reference) -> None:
    import s3fs

    server, env = s3
    out = f"s3://{BUCKET}/out-killed"
    fs = s3fs.S3FileSystem(endpoint_url=server.endpoint_url, key="testing", secret="testing", skip_instance_cache=True)
    command = [GRIT, "build", s3_inputs, "--out", out, "--runner", "local", "--grounder", "annotations",
               "--samples-per-shard", SAMPLES_PER_SHARD]
    for wanted in (1, 4):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        _wait_for_stats(fs, out, wanted, process)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # what a killed upload leaves: an incomplete multipart upload below OUT; the rerun aborts it
    upload = fs.call_s3("create_multipart_upload", Bucket=BUCKET, Key="out-killed/shards/00007.tar")
    done = _grit(["build", s3_inputs, "--out", out, "--runner", "local"], env)
    assert done.returncode == 0, done.stderr
    assert _s3_digests(s3, out) == reference
    uploads = fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads", [])
    assert upload["UploadId"] not in {u["UploadId"] for u in uploads}
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/out-killed/shards", refresh=True)}
    assert names == set(reference) | {"sizes.json"}, "a temporary or stray object was left behind"


def test_audit_inspect_serialize_and_training_read_a_build_on_s3(s3, s3_inputs, tmp_path) -> None:
    server, env = s3
    out = f"s3://{BUCKET}/out-audited"
    assert _grit(["build", s3_inputs, "--out", out, "--runner", "local"], env).returncode == 0
    clean = _grit(["audit", out, "--json"], env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert json.loads(clean.stdout)["shards_checked"] == 8
    trained = _grit(["train", "--shards", f"{out}/shards", "--preset", "tiny", "--steps", "2", "--out",
                     str(tmp_path / "run"), "--batch-size", "4", "--workers", "1", "--warmup-steps", "1",
                     "--vocab-size", "300"], env)
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stdout.strip().splitlines()[-1])["step"] == 2
    gallery = _grit(["inspect", out, "--n", "4", "--html", str(tmp_path / "report.html")], env)
    assert gallery.returncode == 0 and "data:image/jpeg;base64" in (tmp_path / "report.html").read_text()
    serialized = _grit(["serialize", f"{out}/shards/00000.parquet"], env)  # the shard parquet: GRIT-20M columns
    assert serialized.returncode == 0 and "<grounding>" in serialized.stdout, serialized.stderr
    flip_byte(server, f"{out}/shards/00003.tar", 700)
    flipped = _grit(["audit", out, "--json", "--no-decode"], env)
    assert flipped.returncode == 1
    findings = json.loads(flipped.stdout)["findings"]
    assert any(f["check"] == "shard_sha256" and f["shard"] == "00003.tar" for f in findings), findings


@pytest.mark.parametrize("case", ["missing-bucket", "unreachable-endpoint", "no-credentials"])
def test_storage_mistakes_are_one_line_and_write_nothing(s3, s3_inputs, tmp_path, case) -> None:
    import socket

    _, env = s3
    out, inputs = f"s3://{BUCKET}/out-{case}", s3_inputs
    if case == "missing-bucket":
        out = "s3://no-such-bucket/out"
    elif case == "unreachable-endpoint":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
        env = {**env, "AWS_ENDPOINT_URL": closed, "AWS_ENDPOINT_URL_S3": closed}
        inputs = str(tmp_path)  # a local input, so that OUT is what cannot be reached
        write_scene_folder(generate_scenes(2, seed=1, size=(32, 32)), tmp_path)
    else:
        env = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
                   AWS_EC2_METADATA_DISABLED="true")
    done = _grit(["build", inputs, "--out", out, "--runner", "local"], env, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    expected = {"missing-bucket": "bucket does not exist", "unreachable-endpoint": "cannot reach",
                "no-credentials": "no credentials"}[case]
    assert expected in lines[0], lines
    if case != "missing-bucket":
        assert not _s3_digests(s3, out), "something was written"


@pytest.mark.slow
def test_the_gpu_layout_survives_a_lost_node(s3, s3_inputs) -> None:
    """The Ray Data layout with a node killed mid-build: Ray restarts the pools' actors elsewhere, and the
    shards whose assembler died with the node go through a fresh pipeline on the surviving node."""
    out = f"s3://{BUCKET}/out-gpu-node-loss"
    lost, survivor = _lose_a_node_mid_build(s3, s3_inputs, out, ["--ray-engine", "data", "--gpus-per-grounder", "1"],
                                            gpus_per_worker=1)
    manifest = _manifest(s3, out)
    assert manifest["totals"]["shards_complete"] == 16
    assert {entry["written_by"]["node"] for entry in manifest["shards"]} <= {lost, survivor}


def _lose_a_node_mid_build(s3, s3_inputs: str, out: str, layout: list[str], gpus_per_worker: int) -> tuple[str, str]:
    """Build one sample per shard on a head and two worker nodes, kill a worker node once two shards are
    written, and require the build to succeed anyway; returns the lost and the surviving node's ids."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3[0].endpoint_url, key="testing", secret="testing", skip_instance_cache=True)
    with local_cluster(worker_nodes=2, cpus_per_node=1, gpus_per_worker=gpus_per_worker) as cluster:
        env = {**s3[1], **cluster.environment()}
        command = [GRIT, "build", s3_inputs, "--out", out, "--runner", "ray", *layout, "--grounder", "annotations",
                   "--samples-per-shard", "1"]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        done_at_loss = _wait_for_stats(fs, out, wanted=2, process=process)
        lost = cluster.remove_worker_node(0, graceful=False)
        _, stderr = process.communicate(timeout=300)
        survivor = cluster.worker_node_ids()[0]
    assert done_at_loss < 16, "the build finished before the node was lost: nothing was tested"
    assert process.returncode == 0, stderr[-3000:]
    return lost, survivor


def test_the_pipeline_benchmark_builds_on_s3_too_and_fails_loudly_otherwise() -> None:
    """`grit bench pipeline --s3`: both builds must succeed for the ratio to mean anything."""
    from grit_pipeline.benchmarks.build import bench_end_to_end

    before = dict(os.environ)
    report = bench_end_to_end(40, "local", 10, 8, compare_s3=True)
    assert report["kept"] > 0 and report["s3_build_seconds"] > 0 and report["s3_vs_local_ratio"] > 0
    assert report["s3_server_cpu_seconds"] is not None
    assert dict(os.environ) == before  # the benchmark put the environment back
