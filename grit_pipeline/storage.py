"""Where a build's files live: a local folder or a folder URL on any filesystem fsspec knows (s3://, gs://,
az://, hf://, file://), with atomic commits on both.

A `Folder` names a folder and its filesystem. Local folders commit the way they always have (a temporary
name in the same folder, fsync, rename). Object stores have no rename: a file is written to a local staging
file first, then uploaded in one request or as a multipart upload that only becomes an object when it is
completed (fsspec/s3fs abort it on error), so an object under a final name is always whole. What a killed
upload leaves behind (an incomplete multipart upload) is aborted by `remove_stale_temporaries` on resume.

S3 takes its endpoint, region and credentials from the standard AWS environment variables and files
(AWS_ENDPOINT_URL, AWS_PROFILE, AWS_ACCESS_KEY_ID, ~/.aws/config); `--storage-options JSON` passes
anything else to the filesystem (fsspec's storage_options).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, Any

from grit_pipeline.io import atomic_path, file_sha256

# What a remote filesystem gets unless --storage-options says otherwise: fail fast on an unreachable endpoint
# instead of botocore's minute-long connect timeouts and retries.
_S3_DEFAULTS: dict[str, Any] = {"config_kwargs": {"connect_timeout": 10, "read_timeout": 120,
                                                  "retries": {"max_attempts": 4, "mode": "standard"}}}


class StorageError(RuntimeError):
    """A folder that cannot be used: unreachable endpoint, missing credentials or bucket, permission denied."""


def is_url(text: str) -> bool:
    """True for "scheme://..." (file:// included), False for a plain local path."""
    return "://" in text


class Folder:
    """A folder on a local disk or an object store; file names below it are relative ("shards/00000.tar")."""

    def __init__(self, location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> None:
        text = os.fspath(location)
        if text.startswith("file://"):
            text = text[len("file://"):]
        self.url = text.rstrip("/") if is_url(text) else str(Path(text).expanduser().resolve())
        self.storage_options = dict(storage_options or {})

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuilt from its URL where it is unpickled (a Ray worker): each process makes its own filesystem
        return (Folder, (self.url, self.storage_options))

    def __repr__(self) -> str:
        return f"Folder({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Folder) and (self.url, self.storage_options) == (other.url, other.storage_options)

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def local(self) -> bool:
        """True for a folder on this machine's filesystem."""
        return not is_url(self.url)

    @cached_property
    def fs(self) -> Any:
        """The fsspec filesystem (LocalFileSystem for local folders)."""
        return self._fs_and_root[0]

    @cached_property
    def root(self) -> str:
        """The folder's path as its filesystem names it (no scheme)."""
        return self._fs_and_root[1]

    @cached_property
    def _fs_and_root(self) -> tuple[Any, str]:
        import fsspec.core

        if self.local:
            return fsspec.core.url_to_fs(self.url)
        options = dict(self.storage_options)
        if self.url.startswith(("s3://", "s3a://")):
            for key, value in _S3_DEFAULTS.items():
                options.setdefault(key, value)
        try:
            fs, root = fsspec.core.url_to_fs(self.url, **options)
        except ImportError as exc:
            raise StorageError(f"{self.url}: {exc} (install the filesystem's package, e.g. "
                               f"pip install 'grit-pipeline[s3]')") from exc
        except (ValueError, TypeError) as exc:
            raise StorageError(f"{self.url}: {exc}") from exc
        return fs, root.rstrip("/")

    def path(self, name: str = "") -> str:
        """The filesystem path of `name` below the folder (the folder itself for "")."""
        return f"{self.root}/{name}" if name else self.root

    def url_of(self, name: str = "") -> str:
        """A URL (or local path) of `name` that readers outside this process can open."""
        return f"{self.url}/{name}" if name else self.url

    def child(self, name: str) -> Folder:
        """The sub-folder `name`."""
        return Folder(self.url_of(name), self.storage_options)

    def exists(self, name: str = "") -> bool:
        """True when `name` (a file or folder; the folder itself for "") exists."""
        if self.local:
            return os.path.exists(self.path(name))
        return bool(self.fs.exists(self.path(name)))

    def is_file(self, name: str) -> bool:
        """True when `name` is a file."""
        if self.local:
            return os.path.isfile(self.path(name))
        return bool(self.fs.isfile(self.path(name)))

    def files(self, name: str = "") -> dict[str, dict[str, Any]]:
        """The files directly in folder `name` ({} when it does not exist): base name -> fsspec info (size, and
        ETag or mtime). One listing call: on an object store, one LIST request per 1000 names."""
        if self.local:
            folder = self.path(name)
            if not os.path.isdir(folder):
                return {}
            out = {}
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_file():
                        stat = entry.stat()
                        out[entry.name] = {"name": entry.path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            return out
        try:
            listing = self.fs.ls(self.path(name), detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        return {info["name"].rstrip("/").rsplit("/", 1)[-1]: info for info in listing if info.get("type") == "file"}

    def open(self, name: str, mode: str = "rb") -> IO[Any]:
        """A file object of `name` for reading (streamed from an object store, not downloaded first)."""
        if self.local:
            return open(self.path(name), mode)  # noqa: SIM115 - the caller closes it
        return self.fs.open(self.path(name), mode)

    def read_bytes(self, name: str) -> bytes:
        """The whole content of `name`."""
        if self.local:
            return Path(self.path(name)).read_bytes()
        return bytes(self.fs.cat_file(self.path(name)))

    def sha256(self, name: str) -> str:
        """Hex sha256 of `name`'s bytes, streamed in 1 MiB blocks."""
        if self.local:
            return file_sha256(self.path(name))
        digest = hashlib.sha256()
        with self.open(name) as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()

    def read_json(self, name: str) -> Any:
        """The parsed JSON of `name`; None when it is missing or not JSON."""
        try:
            return json.loads(self.read_bytes(name).decode("utf-8"))
        except (OSError, ValueError):
            return None

    @contextlib.contextmanager
    def staged(self, name: str) -> Iterator[str]:
        """Yield a local path to write `name` to; on success it is committed whole, on error nothing is.

        Local: the temporary file sits next to the final name and is renamed onto it. Object store: the
        staged file is uploaded (s3fs: one PUT, or a multipart upload completed only at its end).
        """
        if self.local:
            with atomic_path(self.path(name)) as tmp:
                yield tmp
            return
        fd, tmp = tempfile.mkstemp(prefix="grit-stage-", suffix="-" + name.rsplit("/", 1)[-1])
        os.close(fd)
        try:
            yield tmp
            retrying(lambda: self.fs.put_file(tmp, self.path(name)))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write `data` to `name` atomically."""
        if self.local:
            with self.staged(name) as tmp, open(tmp, "wb") as handle:
                handle.write(data)
        else:
            retrying(lambda: self.fs.pipe_file(self.path(name), data))

    def write_json(self, name: str, obj: Any) -> None:
        """Write `obj` as indented, key-sorted JSON to `name` atomically."""
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())

    def remove(self, name: str) -> None:
        """Delete file `name` if it exists."""
        if self.local:
            Path(self.path(name)).unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(name))

    def makedirs(self) -> None:
        """Create the folder (local only: object stores have no folders)."""
        if self.local:
            os.makedirs(self.root, exist_ok=True)

    def remove_stale_temporaries(self, name: str = "") -> int:
        """Remove what a killed run left under folder `name`: local ".NAME.tmpPID" files, or an object store's
        incomplete multipart uploads below it; returns how many."""
        if self.local:
            removed = 0
            for base in self.files(name):
                if base.startswith(".") and ".tmp" in base:
                    Path(self.path(f"{name}/{base}" if name else base)).unlink(missing_ok=True)
                    removed += 1
            return removed
        return _abort_multipart_uploads(self.fs, self.path(name))

    def check_access(self, write: bool) -> None:
        """Raise StorageError in one line when the folder cannot be listed (or, with `write`, written)."""
        if write and self.local:
            existing = Path(self.root)
            while not existing.exists() and existing != existing.parent:
                existing = existing.parent
            if not os.access(existing, os.W_OK):
                raise StorageError(f"{self.url}: permission denied (cannot write in {existing})")
        try:
            self.exists()
            if write and not self.local:
                probe = f".grit-probe-{os.getpid()}"
                self.fs.pipe_file(self.path(probe), b"")
                self.fs.rm_file(self.path(probe))
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(describe_storage_error(self.url, exc)) from exc


COMMIT_ATTEMPTS = 3
_RETRY_SECONDS = 0.5  # doubled after each failed attempt


def retrying(commit: Callable[[], Any]) -> Any:
    """Run an object-store commit (an upload), again after a failure, COMMIT_ATTEMPTS times in all.

    On top of botocore's and s3fs's own retries of a request: a whole upload that failed (a connection
    reset mid-multipart, a throttled burst) is started over. What retrying cannot fix (a missing bucket or
    object, no permission) is raised at once.
    """
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return commit()
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except Exception:
            if attempt == COMMIT_ATTEMPTS:
                raise
            time.sleep(_RETRY_SECONDS * 2 ** (attempt - 1))
    return None


def as_folder(folder: Folder | str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Folder:
    """A Folder from a Folder, a local path or a URL."""
    return folder if isinstance(folder, Folder) else Folder(folder, storage_options)


@dataclass(frozen=True, slots=True)
class FileRef:
    """One file in a folder (a shard's tar, say), opened when it is read."""

    folder: Folder
    name: str

    def open(self) -> IO[bytes]:
        """The file, for reading."""
        return self.folder.open(self.name)


def _abort_multipart_uploads(fs: Any, prefix: str) -> int:
    """Abort the incomplete S3 multipart uploads whose key is below `prefix` (only those: other uploads in
    the bucket are somebody else's)."""
    if not hasattr(fs, "list_multipart_uploads"):
        return 0
    bucket, _, key_prefix = prefix.partition("/")
    aborted = 0
    with contextlib.suppress(Exception):  # listing uploads needs a permission a reader may lack: not fatal
        for upload in fs.list_multipart_uploads(bucket):
            if upload.get("Key", "").startswith(key_prefix):
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
    return aborted


def describe_storage_error(url: str, exc: BaseException) -> str:
    """One line saying why `url` cannot be used (missing bucket, credentials, permission, unreachable)."""
    text = f"{type(exc).__name__}: {exc}"
    names = {type(e).__name__ for e in _chain(exc)}
    if names & {"NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError", "DefaultCredentialsError"}:
        return (f"{url}: no credentials found (set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or "
                f"pass them in --storage-options)")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError",
                "ServerDisconnectedError"}:
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the storage endpoint"
        return f"{url}: cannot reach {endpoint} ({text})"[:400]
    if "NoSuchBucket" in text or ("bucket" in text.lower() and isinstance(exc, FileNotFoundError)):
        return f"{url}: the bucket does not exist"
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"{url}: permission denied ({text})"[:400]
    if "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return f"{url}: the credentials were refused ({text})"[:400]
    return f"{url}: cannot be used ({text})"[:400]


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """--storage-options: a JSON object, or "" / None for none; raises ValueError with the reason."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--storage-options is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return value


def parent_and_name(location: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Folder, str]:
    """The folder holding the file at `location` (a path or URL) and the file's name in it."""
    folder = Folder(location, storage_options)
    parent, _, name = folder.url.rpartition("/")
    return Folder(parent or "/", storage_options), name


def open_location(location: str, storage_options: Mapping[str, Any] | None = None) -> IO[bytes]:
    """The file at `location` (a path or URL) opened for reading, streamed from an object store."""
    folder, name = parent_and_name(location, storage_options)
    return folder.open(name)
