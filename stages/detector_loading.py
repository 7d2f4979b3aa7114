"""GroundingDINO's configuration and loading: a hub id or a local save_pretrained folder, checked before any
work starts (offline mode honoured, an unreachable hub found in seconds), with one wording for every way
a detector can be missing."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from grit_pipeline.stages.grounding import BOX_THRESHOLD_DEFAULT, NMS_IOU_DEFAULT, BoxFilter

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"
_DTYPES = ("auto", "float32", "bfloat16", "float16")


class DetectorUnavailableError(RuntimeError):
    """The detector cannot be loaded (not cached, no network, or not a checkpoint); the CLI exits with 2."""


@dataclass(frozen=True, slots=True)
class GroundingConfig:
    """Everything that decides GroundingDINO's output for a run; saved next to the run's output."""

    detector: str = DEFAULT_DETECTOR
    box_threshold: float = BOX_THRESHOLD_DEFAULT
    nms_iou: float | None = NMS_IOU_DEFAULT
    passes_per_forward: int = 8
    device: str = "auto"
    dtype: str = "auto"
    max_text_tokens: int = 256
    preprocess_threads: int | None = None
    fast_preprocessing: bool = True
    local_files_only: bool = False
    revision: str | None = None

    def __post_init__(self) -> None:
        self.box_filter()  # validates the thresholds
        if self.passes_per_forward < 1:
            raise ValueError(f"passes_per_forward must be >= 1, got {self.passes_per_forward}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.max_text_tokens < 4:
            raise ValueError(f"max_text_tokens must be >= 4, got {self.max_text_tokens}")
        if self.preprocess_threads is not None and self.preprocess_threads < 1:
            raise ValueError(f"preprocess_threads must be >= 1 or None, got {self.preprocess_threads}")

    def box_filter(self) -> BoxFilter:
        """The score threshold and NMS IoU as the shared filter."""
        return BoxFilter(box_threshold=self.box_threshold, nms_iou=self.nms_iou)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)


def resolve_device(device: str) -> str:
    """"auto" -> cuda when available, else mps, else cpu; anything else is passed through."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_autocast_dtype(dtype: str, device: str) -> Any:
    """The autocast dtype: bf16 (fp16 where bf16 is unsupported) on CUDA for "auto", None for float32/CPU."""
    import torch

    if dtype == "float32" or not device.startswith("cuda"):
        return None
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


HUB_PROBE_TIMEOUT_S = 3.0  # a reachable hub answers a TCP connect in well under a second
_DETECTOR_HINT = "inputs that carry their own boxes need no detector: --grounder annotations"
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # NAME or OWNER/NAME; anything else can only be a path


def hub_offline(local_files_only: bool = False) -> bool:
    """True when the hub must not be contacted: `local_files_only` (--offline), HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return local_files_only or any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub cannot be reached, or None when it can.

    One TCP connect, within `timeout` seconds (name lookup included), to the hub endpoint (HF_ENDPOINT,
    default https://huggingface.co), or to the proxy that the environment names for it. huggingface_hub
    itself retries an unreachable hub five times with back-off (about 25 s) before it gives up.
    """
    import socket
    import threading
    import urllib.parse
    import urllib.request

    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    target = urllib.parse.urlparse(endpoint)
    proxy = urllib.request.getproxies().get(target.scheme)
    via = ""
    if proxy and target.hostname and not urllib.request.proxy_bypass(target.hostname):
        target = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
        via = f" through the proxy {target.hostname}:{target.port}"
    if not target.hostname:
        return None  # not a URL this probe understands: let huggingface_hub try
    try:
        port = target.port or (443 if target.scheme == "https" else 80)
    except ValueError:
        return None
    outcome: list[OSError | None] = []

    def connect() -> None:
        try:
            socket.create_connection((target.hostname, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    probe = threading.Thread(target=connect, name="grit-hub-probe", daemon=True)
    probe.start()
    probe.join(timeout)  # bounds a hanging name lookup too, which the socket timeout does not
    if outcome and outcome[0] is None:
        return None
    why = f"{type(outcome[0]).__name__}: {outcome[0]}" if outcome else f"no answer within {timeout:g} s"
    return f"the hub {endpoint} cannot be reached{via}: {why}"


def _unavailable_message(detector: str, why: str) -> str:
    return (
        f"cannot load the detector {detector!r}: it is not a local checkpoint directory and no cached copy "
        f"could be loaded from the Hugging Face hub ({why}). Provide it in one of two ways: on a machine with "
        f"internet run `huggingface-cli download {detector}` and copy the cache (HF_HOME) here, or save "
        f"it with `save_pretrained` (model, tokenizer and image processor) and pass --detector /path/to/dir; "
        f"{_DETECTOR_HINT}."
    )


def _local_detector(detector: str) -> Path | None:
    """The folder `detector` names, or None for a hub id (NAME or OWNER/NAME that is not an existing path)."""
    local = Path(detector).expanduser()
    if local.exists() or detector.startswith((".", "~")) or not _HUB_ID.fullmatch(detector):
        return local
    return None


def _check_local_detector(local: Path) -> None:
    """DetectorUnavailableError unless `local` is a folder with a config.json (the same words for every caller)."""
    if not local.exists():
        raise DetectorUnavailableError(
            f"detector directory {str(local)!r} does not exist: pass --detector with a folder saved by "
            f"save_pretrained (model, tokenizer and image processor) or a hub id; {_DETECTOR_HINT}"
        )
    if not (local / "config.json").is_file():
        what = "a file" if local.is_file() else "no config.json"
        raise DetectorUnavailableError(
            f"{str(local)!r} is not a GroundingDINO checkpoint directory ({what}): save one with save_pretrained "
            f"(model, tokenizer and image processor) and pass its folder to --detector; {_DETECTOR_HINT}"
        )


def _from_hub(config: GroundingConfig, load: Any) -> Any:
    """`load(local_files_only)` from the hub cache, then from the hub; any failure is a DetectorUnavailableError.

    Offline (--offline, HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE), the network is never touched. Online, a hub
    that cannot be reached fails within HUB_PROBE_TIMEOUT_S instead of huggingface_hub's retries.
    """
    try:
        return load(True)
    except OSError as cached_miss:
        if hub_offline(config.local_files_only):
            why = "offline: --offline, HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set, and it is not in the cache"
            raise DetectorUnavailableError(_unavailable_message(config.detector, why)) from cached_miss
    unreachable = hub_unreachable()
    if unreachable is not None:
        raise DetectorUnavailableError(_unavailable_message(config.detector, unreachable))
    try:
        return load(False)
    except (OSError, ValueError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise DetectorUnavailableError(
            _unavailable_message(config.detector, f"{type(exc).__name__}: {first_line}")) from exc


def _load_parts(source: str, local_only: bool, revision: str | None) -> tuple[Any, Any, Any]:
    from transformers import AutoModelForZeroShotObjectDetection, AutoTokenizer
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,  # direct import: the auto class wants torchvision, which we lack
    )

    kwargs: dict[str, Any] = {"local_files_only": local_only, "revision": revision}
    model = AutoModelForZeroShotObjectDetection.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    image_processor = GroundingDinoImageProcessorPil.from_pretrained(source, **kwargs)
    return model, tokenizer, image_processor


def load_detector(config: GroundingConfig) -> tuple[Any, Any, Any]:
    """(model, tokenizer, image_processor) from a local directory or the hub cache, then the hub.

    The cache is tried first without any network access; the hub only when not offline and reachable. Any
    failure to find the checkpoint raises DetectorUnavailableError naming the model and how to provide it,
    in the words of `ensure_detector_available`.
    """
    local = _local_detector(config.detector)
    if local is not None:
        _check_local_detector(local)
        try:
            return _load_parts(str(local), True, None)
        except (OSError, ValueError) as exc:
            raise DetectorUnavailableError(
                f"{str(local)!r} is not a GroundingDINO checkpoint saved with save_pretrained "
                f"(model, tokenizer and image processor): {exc}"
            ) from exc
    return _from_hub(config, lambda local_only: _load_parts(config.detector, local_only, config.revision))


def ensure_detector_available(config: GroundingConfig) -> None:
    """Fail fast, before any output exists: raise DetectorUnavailableError unless the checkpoint can be found.

    Cheap (reads the checkpoint's config only; a local folder is only looked at), so a driver can call it
    before starting workers; the workers' own loading still reports anything missing beyond the config.
    Every command calls this first, so `grit build` and `grit ground` say the same about a missing detector.
    """
    local = _local_detector(config.detector)
    if local is not None:
        _check_local_detector(local)
        return
    from transformers import AutoConfig

    _from_hub(config, lambda local_only: AutoConfig.from_pretrained(
        config.detector, local_files_only=local_only, revision=config.revision))
