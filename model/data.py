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
import io
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from grit_pipeline.model.tokenizer import BOI_TOKEN, EOI_TOKEN, NUM_IMAGE_TOKENS
from grit_pipeline.records import DropReason

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# <s> <image> [64 image embeddings] </image>: no loss on any of these.
PREFIX_LENGTH = NUM_IMAGE_TOKENS + 3


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

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields."""
        return asdict(self)


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

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (worker ids as strings)."""
        return {"num_workers": self.num_workers, "cursors": {str(k): v for k, v in self.cursors.items()},
                "next_worker": self.next_worker, "epoch": self.epoch}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataPosition:
        """Inverse of as_dict."""
        return cls(int(data["num_workers"]), {int(k): int(v) for k, v in data["cursors"].items()},
                   int(data["next_worker"]), int(data.get("epoch", 0)))


@dataclass(frozen=True, slots=True)
class EncodedSample:
    """One training example: token ids (with the image prefix), labels and the (3, S, S) uint8 pixels."""

    key: str
    input_ids: list[int]
    labels: list[int]
    image: torch.Tensor


# ---------------------------------------------------------------- shard lists and ordering


def list_shards(shards: str | Path) -> tuple[list[str], dict[str, int] | None]:
    """Shard paths of a build (a folder of NNNNN.tar, one .tar, or a brace pattern) and sizes.json counts."""
    import braceexpand

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


def grounded_choice(seed: int, epoch: int, key: str, grounded_prob: float) -> bool:
    """Whether this sample is shown grounded in this epoch: a pure function of (seed, epoch, key)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < grounded_prob


# ---------------------------------------------------------------- bad samples


class BadSampleBudget:
    """Counts bad samples by reason, logs them rate-limited, and stops the run past the maximum skip rate."""

    def __init__(self, max_skip_rate: float, min_samples: int, log_interval_s: float = 10.0):
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


# ---------------------------------------------------------------- encoding


JPEG_MAGIC = b"\xff\xd8\xff"


def decode_pixels(data: bytes, size: int) -> torch.Tensor:
    """(C, H, W) uint8, RGB first, both sides >= size (when the source allows); JPEGs decoded already downscaled.

    JPEGs go through libjpeg-turbo (simplejpeg), about twice as fast as PIL at full size, scaled in the
    decoder by the largest of 1/2, 1/4, 1/8 that keeps both sides >= size (like PIL's draft mode).
    libjpeg-turbo's other n/8 scales are not used: they decode slower than full size. JPEGs it cannot turn
    into RGB and other formats go through PIL. JPEGs come out as RGBX (C = 4, the fourth channel padding)
    in a channels-last view: torch's uint8 resize is about 20% faster on four channels than on three.
    """
    if data[:3] == JPEG_MAGIC:
        import simplejpeg

        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            factor = 1
            while factor < 8 and min(height, width) // (2 * factor) >= size:
                factor *= 2
            array = simplejpeg.decode_jpeg(data, colorspace="RGBX", min_height=-(-height // factor),
                                           min_width=-(-width // factor))
        except ValueError:  # not decodable to RGB by libjpeg-turbo: PIL below decodes it or raises
            array = None
        if array is not None:
            return torch.from_numpy(array).permute(2, 0, 1)
    return image_pixels(_open_image(data, size))


def _open_image(data: bytes, size: int) -> Image.Image:
    """PIL's lazy open, in draft mode for JPEGs (the decoder downscales by 1/2, 1/4 or 1/8, staying >= size)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG":
        image.draft("RGB", (size, size))
    return image


def image_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 RGB view of a PIL image."""
    import numpy as np

    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def resize_pixels(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(3, size, size) uint8 RGB from (3 or 4, H, W), resized straight (no crop) with antialiased bilinear.

    torch's uint8 antialiased bilinear on a channels-last view is about 4x faster than PIL's resize.
    Training and `grit generate` both go through here.
    """
    if tuple(pixels.shape[1:]) != (size, size):
        pixels = torch.nn.functional.interpolate(pixels[None], size=(size, size), mode="bilinear",
                                                 antialias=True, align_corners=False)[0]
    return pixels[:3].contiguous()


def load_pixels(data: bytes, size: int) -> torch.Tensor:
    """Encoded image bytes -> (3, size, size) uint8 model pixels."""
    return resize_pixels(decode_pixels(data, size), size)


class SampleEncoder:
    """Raw shard sample -> EncodedSample: text choice, tokens exactly as Kosmos2Processor, resized image."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_size: int, config: DataConfig):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.config = config
        self.prefix_ids = image_prefix_ids(tokenizer)
        self.eos_id = int(tokenizer.eos_token_id)
        # The Rust tokenizer directly: the transformers wrapper costs more than the tokenization itself.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)

    def text_for(self, sample: dict[str, Any], epoch: int) -> str:
        """Grounded text (from .txt, or re-serialised in phrase mode) or the sanitised plain caption."""
        from grit_pipeline.stages.serialize import sanitize_caption

        meta = json.loads(sample["json"])
        key = str(sample.get("__key__", meta.get("key", "")))
        if grounded_choice(self.config.seed, epoch, key, self.config.grounded_prob):
            grounded = self._grounded_text(sample, meta)
            if grounded:
                return grounded
        caption = str(meta.get("caption", "")).strip()
        if not caption:
            raise ValueError("empty caption")
        return sanitize_caption(caption)

    def _grounded_text(self, sample: dict[str, Any], meta: dict[str, Any]) -> str | None:
        """The shard's own .txt in expression mode; phrase mode re-serialises the record from its .json."""
        if self.config.span_mode == "expression" and "txt" in sample:
            return sample["txt"].decode("utf-8")
        from grit_pipeline.records import GritRecord
        from grit_pipeline.stages.serialize import SerializeConfig, serialize_record

        fields = {name: meta[name] for name in GritRecord.__dataclass_fields__ if name in meta}
        return serialize_record(GritRecord.from_row(fields), SerializeConfig(mode=self.config.span_mode)).text

    def encode_text(self, text: str) -> tuple[list[int], list[int]]:
        """(input_ids, labels) for `text` after the image prefix; no loss on the prefix."""
        if self._backend is not None:
            body = self._backend.encode(" " + text.strip(), add_special_tokens=False).ids
        else:
            body = self.tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"]
        body = body[: self.config.max_length - len(self.prefix_ids) - 1] + [self.eos_id]
        input_ids = self.prefix_ids + body
        labels = [-100] * len(self.prefix_ids) + body
        return input_ids, labels

    def __call__(self, sample: dict[str, Any], epoch: int) -> EncodedSample:
        """Encode one raw sample; raises on anything malformed (the caller counts and skips it)."""

        image_bytes = sample.get("jpg") or sample.get("jpeg") or sample.get("png")
        if not image_bytes:
            raise KeyError("no image in sample")
        input_ids, labels = self.encode_text(self.text_for(sample, epoch))
        pixels = load_pixels(image_bytes, self.image_size)
        return EncodedSample(str(sample.get("__key__", "")), input_ids, labels, pixels)


def image_prefix_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """`<s> <image> [64 placeholder ids] </image>` as Kosmos2Processor writes it (placeholders: unk+1 ...)."""
    first = int(tokenizer.unk_token_id) + 1
    boi, eoi = tokenizer.convert_tokens_to_ids([BOI_TOKEN, EOI_TOKEN])
    return [int(tokenizer.bos_token_id), int(boi), *range(first, first + NUM_IMAGE_TOKENS), int(eoi)]


def image_embeds_position_mask(length: int) -> list[int]:
    """1 on the 64 image-embedding positions after `<s> <image>`, 0 elsewhere (as Kosmos2Processor)."""
    return [0, 0] + [1] * NUM_IMAGE_TOKENS + [0] * (length - NUM_IMAGE_TOKENS - 2)


def collate(samples: Sequence[EncodedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad samples into model inputs; pixels stay uint8 (N, 3, H, W): `normalize_pixels` runs on the device."""
    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), -100, dtype=torch.long)
    attention = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        input_ids[row, : len(sample.input_ids)] = torch.tensor(sample.input_ids)
        labels[row, : len(sample.labels)] = torch.tensor(sample.labels)
        attention[row, : len(sample.input_ids)] = 1
    position = torch.tensor(image_embeds_position_mask(length), dtype=torch.long).expand(len(samples), -1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "image_embeds_position_mask": position.contiguous(),
        "labels": labels,
        "pixels": torch.stack([s.image for s in samples]),
    }


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float pixel_values with the processor's mean/std (on whatever device `pixels` is)."""
    mean_t = torch.tensor(mean, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float().div_(255.0) - mean_t) / std_t


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD) -> dict[str, torch.Tensor]:
    """A collated batch moved to `device` with pixels normalised there (uint8 crosses the bus, not float)."""
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "pixels"}
    inputs["pixel_values"] = normalize_pixels(batch["pixels"].to(device, non_blocking=True), mean, std)
    return inputs


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
        samples = tarfile_samples(iter([{"url": url} for url in shards]), handler=handler)
        rng = _rng("buffer", self.config.seed, epoch, self.rank, self.worker)
        return shuffle_buffer(iter(samples), self.config.shuffle_buffer, rng)


class ShardStream(torch.utils.data.IterableDataset):
    """An iterable of collated batches for one rank; each batch also carries (worker, cursor, epoch)."""

    def __init__(self, shards: Sequence[str], sizes: dict[str, int] | None, encoder: SampleEncoder,
                 config: DataConfig, rank: int = 0, world_size: int = 1, start: DataPosition | None = None):
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
