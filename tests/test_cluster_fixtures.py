"""Integration: the loopback S3 server (moto) and the local multi-node Ray cluster fixtures work as their
callers will use them: clients configured by the environment only, drivers in this process and in a child."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from grit_pipeline.fixtures.ray_cluster import LocalCluster, local_cluster
from grit_pipeline.fixtures.s3_server import create_bucket, flip_byte, s3_environment, s3_server

pytestmark = pytest.mark.integration  # starts a moto server and a three-node Ray cluster

# A separate process, as a CLI would be: it learns where S3 is from the environment alone.
CHILD_READS_S3 = """
import sys
import pyarrow.fs
import s3fs

url = sys.argv[1]
via_s3fs = s3fs.S3FileSystem().cat(url)
filesystem, path = pyarrow.fs.FileSystem.from_uri(url)
with filesystem.open_input_file(path) as f:
    via_pyarrow = f.read()
print(len(via_s3fs), via_s3fs == via_pyarrow)
"""


def _running(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_s3_server_serves_env_configured_clients_and_flips_one_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    s3fs = pytest.importorskip("s3fs")
    payload = bytes(range(256)) * 8
    with s3_server() as server:
        # Ambient AWS settings (a profile, an endpoint) must not help or hinder: only s3_environment counts.
        for name in [name for name in os.environ if name.startswith("AWS_")]:
            monkeypatch.delenv(name)
        for name, value in s3_environment(server).items():
            monkeypatch.setenv(name, value)
        url = f"{create_bucket(server, 'grit-fixture-test')}/shards/00000.tar"

        # skip_instance_cache: an instance cached by an earlier test would still point at its old endpoint.
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        with fs.open(url, "wb") as f:
            f.write(payload)
        assert fs.cat(url) == payload

        child = subprocess.run([sys.executable, "-c", CHILD_READS_S3, url], env=dict(os.environ),
                               capture_output=True, text=True, timeout=60)
        assert child.returncode == 0, child.stderr[-2000:]
        assert child.stdout.split() == [str(len(payload)), "True"]

        old, new = flip_byte(server, url, 1000)
        changed = fs.cat(url)
        assert len(changed) == len(payload)
        assert [i for i, (a, b) in enumerate(zip(payload, changed, strict=True)) if a != b] == [1000]
        assert (old, new) == (payload[1000], changed[1000])
        pid = server.pid
        assert _running(pid)
    assert not _running(pid)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A head (no CPUs) plus two one-CPU worker nodes; the pytest process is not a driver."""
    with local_cluster(worker_nodes=2) as handle:
        yield handle


def test_tasks_run_on_each_worker_node_only(cluster: LocalCluster) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1)
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    workers = cluster.worker_node_ids()
    assert len(workers) == 2
    cluster.connect()
    try:
        pinned = ray.get([where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                          .remote() for node in workers], timeout=60)
        spread = ray.get([where.options(scheduling_strategy="SPREAD").remote() for _ in range(4)], timeout=60)
    finally:
        cluster.disconnect()
    assert pinned == workers
    # head_cpus=0: nothing that needs a CPU can land on the head.
    assert set(spread) <= set(workers)
    assert not ray.is_initialized()


def test_a_subprocess_driver_attaches_through_the_environment(cluster: LocalCluster) -> None:
    code = "import ray; ray.init(); print(sum(node['Alive'] for node in ray.nodes()))"
    child = subprocess.run([sys.executable, "-c", code], env={**os.environ, **cluster.environment()},
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split()[-1] == str(len(cluster.node_ids())) == "3"


def test_losing_a_worker_node_leaves_the_other(cluster: LocalCluster) -> None:
    lost, kept = cluster.worker_node_ids()
    assert cluster.remove_worker_node(0, graceful=False) == lost
    assert cluster.worker_node_ids() == [kept]
    assert cluster.node_ids() == sorted([cluster.head_node_id, kept])
    # Restore the module's cluster whatever order the tests run in.
    added = cluster.add_worker_node()
    assert sorted(cluster.node_ids()) == sorted([cluster.head_node_id, kept, added])
