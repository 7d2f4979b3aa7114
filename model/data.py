"""Streaming `grit build` shards into Kosmos-2 batches with webdataset.

Order is a pure function of (seed, rank, logical worker): each worker walks "epochs" of its own shards
(shard order shuffled per epoch with the same seed on every rank, then split by node and by worker), passes
the raw samples through a shuffle buffer seeded per (seed, epoch, rank, worker), and counts every raw sample
it consumes (its cursor). A batch carries (worker, cursor, epoch); the trainer stores the cursors as the data
position, and a resumed loader skips exactly that many raw samples per worker before decoding anything,
skipping whole epochs by the counts in sizes.json. The DataLoader serves workers round-robin, so on resume
the worker that was due next becomes DataLoader worker 0: the batch sequence continues exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grit_pipeline.model.encoding import PREFIX_LENGTH, EncodedSample, SampleEncoder, collate
from grit_pipeline.records import DropReason

log = logging.getLogger(__name__)


class SkipRateExceeded(RuntimeError):
    """Too many bad samples: the data is broken, and training on the remainder would be misleading."""


@dataclass(frozen=True, slots=True)
class DataConfig:
    """How shards become batches; saved with the run."""

    shards: str
    batch_size: int = 32
    num_workers: int = 2
    seed: int = 0
    shuffle_buffer: int = 1000
    resampled: bool = False
    grounded_prob: float = 0.5
    span_mode: str = "expression"
    max_length: int = 256
    max_skip_rate: float = 0.05
    skip_rate_min_samples: int = 200

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("batch_size >= 1, num_workers >= 0 and shuffle_buffer >= 0 are required")
        if not 0.0 <= self.grounded_prob <= 1.0 or not 0.0 <= self.max_skip_rate <= 1.0:
            raise ValueError("grounded_prob and max_skip_rate are probabilities")
        if self.span_mode not in ("expression", "phrase"):
            raise ValueError(f"span_mode is 'expression' or 'phrase', not {self.span_mode!r}")
        if self.max_length <= PREFIX_LENGTH + 1:
            raise ValueError(f"max_length must exceed the {PREFIX_LENGTH}-token image prefix")


@dataclass(slots=True)
class DataPosition:
    """Where a (rank's) loader stands: raw samples consumed per logical worker, and the worker due next."""

    num_workers: int
    cursors: dict[int, int] = field(default_factory=dict)
    next_worker: int = 0
    epoch: int = 0

    def advance(self, worker: int, cursor: int, epoch: int) -> None:
        """Record a batch that logical `worker` produced with its cursor after it."""
        self.cursors[worker] = cursor
        self.next_worker = (worker + 1) % max(1, self.num_workers)
        self.epoch = max(self.epoch, epoch)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (worker ids as strings)."""
        return {"num_workers": self.num_workers, "cursors": {str(k): v for k, v in self.cursors.items()},
                "next_worker": self.next_worker, "epoch": self.epoch}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataPosition:
        """Inverse of to_dict."""
        return cls(int(data["num_workers"]), {int(k): int(v) for k, v in data["cursors"].items()},
                   int(data["next_worker"]), int(data.get("epoch", 0)))


# ---------------------------------------------------------------- shard lists and ordering


OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss")


def register_object_store_schemes() -> None:
    """Let webdataset open s3://, gs://, az://... shard URLs through fsspec, streamed (webdataset's own `gs`
    handler needs the gsutil program; S3 has none)."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the package's `gopen` attribute is the function
    for scheme in OBJECT_STORE_SCHEMES:
        gopen.gopen_schemes[scheme] = _gopen_fsspec


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    from grit_pipeline.storage import open_location

    return open_location(url)


def list_shards(shards: str | Path) -> tuple[list[str], dict[str, int] | None]:
    """Shard paths or URLs of a build (a folder of NNNNN.tar, one .tar, or a brace pattern; local or on an
    object store) and sizes.json counts."""
    import braceexpand

    from grit_pipeline.storage import is_url

    if is_url(str(shards)):
        return _list_shard_urls(str(shards))
    path = Path(shards)
    if "{" not in str(shards) and not path.exists():
        raise FileNotFoundError(f"no shards at {shards}")
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        sizes_file = next((f for f in (path / "sizes.json", path.parent / "sizes.json") if f.exists()), None)
    else:
        urls = list(braceexpand.braceexpand(str(shards)))
        sizes_file = path.parent / "sizes.json" if (path.parent / "sizes.json").exists() else None
    if not urls:
        raise FileNotFoundError(f"no .tar shards at {shards}")
    sizes = None
    if sizes_file is not None:
        counts = json.loads(sizes_file.read_text())
        sizes = {url: int(counts[Path(url).name]) for url in urls if Path(url).name in counts}
        if len(sizes) != len(urls):
            sizes = None  # a partial sizes.json cannot be trusted for skipping
    return urls, sizes


def _list_shard_urls(shards: str) -> tuple[list[str], dict[str, int] | None]:
    import braceexpand

    from grit_pipeline.storage import Folder, parent_and_name

    register_object_store_schemes()
    folder = Folder(shards)
    if "{" in shards or shards.endswith(".tar"):
        urls = list(braceexpand.braceexpand(shards))
        sizes_folders = [parent_and_name(urls[0])[0]]
    else:
        listing = folder.files()
        urls = [folder.url_of(name) for name in sorted(listing) if name.endswith(".tar")]
        sizes_folders = [folder, parent_and_name(folder.url)[0]]
    if not urls:
        raise FileNotFoundError(f"no .tar shards at {shards}")
    for candidate in sizes_folders:
        counts = candidate.read_json("sizes.json")
        if isinstance(counts, dict):
            sizes = {url: int(counts[url.rsplit("/", 1)[-1]]) for url in urls if url.rsplit("/", 1)[-1] in counts}
            return urls, sizes if len(sizes) == len(urls) else None
    return urls, None


def caption_texts(shards: str, limit: int) -> Iterator[str]:
    """Up to `limit` captions from the shards' .json, in shard order (the tokenizer's training text)."""
    from webdataset.tariterators import tarfile_samples

    from grit_pipeline.stages.serialize import sanitize_caption

    urls, _ = list_shards(shards)
    samples = tarfile_samples(iter([{"url": u} for u in urls]), handler=lambda _: True,
                              select_files=lambda name: name.endswith(".json"))
    for index, sample in enumerate(samples):
        if index >= limit:
            return
        caption = json.loads(sample["json"]).get("caption")
        if isinstance(caption, str) and caption.strip():
            yield sanitize_caption(caption)


def split_by_node(shards: Sequence[str], rank: int, world_size: int) -> list[str]:
    """This rank's share of the shards (every world_size-th, from `rank`)."""
    return list(shards[rank::world_size])


def split_by_worker(shards: Sequence[str], worker: int, num_workers: int) -> list[str]:
    """This worker's share of a rank's shards."""
    return list(shards[worker::num_workers])


def _rng(*parts: object) -> random.Random:
    """A random generator seeded from a tuple of parts (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def epoch_shards(shards: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The shard order of one epoch: shuffled with (seed, epoch), identical on every rank."""
    order = list(shards)
    _rng("shards", seed, epoch).shuffle(order)
    return order


def shuffle_buffer(samples: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream with a buffer of `size` items; deterministic for a given rng."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(len(buffer))
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


# ---------------------------------------------------------------- bad samples


class BadSampleBudget:
    """Counts bad samples by reason, logs them rate-limited, and stops the run past the maximum skip rate."""

    def __init__(self, max_skip_rate: float, min_samples: int, log_interval_s: float = 10.0) -> None:
        self.max_skip_rate = max_skip_rate
        self.min_samples = min_samples
        self.log_interval_s = log_interval_s
        self.seen = 0
        self.bad: Counter[str] = Counter()
        self._last_log = -float("inf")
        self._unlogged = 0

    def ok(self) -> None:
        """Count a good sample."""
        self.seen += 1

    def skip(self, reason: DropReason | str, detail: str) -> None:
        """Count a bad sample; raise SkipRateExceeded when the rate passes the maximum."""
        self.seen += 1
        self.bad[str(getattr(reason, "value", reason))] += 1
        now = time.monotonic()
        if now - self._last_log >= self.log_interval_s:
            more = f" (+{self._unlogged} more since the last message)" if self._unlogged else ""
            log.warning("skipping bad sample: %s: %s%s", getattr(reason, "value", reason), detail[:200], more)
            self._last_log, self._unlogged = now, 0
        else:
            self._unlogged += 1
        total_bad = sum(self.bad.values())
        if self.seen >= self.min_samples and total_bad / self.seen > self.max_skip_rate:
            raise SkipRateExceeded(
                f"{total_bad} of {self.seen} samples bad ({dict(self.bad)}), above max_skip_rate {self.max_skip_rate}"
            )

    def handler(self, exception: Exception) -> bool:
        """A webdataset handler: count the error (tar-level) and continue."""
        self.skip(DropReason.MALFORMED_RECORD, repr(exception))
        return True


# ---------------------------------------------------------------- the stream


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """One logical worker's walk over the data: a list of shards per epoch, and their sample counts."""

    shards: list[str]
    sizes: dict[str, int] | None
    config: DataConfig
    rank: int
    world_size: int
    worker: int
    num_workers: int

    def epoch_shards(self, epoch: int) -> list[str]:
        """This worker's shards in `epoch` (resampled: drawn with replacement, as many as its usual share)."""
        if self.config.resampled:
            share = max(1, len(self.shards) // (self.world_size * self.num_workers))
            rng = _rng("resampled", self.config.seed, epoch, self.rank, self.worker)
            return [rng.choice(self.shards) for _ in range(share)]
        ordered = epoch_shards(self.shards, self.config.seed, epoch)
        return split_by_worker(split_by_node(ordered, self.rank, self.world_size), self.worker, self.num_workers)

    def epoch_count(self, epoch: int) -> int | None:
        """Raw samples this worker reads in `epoch` (None without sizes.json)."""
        if self.sizes is None:
            return None
        return sum(self.sizes[shard] for shard in self.epoch_shards(epoch))

    def raw_samples(self, epoch: int, handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
        """This worker's raw (undecoded) samples of one epoch, through the seeded shuffle buffer."""
        from webdataset.tariterators import tarfile_samples

        shards = self.epoch_shards(epoch)
        register_object_store_schemes()  # in this DataLoader worker too
        samples = tarfile_samples(iter([{"url": url} for url in shards]), handler=handler)
        rng = _rng("buffer", self.config.seed, epoch, self.rank, self.worker)
        return shuffle_buffer(iter(samples), self.config.shuffle_buffer, rng)


class ShardStream(torch.utils.data.IterableDataset):
    """An iterable of collated batches for one rank; each batch also carries (worker, cursor, epoch)."""

    def __init__(self, shards: Sequence[str], sizes: dict[str, int] | None, encoder: SampleEncoder,
                 config: DataConfig, rank: int = 0, world_size: int = 1, start: DataPosition | None = None) -> None:
        num_workers = max(1, config.num_workers)
        if not config.resampled and len(shards) < world_size * num_workers:
            raise ValueError(
                f"{len(shards)} shards cannot feed {world_size} ranks x {num_workers} workers; "
                "use fewer workers, more shards, or resampled mode"
            )
        if start is not None and start.num_workers != num_workers:
            raise ValueError(f"resume needs the same num_workers ({start.num_workers}), got {num_workers}")
        super().__init__()
        self.shards, self.sizes, self.encoder, self.config = list(shards), sizes, encoder, config
        self.rank, self.world_size = rank, world_size
        self.start = start or DataPosition(num_workers)

    def plan(self, worker: int) -> WorkerPlan:
        """The logical worker's plan."""
        return WorkerPlan(self.shards, self.sizes, self.config, self.rank, self.world_size, worker,
                          max(1, self.config.num_workers))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """This DataLoader worker's batches, forever: its logical worker's walk from the start position."""
        info = torch.utils.data.get_worker_info()
        physical, count = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader worker 0 serves first: make it the logical worker that was due next when we stopped.
        worker = (physical + self.start.next_worker) % count
        yield from self._batches(self.plan(worker), self.start.cursors.get(worker, 0))

    def _batches(self, plan: WorkerPlan, cursor: int) -> Iterator[dict[str, Any]]:
        """Skip `cursor` raw samples, then encode and collate batches forever (epoch after epoch)."""
        budget = BadSampleBudget(self.config.max_skip_rate, self.config.skip_rate_min_samples)
        epoch, to_skip = _locate(plan, cursor)
        batch: list[EncodedSample] = []
        while True:
            produced = False
            for index, raw in enumerate(plan.raw_samples(epoch, budget.handler)):
                if index < to_skip:
                    continue
                produced = True
                cursor += 1
                try:
                    batch.append(self.encoder(raw, epoch))
                    budget.ok()
                except SkipRateExceeded:
                    raise
                except Exception as error:  # a malformed sample is counted and skipped, never fatal alone
                    budget.skip(_reason(error), f"{raw.get('__key__')}: {error!r}")
                if len(batch) == self.config.batch_size:
                    yield self._collate(batch, plan.worker, cursor, epoch)
                    batch = []
            if not produced and to_skip == 0:
                raise RuntimeError(f"worker {plan.worker} read no samples in epoch {epoch}: empty shards?")
            epoch, to_skip = epoch + 1, 0

    def _collate(self, batch: list[EncodedSample], worker: int, cursor: int, epoch: int) -> dict[str, Any]:
        out: dict[str, Any] = collate(batch, int(self.encoder.tokenizer.pad_token_id))
        out["position"] = (worker, cursor, epoch)
        return out


def _locate(plan: WorkerPlan, cursor: int) -> tuple[int, int]:
    """(epoch, raw samples to skip inside it) for a worker that has consumed `cursor` raw samples."""
    epoch = 0
    while cursor > 0:
        count = plan.epoch_count(epoch)
        if count is None or cursor < count:
            break
        cursor -= count
        epoch += 1
    if plan.sizes is None and cursor > 0:
        # Without sizes.json, count epochs by reading their keys (slower, still exact).
        while True:
            count = sum(1 for _ in plan.raw_samples(epoch, lambda _: True))
            if cursor < count:
                break
            cursor, epoch = cursor - count, epoch + 1
    return epoch, cursor


def _reason(error: Exception) -> DropReason:
    """The drop reason for an encoding failure."""
    name = type(error).__name__
    if name in ("UnidentifiedImageError", "OSError", "DecompressionBombError", "SyntaxError"):
        return DropReason.IMAGE_UNDECODABLE
    if isinstance(error, KeyError) and "image" in str(error):
        return DropReason.IMAGE_MISSING
    if "empty caption" in str(error):
        return DropReason.EMPTY_CAPTION
    return DropReason.MALFORMED_RECORD


def make_loader(stream: ShardStream) -> torch.utils.data.DataLoader:
    """A DataLoader over the stream (batches are built in the workers; no further batching)."""
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=stream.config.num_workers,
        prefetch_factor=4 if stream.config.num_workers > 0 else None,
    )
