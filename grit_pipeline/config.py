"""BuildConfig: the one validated, saved configuration of a `grit build` run, composed of the stage configs."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grit_pipeline.stages.agreement import AgreementConfig
from grit_pipeline.stages.annotations import AnnotationConfig
from grit_pipeline.stages.base import cuda_available
from grit_pipeline.stages.clip import ClipConfig
from grit_pipeline.stages.detector_loading import GroundingConfig
from grit_pipeline.stages.frames import FrameConfig
from grit_pipeline.stages.image import ImageConfig
from grit_pipeline.stages.quality import QualityConfig
from grit_pipeline.stages.serialize import SerializeConfig
from grit_pipeline.stages.text import TextConfig

GROUNDER_KINDS = ("grounding-dino", "annotations")
RUNNERS = ("ray", "local")
# How a Ray build is laid out: "data" is a Ray Data pipeline (per-operator progress, the grounder in its own
# actor pool), "actors" one pool of plain actors running every stage on whole shards (no Ray Data executor
# start-up), "auto" Ray Data when the grounder has GPUs and the actor pool otherwise.
RAY_ENGINES = ("auto", "data", "actors")
# Top-level fields that change where and how a run goes, never what it writes: left out of the config
# fingerprint, so a rerun on another runner or cluster resumes the same output. Batch sizes stay in: a
# detector's output can depend on its batch-mates.
_NOT_FINGERPRINTED = frozenset({"runner", "ray_address", "ray_engine", "out_dir", "progress_interval", "gpus_per_grounder",
                                "grounder_workers", "storage_options"})
# Saved configs never hold secrets: a storage option whose name says it is one is written as this.
REDACTED = "<redacted>"
_SECRET_WORDS = ("secret", "token", "password", "key", "credential", "sas")


@dataclass(frozen=True)
class BuildConfig:
    """Everything that defines a build: inputs, output, the stage configs, the grounder and the runner."""

    inputs: tuple[str, ...]
    out_dir: str
    grounder: str = "grounding-dino"
    runner: str = "ray"
    ray_address: str | None = None
    ray_engine: str = "auto"
    images_dir: str | None = None
    samples_per_shard: int = 10_000
    key_digits: int = 6
    stage_batch_size: int = 64
    grounder_workers: int = 1
    gpus_per_grounder: float = 0.0
    progress_interval: float = 10.0
    storage_options: dict[str, Any] = field(default_factory=dict)
    text: TextConfig = field(default_factory=TextConfig)
    serialize: SerializeConfig = field(default_factory=SerializeConfig)
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    annotations: AnnotationConfig = field(default_factory=AnnotationConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    frames: FrameConfig = field(default_factory=FrameConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    agreement: AgreementConfig = field(default_factory=AgreementConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(str(p) for p in self.inputs))
        if not self.inputs:
            raise ValueError("at least one input is needed")
        if self.grounder not in GROUNDER_KINDS:
            raise ValueError(f"grounder must be one of {GROUNDER_KINDS}, got {self.grounder!r}")
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        if self.ray_engine not in RAY_ENGINES:
            raise ValueError(f"ray_engine must be one of {RAY_ENGINES}, got {self.ray_engine!r}")
        for name in ("samples_per_shard", "stage_batch_size", "grounder_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.key_digits <= 12:
            raise ValueError(f"key_digits must be in [1, 12], got {self.key_digits}")
        if 10**self.key_digits < self.samples_per_shard:
            raise ValueError(f"key_digits={self.key_digits} cannot number {self.samples_per_shard} samples per shard")
        if self.gpus_per_grounder < 0 or self.progress_interval <= 0:
            raise ValueError("gpus_per_grounder must be >= 0 and progress_interval > 0")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole config (stage configs nested under their names)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = config_to_dict(value) if f.name in _STAGE_CONFIGS else _plain(value)
        out["storage_options"] = redact_secrets(self.storage_options)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildConfig:
        """The config from `to_dict` output (unknown keys are an error)."""
        values = dict(data)
        for name, stage_cls in _STAGE_CONFIGS.items():
            if name in values:
                values[name] = config_from_dict(stage_cls, values[name])
        values["inputs"] = tuple(values.get("inputs", ()))
        return cls(**values)

    def fingerprint(self) -> str:
        """sha256 of the fields that decide what is written (not where or how fast it runs)."""
        payload = _strip(self.to_dict())
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


_STAGE_CONFIGS: dict[str, type] = {"text": TextConfig, "serialize": SerializeConfig,
                                   "grounding": GroundingConfig, "annotations": AnnotationConfig,
                                   "image": ImageConfig, "frames": FrameConfig, "quality": QualityConfig,
                                   "clip": ClipConfig, "agreement": AgreementConfig}


def redact_secrets(options: dict[str, Any]) -> dict[str, Any]:
    """Storage options with the values of secret-looking names (key, secret, token...) replaced by REDACTED."""
    def redact(name: str, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: redact(k, v) for k, v in value.items()}
        return REDACTED if any(word in name.lower() for word in _SECRET_WORDS) else value

    return {name: redact(name, value) for name, value in options.items()}


def _without_redacted(options: dict[str, Any]) -> dict[str, Any]:
    return {k: _without_redacted(v) if isinstance(v, dict) else v for k, v in options.items() if v != REDACTED}


def location(text: str) -> str:
    """An input or output as saved in the config: a URL as given (file:// made a path), a path made absolute."""
    from grit_pipeline.storage import Folder

    return Folder(text).url


def config_to_dict(config: Any) -> dict[str, Any]:
    """A stage config as a JSON-ready dict: its own `to_dict` when it has one, else its fields."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """A stage config from `config_to_dict` output: its own `from_dict` when it has one."""
    if hasattr(cls, "from_dict"):
        return cls.from_dict(data)
    return cls(**data)


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


# Stage-config fields that only change speed or where weights are looked up, never what is written.
_NOT_FINGERPRINTED_IN_STAGE = {"grounding": frozenset({"preprocess_threads", "local_files_only"}),
                               "clip": frozenset({"gpus", "workers", "local_files_only"})}


def _strip(data: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in data.items() if k not in _NOT_FINGERPRINTED}
    if isinstance(out.get("clip"), dict) and out["clip"].get("model") is None:
        del out["clip"]  # the CLIP stage is off: fingerprints of builds without it stay as they were
    if isinstance(out.get("agreement"), dict) and out["agreement"].get("detector") is None:
        del out["agreement"]  # no second detector: the same
    for stage, names in _NOT_FINGERPRINTED_IN_STAGE.items():
        if isinstance(out.get(stage), dict):
            out[stage] = {k: v for k, v in out[stage].items() if k not in names}
    return out


# ---------------------------------------------------------------------------------------------- making one

NMS_OFF = "off"
"""The option value that disables class-agnostic NMS (`--nms-iou off`)."""

# Flat option name (as on the command line) -> where it goes in the config (stage, field).
_OPTION_PATHS: dict[str, tuple[tuple[str, str], ...]] = {
    "detector": (("grounding", "detector"),),
    "box_threshold": (("grounding", "box_threshold"), ("annotations", "box_threshold")),
    "nms_iou": (("grounding", "nms_iou"), ("annotations", "nms_iou")),
    "passes_per_forward": (("grounding", "passes_per_forward"),),
    "device": (("grounding", "device"),),
    "dtype": (("grounding", "dtype"),),
    "offline": (("grounding", "local_files_only"),),
    "spacy_model": (("text", "spacy_model"),),
    "mode": (("serialize", "mode"),),
    "max_pixels": (("image", "max_pixels"),),
    "box_frame": (("frames", "box_frame"),),
    "resize_mode": (("frames", "resize_mode"),),
    "min_cropped_box_fraction": (("frames", "min_cropped_box_fraction"),),
    "agreement_detector": (("agreement", "detector"),),
    "agreement_iou": (("agreement", "iou"),),
    "clip_model": (("clip", "model"),),
    "min_clip_similarity": (("clip", "min_similarity"),),
    "recompute_clip": (("clip", "recompute"),),
    "max_box_area_fraction": (("quality", "max_box_area_fraction"),),
    "min_box_side": (("quality", "min_box_side_px"),),
    "max_boxes_per_phrase": (("quality", "max_boxes_per_phrase"),),
    "min_image_side": (("quality", "min_image_side_px"),),
    "quality": (),  # a preset name ("strict", "off"): sets every quality field; the flags above override it
}
OPTION_NAMES = frozenset(_OPTION_PATHS) | {f.name for f in dataclasses.fields(BuildConfig)
                                          if f.name not in _STAGE_CONFIGS and f.name not in ("inputs", "out_dir")}


def build_config(inputs: tuple[str, ...] | None = None, out_dir: str | None = None, *,
                 base: dict[str, Any] | None = None, **options: Any) -> BuildConfig:
    """The one way to make a run's BuildConfig: the CLI, the Python API and the demo all call this.

    Starts from `base` (a saved config.json's config, or the defaults), then applies every option that is
    not None: top-level fields by name, stage fields by their flat command-line names (`detector`,
    `box_threshold`, `nms_iou` (a float or "off"), `spacy_model`, `mode`, `box_frame`, ...). Paths are
    made absolute; URLs (s3://, gs://...) are kept. Secret storage options of a saved config are left out
    (they were never saved): pass them again. When neither the options nor `base` set `gpus_per_grounder`, it is 1 for GroundingDINO
    on a machine with CUDA, else 0. ValueError names an unknown option or an invalid value.
    """
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise ValueError(f"unknown config option(s): {', '.join(unknown)}")
    values: dict[str, Any] = json.loads(json.dumps(base)) if base else {}
    if inputs is not None:
        values["inputs"] = [location(str(p)) for p in inputs]
    if out_dir is not None:
        values["out_dir"] = location(str(out_dir))
    values["storage_options"] = _without_redacted(values.get("storage_options") or {})
    if not values.get("inputs") or not values.get("out_dir"):
        raise ValueError("a build needs its inputs and an output folder (or a config file that names them)")
    if options.get("quality") is not None:
        values["quality"] = QualityConfig.preset(options["quality"]).to_dict()
    for name, value in options.items():
        if value is None or name == "quality":
            continue
        if name == "nms_iou" and value == NMS_OFF:
            value = None
        for stage, stage_field in _OPTION_PATHS.get(name, ()):
            values.setdefault(stage, {})[stage_field] = value
        if name not in _OPTION_PATHS:
            values[name] = value
    if "gpus_per_grounder" not in values:
        values["gpus_per_grounder"] = 1.0 if values.get("grounder", "grounding-dino") == "grounding-dino" \
            and cuda_available() else 0.0
    stage_defaults = BuildConfig(inputs=("-",), out_dir="-").to_dict()
    for stage in _STAGE_CONFIGS:  # a partial stage section keeps the defaults of the fields it leaves out
        if stage in values:
            values[stage] = {**stage_defaults[stage], **values[stage]}
    try:
        return BuildConfig.from_dict(values)
    except TypeError as exc:  # a saved config with a field this version does not have
        raise ValueError(f"config: {exc}") from exc


def load_config_file(path: str) -> dict[str, Any]:
    """The config dict of a saved OUT/config.json (or of a bare config object); ValueError when unusable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read config file {path}: {exc}") from exc
    config = data.get("config", data) if isinstance(data, dict) else None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a grit build config (a JSON object, or config.json's {{'config': ...}})")
    return config

