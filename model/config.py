"""What defines a training run (TrainConfig, saved as RUN/config.json) and the checks before it may start."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from grit_pipeline.model.data import DataConfig, caption_texts, list_shards
from grit_pipeline.model.presets import get_preset


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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (data config nested)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of to_dict."""
        fields = dict(data)
        fields["data"] = DataConfig(**fields["data"])
        return cls(**fields)


def resume_config(run_dir: str | Path, **overrides: Any) -> TrainConfig:
    """The saved config of a run, with `overrides` (e.g. steps) applied; TrainInputError when it cannot be read."""
    path = Path(run_dir) / "config.json"
    try:
        saved = TrainConfig.from_dict(json.loads(path.read_text()))
        return replace(saved, **{k: v for k, v in overrides.items() if v is not None})
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise TrainInputError(f"cannot resume from {path}: not a saved run config ({type(exc).__name__}: {exc})") from exc


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
