"""CLIP image-text similarity: the GRIT-20M columns `clip_similarity_vitb32` / `clip_similarity_vitl14`,
computed on the stored upright pixels and the caption, and an optional filter on them.

Which column a model fills follows the model (`similarity_column`): the ViT-B/32 architecture (vision patch
32, width 768) fills `clip_similarity_vitb32`, ViT-L/14 (patch 14, width 1024) `clip_similarity_vitl14`;
a model whose config matches neither but whose id or folder name says ViT-B/32 or ViT-L/14 with the same
patch size fills that column too; any other model fills `clip_similarity_<its name>`. Inputs that already
carry the column (GRIT-20M downloads) keep their value unless `recompute`. Off unless a model is given.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grit_pipeline.records import DropReason
from grit_pipeline.stages.base import CHEAP_CPUS, Resources, StageSetupError, cuda_available

if TYPE_CHECKING:
    from grit_pipeline.config import BuildConfig
    from grit_pipeline.work import WorkItem

CLIP_VITB32 = "clip_similarity_vitb32"
CLIP_VITL14 = "clip_similarity_vitl14"
GRIT_CLIP_COLUMNS = (CLIP_VITB32, CLIP_VITL14)
EXTRA_COLUMN_PREFIX = "clip_similarity_"


class ClipUnavailableError(RuntimeError):
    """The CLIP model cannot be loaded (not cached, no network, or not a checkpoint); the CLI exits with 2."""


@dataclass(frozen=True, slots=True)
class ClipConfig:
    """The CLIP stage: `model` (hub id or local save_pretrained folder; None: the stage is off), whether to
    recompute columns the input already has, the drop threshold, and where it runs (`gpus` None: 1 when
    CUDA is available; `workers`: its actors on Ray, like the grounder's)."""

    model: str | None = None
    recompute: bool = False
    min_similarity: float | None = None
    images_per_forward: int = 32
    device: str = "auto"
    gpus: float | None = None
    workers: int = 1
    local_files_only: bool = False
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.images_per_forward < 1:
            raise ValueError(f"images_per_forward must be >= 1, got {self.images_per_forward}")
        if self.workers < 1:
            raise ValueError(f"clip workers must be >= 1, got {self.workers}")
        if self.gpus is not None and self.gpus < 0:
            raise ValueError(f"clip gpus must be >= 0, got {self.gpus}")
        if self.min_similarity is not None and not -1.0 <= self.min_similarity <= 1.0:
            raise ValueError(f"min_similarity must be in [-1, 1], got {self.min_similarity}")
        if self.min_similarity is not None and self.model is None:
            raise ValueError("a minimum CLIP similarity needs a CLIP model (--clip-model)")

    @property
    def enabled(self) -> bool:
        """True when a CLIP model is given."""
        return self.model is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClipConfig:
        """The config from `to_dict` output (unknown keys are an error)."""
        return cls(**data)


# ------------------------------------------------------------------------------------------- the column

_NAME_VITB32 = re.compile(r"vit-?b-?/?32|vit-base-patch32")
_NAME_VITL14 = re.compile(r"vit-?l-?/?14|vit-large-patch14")


def model_name(model: str) -> str:
    """The last part of a hub id or folder path, lower case."""
    return Path(model.rstrip("/")).name.lower() or model.lower()


def similarity_column(model: str, patch_size: int, hidden_size: int) -> str:
    """The output column a CLIP model fills, from its vision tower (patch size, width) and its id or folder."""
    if (patch_size, hidden_size) == (32, 768):
        return CLIP_VITB32
    if (patch_size, hidden_size) == (14, 1024):
        return CLIP_VITL14
    name = model_name(model)
    if patch_size == 32 and _NAME_VITB32.search(name):
        return CLIP_VITB32
    if patch_size == 14 and _NAME_VITL14.search(name):
        return CLIP_VITL14
    slug = re.sub(r"[^a-z0-9]+", "_", name).strip("_") or "model"
    return f"{EXTRA_COLUMN_PREFIX}{slug}"


# ------------------------------------------------------------------------------------------- loading

_CLIP_HINT = "or leave out --clip-model (the CLIP stage is off without it)"


def _unavailable(model: str, why: str) -> str:
    return (f"cannot load the CLIP model {model!r}: it is not a local checkpoint directory and no cached copy "
            f"could be loaded from the Hugging Face hub ({why}). On a machine with internet run "
            f"`huggingface-cli download {model}` and copy the cache (HF_HOME) here, or save it with "
            f"save_pretrained (model, tokenizer and image processor) and pass --clip-model /path/to/dir; {_CLIP_HINT}.")


def _local(model: str) -> Path | None:
    from grit_pipeline.stages.detector_loading import _local_detector

    return _local_detector(model)


def _check_local(local: Path) -> None:
    if not local.exists():
        raise ClipUnavailableError(f"CLIP model directory {str(local)!r} does not exist: pass --clip-model with a "
                                   f"folder saved by save_pretrained or a hub id; {_CLIP_HINT}")
    if not (local / "config.json").is_file():
        what = "a file" if local.is_file() else "no config.json"
        raise ClipUnavailableError(f"{str(local)!r} is not a CLIP checkpoint directory ({what}): save one with "
                                   f"save_pretrained and pass its folder to --clip-model; {_CLIP_HINT}")


def _from_hub(config: ClipConfig, load: Any) -> Any:
    """`load(local_only)` from the cache, then the hub (never when offline; an unreachable hub fails fast)."""
    from grit_pipeline.stages.detector_loading import hub_offline, hub_unreachable

    model = str(config.model)
    try:
        return load(True)
    except OSError as cached_miss:
        if hub_offline(config.local_files_only):
            why = "offline: --offline, HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set, and it is not in the cache"
            raise ClipUnavailableError(_unavailable(model, why)) from cached_miss
    unreachable = hub_unreachable()
    if unreachable is not None:
        raise ClipUnavailableError(_unavailable(model, unreachable))
    try:
        return load(False)
    except (OSError, ValueError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise ClipUnavailableError(_unavailable(model, f"{type(exc).__name__}: {first_line}")) from exc


def _load_parts(source: str, local_only: bool, revision: str | None) -> tuple[Any, Any]:
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    kwargs: dict[str, Any] = {"local_files_only": local_only, "revision": revision}
    model = CLIPModel.from_pretrained(source, **kwargs)
    # the PIL image processor by name: the default one wants torchvision
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(source, **kwargs),
                              tokenizer=AutoTokenizer.from_pretrained(source, **kwargs))
    return model, processor


def load_clip(config: ClipConfig) -> tuple[Any, Any]:
    """(CLIPModel, CLIPProcessor) from a local save_pretrained folder or the hub cache, then the hub."""
    if config.model is None:
        raise ValueError("no CLIP model configured")
    local = _local(config.model)
    if local is not None:
        _check_local(local)
        try:
            return _load_parts(str(local), True, None)
        except (OSError, ValueError) as exc:
            raise ClipUnavailableError(f"{str(local)!r} is not a CLIP checkpoint saved with save_pretrained "
                                       f"(model, tokenizer and image processor): {exc}") from exc
    return _from_hub(config, lambda local_only: _load_parts(str(config.model), local_only, config.revision))


def ensure_clip_available(config: ClipConfig) -> None:
    """Fail fast, before any output exists: ClipUnavailableError unless the checkpoint's config can be found."""
    if config.model is None:
        return
    local = _local(config.model)
    if local is not None:
        _check_local(local)
        return
    from transformers import AutoConfig

    _from_hub(config, lambda local_only: AutoConfig.from_pretrained(
        str(config.model), local_files_only=local_only, revision=config.revision))


# ------------------------------------------------------------------------------------------- scoring

class ClipScorer:
    """A loaded CLIP: cosine similarity of each (image, caption) pair, in batches of `images_per_forward`."""

    def __init__(self, config: ClipConfig) -> None:
        from grit_pipeline.stages.detector_loading import resolve_autocast_dtype, resolve_device

        self.config = config
        self.model, self.processor = load_clip(config)
        self.device = resolve_device(config.device)
        self.model.to(self.device).eval()
        self.autocast = resolve_autocast_dtype("auto", self.device)  # bf16 on CUDA, None elsewhere
        vision = self.model.config.vision_config
        self.column = similarity_column(str(config.model), int(vision.patch_size), int(vision.hidden_size))
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)

    def inputs(self, images: list[Any], captions: list[str]) -> dict[str, Any]:
        """The processor's tensors for one batch, on the model's device."""
        batch = self.processor(images=images, text=captions, return_tensors="pt", padding=True, truncation=True,
                               max_length=self.max_tokens)
        return {name: tensor.to(self.device) for name, tensor in batch.items()}

    def forward(self, inputs: dict[str, Any]) -> list[float]:
        """The pairwise (diagonal) cosine similarities of one prepared batch."""
        import torch

        with torch.inference_mode(), torch.autocast("cuda", dtype=self.autocast, enabled=self.autocast is not None):
            out = self.model(**inputs)
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return (image * text).sum(dim=-1).tolist()

    def score(self, images: list[Any], captions: list[str]) -> list[float]:
        """Cosine similarity of every (image, caption) pair."""
        size = self.config.images_per_forward
        scores: list[float] = []
        for start in range(0, len(images), size):
            scores += self.forward(self.inputs(images[start : start + size], captions[start : start + size]))
        return scores

    def describe(self) -> dict[str, Any]:
        """Provenance for the manifest."""
        return {"model": self.config.model, "revision": self.config.revision, "column": self.column,
                "min_similarity": self.config.min_similarity, "recompute": self.config.recompute}


def _given(item: WorkItem, column: str) -> float | None:
    value = item.sample.fields.get(column) if column in GRIT_CLIP_COLUMNS else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class ClipStage:
    """Image-text CLIP similarity of every live pair into the model's column; pairs below `min_similarity`
    are dropped with `clip_similarity_too_low`. The model loads on first use, in its own pool (GPUs when
    configured, `workers` actors), like the grounder."""

    name = "clip"

    def __init__(self, config: BuildConfig) -> None:
        self.config: ClipConfig = config.clip
        gpus = self.config.gpus
        if gpus is None:
            gpus = 1.0 if self.config.enabled and cuda_available() else 0.0
        self.resources = Resources(cpus=CHEAP_CPUS, gpus=gpus, workers=self.config.workers)
        self._scorer: ClipScorer | None = None

    def setup(self) -> None:
        """Nothing eager: the model loads with the first batch that has a live item."""

    def scorer(self) -> ClipScorer:
        """The loaded model, once per worker (StageSetupError when it cannot load)."""
        if self._scorer is None:
            try:
                self._scorer = ClipScorer(self.config)
            except Exception as exc:
                raise StageSetupError(f"clip: cannot load the CLIP model: {exc}") from exc
        return self._scorer

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "resources": self.resources, "_scorer": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __call__(self, items: list[WorkItem]) -> list[WorkItem]:
        """Score the live items that need it, then drop those under the threshold."""
        live = [i for i in items if i.alive and i.decoded is not None and i.decoded.image is not None]
        if not live or not self.config.enabled:
            return items
        scorer = self.scorer()
        column = scorer.column
        todo = [i for i in live if self.config.recompute or _given(i, column) is None]
        if todo:
            scores = scorer.score([i.decoded.image for i in todo], [i.sample.caption or "" for i in todo])
            for item, value in zip(todo, scores, strict=True):
                item.clip_scores[column] = value
        threshold = self.config.min_similarity
        if threshold is not None:
            for item in live:
                value = item.clip_scores.get(column, _given(item, column))
                if value is not None and value < threshold:
                    item.drop(DropReason.CLIP_SIMILARITY_TOO_LOW, f"{column} {value:.4f} < {threshold}")
        return items

