"""The storage layer on a non-local fsspec filesystem (memory://, in this process): whole commits, retried
uploads, a shard whose upload keeps failing recorded while the rest stands, secrets kept out of config.json."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from grit_pipeline import storage
from grit_pipeline.build import run_build
from grit_pipeline.config import REDACTED, BuildConfig, build_config
from grit_pipeline.fixtures.digests import shard_digests
from grit_pipeline.fixtures.synthetic import generate_scenes, write_scene_folder
from grit_pipeline.storage import Folder, describe_storage_error


@pytest.fixture
def memory_url() -> Iterator[str]:
    """A fresh folder on fsspec's in-memory filesystem, removed afterwards."""
    url = f"memory://grit-{uuid.uuid4().hex[:8]}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    return write_scene_folder(generate_scenes(6, seed=8, size=(48, 48)), tmp_path_factory.mktemp("in") / "in").parent


def _config(inputs: Path, out: str) -> BuildConfig:
    return BuildConfig(inputs=(str(inputs),), out_dir=out, grounder="annotations", runner="local",
                       samples_per_shard=2)


def test_a_commit_that_raises_leaves_nothing_under_the_final_name(memory_url: str) -> None:
    folder = Folder(memory_url)
    assert not folder.local
    with pytest.raises(RuntimeError), folder.staged("shards/00000.tar") as tmp:
        Path(tmp).write_bytes(b"half a shard")
        raise RuntimeError("killed mid-write")
    assert folder.files("shards") == {}
    with folder.staged("shards/00000.tar") as tmp:
        Path(tmp).write_bytes(b"a whole shard")
    assert folder.files("shards")["00000.tar"]["size"] == 13
    assert folder.read_bytes("shards/00000.tar") == b"a whole shard"


def test_a_build_on_an_object_store_equals_the_local_build(tmp_path: Path, captions: Path, memory_url: str) -> None:
    assert run_build(_config(captions, str(tmp_path / "local"))).ok
    assert run_build(_config(captions, memory_url)).ok
    assert shard_digests(memory_url) == shard_digests(tmp_path / "local")


def test_a_failed_upload_is_retried_and_a_shard_that_keeps_failing_fails_alone(
        captions: Path, memory_url: str, monkeypatch) -> None:
    monkeypatch.setattr(storage, "_RETRY_SECONDS", 0.0)
    calls: dict[str, int] = {}
    put_file = MemoryFileSystem.put_file

    def flaky_put_file(self, lpath, rpath, *args, **kwargs):
        name = rpath.rsplit("/", 1)[-1]
        calls[name] = calls.get(name, 0) + 1
        if name == "00001.tar" and calls[name] == 1:
            raise ConnectionResetError("connection reset by peer")  # once: the retry succeeds
        if name == "00002.parquet":
            raise TimeoutError("read timeout")  # every time: the shard fails, the others stand
        return put_file(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "put_file", flaky_put_file)
    result = run_build(_config(captions, memory_url))
    assert calls["00001.tar"] == 2 and calls["00002.parquet"] == storage.COMMIT_ATTEMPTS
    assert set(result.failures) == {2} and "TimeoutError" in result.failures[2]
    complete = [e["name"] for e in result.manifest["shards"] if e["status"] == "complete"]
    assert complete == ["00000", "00001"]
    assert "00002_stats.json" not in Folder(memory_url).files("shards")


def test_secret_storage_options_are_never_saved_and_do_not_change_the_fingerprint(
        captions: Path, memory_url: str) -> None:
    options = {"key": "AKIA-EXAMPLE", "secret": "s3cr3t", "client_kwargs": {"region_name": "eu-west-1"},
               "requester_pays": True}
    config = build_config((str(captions),), memory_url, grounder="annotations", runner="local",
                          storage_options=options)
    assert config.fingerprint() == build_config((str(captions),), memory_url, grounder="annotations",
                                                runner="local").fingerprint()
    saved = config.to_dict()["storage_options"]
    assert saved == {"key": REDACTED, "secret": REDACTED, "client_kwargs": {"region_name": "eu-west-1"},
                     "requester_pays": True}
    assert run_build(config).ok
    text = Folder(memory_url).read_bytes("config.json").decode()
    assert "s3cr3t" not in text and "AKIA" not in text
    again = build_config(None, None, base=json.loads(text)["config"])  # a resume from the saved config
    assert again.storage_options == {"client_kwargs": {"region_name": "eu-west-1"}, "requester_pays": True}


@pytest.mark.parametrize("error, says", [
    (type("NoCredentialsError", (Exception,), {})("Unable to locate credentials"), "no credentials"),
    (type("EndpointConnectionError", (Exception,), {})("Could not connect"), "cannot reach"),
    (FileNotFoundError("The specified bucket does not exist"), "bucket does not exist"),
    (PermissionError("Access Denied"), "permission denied"),
])
def test_storage_errors_are_named_in_one_line(error: Exception, says: str) -> None:
    message = describe_storage_error("s3://bucket/out", error)
    assert says in message and "\n" not in message and message.startswith("s3://bucket/out: ")
