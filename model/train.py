"""Train Kosmos-2 on `grit build` shards: read top to bottom.

One process per device (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; shards are split by rank). A run folder
holds config.json, the processor (tokenizer + image processor), metrics.jsonl and checkpoints/step_NNNNNNNN
(model.safetensors + config, processor, optimizer.pt, state.json with the step, every rank's data position
and the RNG states); `latest` names the newest complete checkpoint. `resume=True` continues exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from grit_pipeline.io import write_bytes_atomic, write_json_atomic
from grit_pipeline.model.data import (
    DataConfig,
    DataPosition,
    SampleEncoder,
    ShardStream,
    list_shards,
    make_loader,
    model_inputs,
)
from grit_pipeline.model.presets import build_model, get_preset, image_size_of
from grit_pipeline.model.tokenizer import build_processor, build_tokenizer, load_processor

log = logging.getLogger(__name__)


class TrainInputError(ValueError):
    """A run that cannot start: its shards, --init checkpoint, device or saved config cannot be used. Raised
    by `check_run` before anything is written, with one line that says which and why."""


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything that defines a training run; saved as RUN/config.json."""

    out: str
    data: DataConfig
    preset: str = "tiny"
    init: str | None = None
    dropout: float | None = None  # overrides the preset's dropout (training from scratch only)
    steps: int = 1000
    lr: float = 2e-4
    warmup_steps: int = 375
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_accum: int = 1
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    vocab_size: int = 4000
    tokenizer_samples: int = 100_000
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    time_budget_s: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.steps < 1 or self.grad_accum < 1 or self.warmup_steps < 0 or self.checkpoint_every < 1:
            raise ValueError("steps, grad_accum and checkpoint_every must be >= 1; warmup_steps >= 0")
        if self.init is None:
            get_preset(self.preset)
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (data config nested)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of as_dict."""
        fields = dict(data)
        fields["data"] = DataConfig(**fields["data"])
        return cls(**fields)


@dataclass(slots=True)
class TrainResult:
    """What a run (or one invocation of a resumed run) did: per-step losses and throughput."""

    step: int
    losses: list[float] = field(default_factory=list)
    samples_per_s: float = 0.0
    checkpoint: str | None = None


# ---------------------------------------------------------------- distributed setup


@dataclass(frozen=True, slots=True)
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, which writes files."""
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device(device)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Dist(rank, world_size, chosen)


def barrier(dist: Dist) -> None:
    """Wait for every rank (no-op when alone)."""
    if dist.world_size > 1:
        torch.distributed.barrier()


# ---------------------------------------------------------------- model, processor, optimiser


def prepare_processor(config: TrainConfig, dist: Dist) -> Any:
    """The run's processor: the checkpoint's own with --init, else a BPE built from the shards (rank 0)."""
    run_processor = Path(config.out) / "processor"
    if config.init is not None:
        return load_processor(config.init)
    if dist.is_main and not (run_processor / "tokenizer.json").exists():
        texts = caption_texts(config.data.shards, config.tokenizer_samples)
        tokenizer = build_tokenizer(texts, vocab_size=config.vocab_size)
        build_processor(tokenizer, get_preset(config.preset).image_size).save_pretrained(str(run_processor))
    barrier(dist)
    return load_processor(run_processor)


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


def prepare_model(config: TrainConfig, processor: Any, device: torch.device | None = None) -> torch.nn.Module:
    """The pretrained checkpoint (--init) or a fresh preset sized to the tokenizer (built on `device`)."""
    from transformers import Kosmos2ForConditionalGeneration

    if config.init is not None:
        return Kosmos2ForConditionalGeneration.from_pretrained(config.init)
    tokenizer = processor.tokenizer
    torch.manual_seed(config.seed)
    # On a GPU, initialise there: random init of the 1.6B preset on the CPU takes minutes.
    preset = get_preset(config.preset)
    if config.dropout is not None:
        preset = replace(preset, dropout=config.dropout)
    with torch.device(device or "cpu"):
        return build_model(preset, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                           tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<patch_index_0000>"))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and the latent queries (1-D or resampler parameters)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim >= 2 and "latent_query" not in name else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1 over warmup_steps, then linear decay to 0 at total_steps."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = total_steps - step
    return max(0.0, remaining / max(1, total_steps - warmup_steps))


# ---------------------------------------------------------------- checkpoints


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (named by RUN/latest), or None."""
    pointer = Path(run_dir) / "latest"
    if not pointer.exists():
        return None
    return Path(run_dir) / "checkpoints" / pointer.read_text().strip()


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, processor: Any,
                    optimizer: torch.optim.Optimizer, positions: list[dict[str, Any]], config: TrainConfig) -> Path:
    """Write a checkpoint folder atomically (temp folder, then rename), then point RUN/latest at it."""
    name = f"step_{step:08d}"
    final = run_dir / "checkpoints" / name
    tmp = run_dir / "checkpoints" / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), max_shard_size="1000GB")  # one file: load_checkpoint reads it
    processor.save_pretrained(str(tmp))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    state = {"step": step, "data_positions": positions, "rng": rng_state(), "train_config": config.as_dict()}
    torch.save(state["rng"], tmp / "rng.pt")
    write_json_atomic(tmp / "state.json", {k: v for k, v in state.items() if k != "rng"})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_bytes_atomic(run_dir / "latest", name.encode())
    prune_checkpoints(run_dir / "checkpoints", config.keep_checkpoints, keep=name)
    return final


def prune_checkpoints(folder: Path, count: int, keep: str) -> None:
    """Delete all but the newest `count` checkpoints (never `keep`)."""
    names = sorted(p.name for p in folder.glob("step_*"))
    for name in names[: max(0, len(names) - count)]:
        if name != keep:
            shutil.rmtree(folder / name, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step touches (dropout included), for an exact resume."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of rng_state."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load weights (strict) and optimizer state; returns state.json with the RNG state added."""
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # The LM head is tied to the input embeddings and not stored separately; nothing else may be missing.
    missing = [k for k in missing if k != "text_model.lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not match the model: missing {missing}, unexpected {unexpected}")
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    state = json.loads((folder / "state.json").read_text())
    state["rng"] = torch.load(folder / "rng.pt", weights_only=False)
    return state


# ---------------------------------------------------------------- the loop


def train(config: TrainConfig, resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """Run (or resume) training; `stop_after` ends this invocation after that many steps (with a checkpoint)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save/load bars would interleave with the training bar
    check_run(config)
    dist = setup_distributed(config.device)
    run_dir = Path(config.out)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", config.as_dict())
    processor = prepare_processor(config, dist)
    model = prepare_model(config, processor, dist.device).to(dist.device)
    optimizer = make_optimizer(model, config)
    start_step, positions = 0, None
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        start_step, positions = state["step"], state["data_positions"]
        log.info("resumed from %s at step %d", checkpoint, start_step)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.steps), last_epoch=start_step - 1
    )
    position = DataPosition.from_dict(positions[dist.rank]) if positions else DataPosition(max(1, config.data.num_workers))
    batches = iter(make_loader(make_stream(config, processor, model, dist, position)))
    wrapped = _wrap_ddp(model, dist)
    if checkpoint is not None:
        # Last: creating the loader's iterator draws its base seed from torch's RNG, which an uninterrupted
        # run did before step 0; restoring earlier would shift every later dropout mask by that draw.
        restore_rng(state["rng"])
    try:
        return _loop(config, dist, run_dir, model, wrapped, processor, optimizer, scheduler, batches, position,
                     start_step, stop_after)
    finally:
        if dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # a live gloo/nccl group aborts the process at exit


def check_run(config: TrainConfig) -> None:
    """TrainInputError, before anything is written, when the run cannot start: no shards (or no captioned
    sample in them), fewer shards than loader workers, a device torch does not know or lacks, an --init
    checkpoint that cannot be found, or an --out that is a file."""
    from grit_pipeline.model.generate import CheckpointError, resolve_checkpoint

    if Path(config.out).exists() and not Path(config.out).is_dir():
        raise TrainInputError(f"--out {config.out} is a file, not a run folder")
    try:
        check_device(config.device)
    except ValueError as exc:
        raise TrainInputError(str(exc)) from exc
    if config.init is not None:
        try:
            resolve_checkpoint(config.init, follow_latest=False)
        except CheckpointError as exc:
            raise TrainInputError(f"--init: {exc}") from exc
    try:
        urls, _ = list_shards(config.data.shards)
    except FileNotFoundError as exc:
        raise TrainInputError(f"{exc}; pass --shards with a build's shards folder (OUT/shards), one .tar or a "
                              f"brace pattern") from exc
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    workers = max(1, config.data.num_workers)
    if not config.data.resampled and len(urls) < world_size * workers:
        raise TrainInputError(f"{len(urls)} shard(s) cannot feed {world_size} rank(s) x {workers} loader workers; "
                              f"pass --workers {max(1, len(urls) // world_size)}, more shards, or --resampled")
    if next(iter(caption_texts(config.data.shards, 1)), None) is None:
        raise TrainInputError(f"no sample with a caption in {config.data.shards}: not shards written by grit build")


def check_device(device: str) -> None:
    """ValueError unless `device` is "auto" or a torch device this machine has."""
    if device == "auto":
        return
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r} is not a torch device (auto, cpu, cuda, cuda:N)") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; pass --device cpu or auto")


def make_stream(config: TrainConfig, processor: Any, model: torch.nn.Module, dist: Dist,
                position: DataPosition) -> ShardStream:
    """This rank's shard stream, starting at `position`."""
    urls, sizes = list_shards(config.data.shards)
    encoder = SampleEncoder(processor.tokenizer, image_size_of(model), config.data)
    return ShardStream(urls, sizes, encoder, config.data, dist.rank, dist.world_size, start=position)


class ScoredTokenLoss(torch.nn.Module):
    """Kosmos-2's next-token loss with the LM head applied only at the positions that are scored.

    Kosmos2ForConditionalGeneration projects every position onto the vocabulary, but the 64 image
    positions, the prefix and the padding carry label -100: on the tiny preset that is two thirds of the
    LM head's work, its largest matmul. Same value and gradients as `model(**batch).loss` (a test checks).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_embeds_position_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the scored next tokens (labels shifted by one, -100 ignored)."""
        image_embeds = self.model.get_image_features(pixel_values, return_dict=True).pooler_output
        hidden = self.model.text_model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_embeds=image_embeds,
            image_embeds_position_mask=image_embeds_position_mask,
            use_cache=False,
        ).last_hidden_state
        targets = labels[:, 1:]
        scored = targets != -100
        logits = self.model.text_model.lm_head(hidden[:, :-1][scored])
        return torch.nn.functional.cross_entropy(logits.float(), targets[scored])


def _wrap_ddp(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """The loss module that runs each step, inside DDP when there are several ranks."""
    loss_module = ScoredTokenLoss(model)
    if dist.world_size == 1:
        return loss_module
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(loss_module, device_ids=device_ids)


def _loop(config: TrainConfig, dist: Dist, run_dir: Path, model: torch.nn.Module, wrapped: torch.nn.Module,
          processor: Any, optimizer: torch.optim.Optimizer, scheduler: Any, batches: Iterator[dict[str, Any]],
          position: DataPosition, start_step: int, stop_after: int | None) -> TrainResult:
    """The optimisation loop with logging, progress bar and checkpoints."""
    result = TrainResult(step=start_step)
    autocast = dist.device.type == "cuda" and config.bf16
    bar = _progress(config, dist, start_step)
    started, samples, tokens = time.monotonic(), 0, 0
    wrapped.train()
    for step in range(start_step, config.steps):
        loss_value = 0.0
        for micro in range(config.grad_accum):
            batch = next(batches)
            position.advance(*batch.pop("position"))
            batch = model_inputs(batch, dist.device, processor.image_processor.image_mean,
                                 processor.image_processor.image_std)
            sync = micro == config.grad_accum - 1 or dist.world_size == 1
            with _maybe_no_sync(wrapped, sync), torch.autocast(dist.device.type, torch.bfloat16, enabled=autocast):
                loss = wrapped(**batch) / config.grad_accum
            loss.backward()
            loss_value += float(loss.detach())
            samples += batch["input_ids"].shape[0]
            tokens += int(batch["attention_mask"].sum())
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss_value)
        result.step = step + 1
        elapsed = time.monotonic() - started
        result.samples_per_s = samples * dist.world_size / max(elapsed, 1e-9)
        _log_step(config, dist, run_dir, bar, result, tokens * dist.world_size / max(elapsed, 1e-9), position,
                  scheduler.get_last_lr()[0])
        out_of_time = config.time_budget_s is not None and elapsed >= config.time_budget_s
        stopping = stop_after is not None and result.step - start_step >= stop_after
        if result.step % config.checkpoint_every == 0 or result.step == config.steps or stopping or out_of_time:
            result.checkpoint = _checkpoint(config, dist, run_dir, model, processor, optimizer, result.step, position)
        if stopping or out_of_time:
            break
    if bar is not None:
        bar.close()
    return result


def _maybe_no_sync(wrapped: torch.nn.Module, sync: bool) -> Any:
    """DDP's no_sync for accumulation micro-steps (skips the all-reduce); a null context otherwise."""
    import contextlib

    if sync or not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def _checkpoint(config: TrainConfig, dist: Dist, run_dir: Path, model: torch.nn.Module, processor: Any,
                optimizer: torch.optim.Optimizer, step: int, position: DataPosition) -> str:
    """Gather every rank's data position; rank 0 writes the checkpoint."""
    positions: list[Any] = [position.as_dict()]
    if dist.world_size > 1:
        positions = [None] * dist.world_size
        torch.distributed.all_gather_object(positions, position.as_dict())
    path = ""
    if dist.is_main:
        path = str(save_checkpoint(run_dir, step, model, processor, optimizer, positions, config))
    barrier(dist)
    return path


def _progress(config: TrainConfig, dist: Dist, start_step: int) -> Any:
    if not (config.progress and dist.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=config.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)


def _log_step(config: TrainConfig, dist: Dist, run_dir: Path, bar: Any, result: TrainResult, tokens_per_s: float,
              position: DataPosition, lr: float) -> None:
    """Progress bar every step; one metrics.jsonl line every log_every steps (rank 0)."""
    loss = result.losses[-1]
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {result.step}")
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{result.samples_per_s:.1f}", epoch=position.epoch)
    if dist.is_main and (result.step % config.log_every == 0 or result.step == config.steps):
        line = {"step": result.step, "loss": round(loss, 5), "lr": lr, "samples_per_s": round(result.samples_per_s, 2),
                "tokens_per_s": round(tokens_per_s, 1), "epoch": position.epoch}
        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")


def resume_config(run_dir: str | Path, **overrides: Any) -> TrainConfig:
    """The saved config of a run, with `overrides` (e.g. steps) applied; TrainInputError when it cannot be read."""
    path = Path(run_dir) / "config.json"
    try:
        saved = TrainConfig.from_dict(json.loads(path.read_text()))
        return replace(saved, **{k: v for k, v in overrides.items() if v is not None})
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise TrainInputError(f"cannot resume from {path}: not a saved run config ({type(exc).__name__}: {exc})") from exc
