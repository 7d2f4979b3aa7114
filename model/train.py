"""Train Kosmos-2 on `grit build` shards: `train` sets up one TrainState and the loop steps it (top to bottom).

One process per device (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; shards are split by rank). The run folder
and its checkpoints are described in checkpoints.py; `resume=True` continues exactly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from grit_pipeline.io import write_json_atomic
from grit_pipeline.model.checkpoints import latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from grit_pipeline.model.config import TrainConfig, check_run
from grit_pipeline.model.data import DataPosition, ShardStream, caption_texts, list_shards, make_loader
from grit_pipeline.model.distributed import (
    Dist,
    barrier,
    maybe_no_sync,
    setup_distributed,
    teardown_distributed,
    wrap_ddp,
)
from grit_pipeline.model.encoding import SampleEncoder, model_inputs
from grit_pipeline.model.presets import build_model, get_preset, image_size_of
from grit_pipeline.model.tokenizer import build_processor, build_tokenizer, load_processor

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TrainResult:
    """What a run (or one invocation of a resumed run) did: per-step losses and throughput."""

    step: int
    losses: list[float] = field(default_factory=list)
    samples_per_s: float = 0.0
    checkpoint: str | None = None


@dataclass(slots=True)
class TrainState:
    """Everything a training step reads or advances; the loop, the step and the checkpoints take this one object."""

    config: TrainConfig
    dist: Dist
    run_dir: Path
    processor: Any
    model: torch.nn.Module  # the bare Kosmos-2: clipped and saved
    loss_module: torch.nn.Module  # what each micro-step runs: ScoredTokenLoss(model), inside DDP with several ranks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: Iterator[dict[str, Any]]  # the DataLoader's iterator
    position: DataPosition  # this rank's place in the data, advanced by every batch taken from `batches`
    step: int = 0  # optimiser steps done


def train(config: TrainConfig, resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """Run (or resume) training; `stop_after` ends this invocation after that many steps (with a checkpoint)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save/load bars would interleave with the training bar
    check_run(config)
    dist = setup_distributed(config.device)
    run_dir = Path(config.out)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", config.to_dict())
    processor = prepare_processor(config, dist)
    model = prepare_model(config, processor, dist.device).to(dist.device)
    optimizer = make_optimizer(model, config)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    saved = load_checkpoint(checkpoint, model, optimizer) if checkpoint is not None else None
    if saved is not None:
        log.info("resumed from %s at step %d", checkpoint, saved["step"])
    start_step = saved["step"] if saved is not None else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.steps), last_epoch=start_step - 1
    )
    position = (DataPosition.from_dict(saved["data_positions"][dist.rank]) if saved is not None
                else DataPosition(max(1, config.data.num_workers)))
    batches = iter(make_loader(make_stream(config, processor, model, dist, position)))
    state = TrainState(config, dist, run_dir, processor, model, wrap_ddp(ScoredTokenLoss(model), dist), optimizer,
                       scheduler, batches, position, step=start_step)
    if saved is not None:
        # Last: creating the loader's iterator draws its base seed from torch's RNG, which an uninterrupted
        # run did before step 0; restoring earlier would shift every later dropout mask by that draw.
        restore_rng(saved["rng"])
    try:
        return run_loop(state, stop_after)
    finally:
        teardown_distributed(dist)


# ---------------------------------------------------------------- processor, model, optimiser, data


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

    def __init__(self, model: torch.nn.Module) -> None:
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


# ---------------------------------------------------------------- the loop


def run_loop(state: TrainState, stop_after: int | None = None) -> TrainResult:
    """Step until config.steps, `stop_after` steps or the time budget; log every step, checkpoint on schedule."""
    config, dist = state.config, state.dist
    start_step = state.step
    result = TrainResult(step=start_step)
    bar = _progress(state)
    started, samples, tokens = time.monotonic(), 0, 0
    state.loss_module.train()
    while state.step < config.steps:
        loss, step_samples, step_tokens = train_step(state)
        samples, tokens = samples + step_samples, tokens + step_tokens
        result.losses.append(loss)
        result.step = state.step
        elapsed = time.monotonic() - started
        result.samples_per_s = samples * dist.world_size / max(elapsed, 1e-9)
        _log_step(state, bar, result, tokens * dist.world_size / max(elapsed, 1e-9))
        out_of_time = config.time_budget_s is not None and elapsed >= config.time_budget_s
        stopping = stop_after is not None and state.step - start_step >= stop_after
        if state.step % config.checkpoint_every == 0 or state.step == config.steps or stopping or out_of_time:
            result.checkpoint = save_checkpoint(state)
        if stopping or out_of_time:
            break
    if bar is not None:
        bar.close()
    return result


def train_step(state: TrainState) -> tuple[float, int, int]:
    """One optimiser step over grad_accum micro-batches; (loss, samples, tokens) of this rank."""
    config, dist = state.config, state.dist
    autocast = dist.device.type == "cuda" and config.bf16
    image_processor = state.processor.image_processor
    loss_value, samples, tokens = 0.0, 0, 0
    for micro in range(config.grad_accum):
        batch = next(state.batches)
        state.position.advance(*batch.pop("position"))
        batch = model_inputs(batch, dist.device, image_processor.image_mean, image_processor.image_std)
        sync = micro == config.grad_accum - 1 or dist.world_size == 1
        with maybe_no_sync(state.loss_module, sync), torch.autocast(dist.device.type, torch.bfloat16,
                                                                   enabled=autocast):
            loss = state.loss_module(**batch) / config.grad_accum
        loss.backward()
        loss_value += float(loss.detach())
        samples += batch["input_ids"].shape[0]
        tokens += int(batch["attention_mask"].sum())
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return loss_value, samples, tokens


def _progress(state: TrainState) -> Any:
    """A tqdm bar on rank 0 when the config asks for one, else None."""
    if not (state.config.progress and state.dist.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=state.config.steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)


def _log_step(state: TrainState, bar: Any, result: TrainResult, tokens_per_s: float) -> None:
    """Progress bar every step; one metrics.jsonl line every log_every steps (rank 0)."""
    loss = result.losses[-1]
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {result.step}")
    epoch = state.position.epoch
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{result.samples_per_s:.1f}", epoch=epoch)
    if state.dist.is_main and (result.step % state.config.log_every == 0 or result.step == state.config.steps):
        line = {"step": result.step, "loss": round(loss, 5), "lr": state.scheduler.get_last_lr()[0],
                "samples_per_s": round(result.samples_per_s, 2), "tokens_per_s": round(tokens_per_s, 1),
                "epoch": epoch}
        with open(state.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
