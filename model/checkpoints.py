"""Training checkpoints: written atomically, pruned, and loaded back for an exact resume.

A run folder holds config.json, the processor (tokenizer + image processor), metrics.jsonl and
checkpoints/step_NNNNNNNN: model.safetensors + config, the processor, optimizer.pt, rng.pt (every RNG a step
touches) and state.json (the step, every rank's data position and the train config). `latest` names the
newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from grit_pipeline.io import write_bytes_atomic, write_json_atomic
from grit_pipeline.model.distributed import all_gather, barrier

if TYPE_CHECKING:
    from grit_pipeline.model.train import TrainState


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (named by RUN/latest), or None."""
    pointer = Path(run_dir) / "latest"
    if not pointer.exists():
        return None
    return Path(run_dir) / "checkpoints" / pointer.read_text().strip()


def save_checkpoint(state: TrainState) -> str:
    """Gather every rank's data position; rank 0 writes the checkpoint of `state.step` ("" on other ranks)."""
    positions = all_gather(state.position.to_dict(), state.dist)
    path = str(write_checkpoint(state, positions)) if state.dist.is_main else ""
    barrier(state.dist)
    return path


def write_checkpoint(state: TrainState, positions: list[dict[str, Any]]) -> Path:
    """Write a checkpoint folder atomically (temp folder, then rename), then point RUN/latest at it."""
    name = f"step_{state.step:08d}"
    final = state.run_dir / "checkpoints" / name
    tmp = state.run_dir / "checkpoints" / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state.model.save_pretrained(str(tmp), max_shard_size="1000GB")  # one file: load_checkpoint reads it
    state.processor.save_pretrained(str(tmp))
    torch.save(state.optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    write_json_atomic(tmp / "state.json", {"step": state.step, "data_positions": positions,
                                           "train_config": state.config.to_dict()})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_bytes_atomic(state.run_dir / "latest", name.encode())
    prune_checkpoints(state.run_dir / "checkpoints", state.config.keep_checkpoints, keep=name)
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
