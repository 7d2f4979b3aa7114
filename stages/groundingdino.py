"""GroundingDINO phrase grounding through transformers (no `groundingdino-py`).

A caption's noun chunks become the prompt "chunk . chunk . chunk ."; prompts longer than the model's text
limit are split into several passes whose boxes are merged before filtering. Each predicted box goes to the
chunk whose tokens score highest (token-level logits, never decoded labels); then the paper's filter
(score > 0.65, class-agnostic NMS over the image) decides what is kept.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grit_pipeline.io import file_sha256
from grit_pipeline.records import DropReason
from grit_pipeline.stages.box_selection import (
    SelectedBoxes,
    result_from_selected,
    select_boxes,
    token_phrase_columns,
)
from grit_pipeline.stages.detector_loading import (
    DetectorUnavailableError,
    GroundingConfig,
    load_detector,
    resolve_autocast_dtype,
    resolve_device,
)
from grit_pipeline.stages.grounding import GroundingRequest, GroundingResult, ungroundable_result
from grit_pipeline.stages.prompts import PromptPlan, TextPass, plan_prompts, prompt_text
from grit_pipeline.work import batched


class GroundingDinoGrounder:
    """GroundingDINO on transformers; load once per worker, then call `ground` on batches of requests."""

    def __init__(self, config: GroundingConfig | None = None):
        self.config = config or GroundingConfig()
        self.device = resolve_device(self.config.device)
        self.autocast_dtype = resolve_autocast_dtype(self.config.dtype, self.device)
        model, self.tokenizer, self.image_processor = load_detector(self.config)
        self.model = model.to(self.device).eval()  # moved once, here
        self._box_filter = self.config.box_filter()
        self._special_ids = _special_token_ids(self.tokenizer)
        # never longer than the checkpoint's own text limit (its logits are padded to max_text_len)
        self.max_text_tokens = min(self.config.max_text_tokens, getattr(model.config, "max_text_len", 256))
        self._weights_digest: str | None = None
        self.preprocess_threads = self.config.preprocess_threads or _default_preprocess_threads(self.device)
        self.fast_preprocessing = self.config.fast_preprocessing and is_standard_processor(self.image_processor)
        self._collect_stream: Any = None  # CUDA only: post-processing runs beside the next forward

    def ground(self, batch: Sequence[GroundingRequest]) -> list[GroundingResult]:
        """Ground every request; requests without image or phrases come back dropped with the reason."""
        results: list[GroundingResult | None] = [None] * len(batch)
        groundable: list[int] = []
        for index, request in enumerate(batch):
            if not request.phrases:
                results[index] = ungroundable_result(0, DropReason.NO_NOUN_CHUNKS)
            elif request.image is None:
                results[index] = ungroundable_result(len(request.phrases), DropReason.IMAGE_MISSING)
            else:
                groundable.append(index)
        plans = dict(zip(groundable, self._plan_all([batch[i] for i in groundable]), strict=True))
        for index, result in self._run_passes(batch, plans).items():
            results[index] = result
        return [r for r in results if r is not None]

    def plan(self, request: GroundingRequest) -> PromptPlan:
        """The text passes for one request's phrases."""
        return self._plan_all([request])[0]

    def _plan_all(self, requests: Sequence[GroundingRequest]) -> list[PromptPlan]:
        """`plan` for many requests, with one tokenizer call for all their distinct chunk texts."""
        texts = [[request.caption[p.chunk.start : p.chunk.end] for p in request.phrases] for request in requests]
        distinct = [t for t in dict.fromkeys(prompt_text(t) for chunk_texts in texts for t in chunk_texts) if t]
        token_ids = dict(zip(distinct, self._tokenize(distinct) if distinct else [], strict=True))

        def lookup(prompt_texts: list[str]) -> list[list[int]]:
            return [token_ids[t] for t in prompt_texts]

        return [plan_prompts(chunk_texts, lookup, self._special_ids, self.max_text_tokens) for chunk_texts in texts]

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _finish(self, request: GroundingRequest, plan: PromptPlan,
                selections: list[tuple[SelectedBoxes, list[int]]]) -> GroundingResult:
        return result_from_selected(selections, plan.phrase_targets, len(request.phrases), self._box_filter)

    def _run_passes(self, batch: Sequence[GroundingRequest], plans: dict[int, PromptPlan]) -> dict[int, GroundingResult]:
        """Run every text pass, several per forward, and filter each request's boxes once all its passes ran.

        The calling thread only runs forwards. While forward i runs, one helper thread prepares forward
        i+1's inputs (image resizing over `preprocess_threads` threads, padding into pinned memory, the
        copy to the device) and another turns forward i-1's outputs into boxes (assignment, threshold and
        NMS on the device, one transfer back, then the results), so that work overlaps the model instead
        of adding to it. A forward that fails is retried pass by pass; a request whose own pass fails is
        dropped with STAGE_ERROR, and when every pass of the failed forward fails alone the error is
        raised (it is not the data's fault).
        """
        from concurrent.futures import ThreadPoolExecutor

        state = _PassState(plans)
        chunks = batched([(i, p) for i, plan in plans.items() for p in plan.passes], self.config.passes_per_forward)
        with contextlib.ExitStack() as stack:
            resize_pool = None
            if self.fast_preprocessing and self.preprocess_threads > 1:
                resize_pool = stack.enter_context(
                    ThreadPoolExecutor(self.preprocess_threads, thread_name_prefix="grit-resize")
                )
            preparer = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="grit-prepare"))
            collector = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="grit-collect"))

            def prepare(chunk: list[tuple[int, TextPass]]) -> dict[str, Any]:
                return self.prepare_inputs([batch[i].image for i, _ in chunk], [p.input_ids for _, p in chunk],
                                           resize_pool=resize_pool)

            upcoming = preparer.submit(prepare, chunks[0]) if chunks else None
            collected = []
            for number, chunk in enumerate(chunks):
                current = upcoming
                if number + 1 < len(chunks):
                    upcoming = preparer.submit(prepare, chunks[number + 1])
                try:
                    raw = self._forward_raw(current.result())
                except Exception as exc:  # noqa: BLE001 - isolate the failing pass below
                    collected.extend(self._retry_alone(chunk, prepare, collector, state, batch, exc))
                    continue
                collected.append(collector.submit(self._collect, chunk, raw, state, batch))
            for done in collected:
                done.result()  # re-raises a helper failure here
        for index in list(state.selections):  # a plan with no pass: every chunk was empty after cleaning
            state.results[index] = self._finish(batch[index], plans[index], state.selections.pop(index))
        return state.results

    def _retry_alone(self, chunk: list[tuple[int, TextPass]], prepare: Any, helper: Any, state: _PassState,
                     batch: Sequence[GroundingRequest], error: Exception) -> list[Any]:
        """Run a failed forward's passes one at a time; drop the requests whose own pass fails."""
        futures, failures = [], 0
        for item in chunk:
            try:
                raw = self._forward_raw(prepare([item]))
            except Exception as exc:  # noqa: BLE001 - counted as STAGE_ERROR for this request only
                failures += 1
                futures.append(helper.submit(state.fail, item[0], batch[item[0]], exc))
                continue
            futures.append(helper.submit(self._collect, [item], raw, state, batch))
        if len(chunk) > 1 and failures == len(chunk):
            raise error
        return futures

    def _collect(self, chunk: list[tuple[int, TextPass]], raw: _RawOutputs, state: _PassState,
                 batch: Sequence[GroundingRequest]) -> None:
        """Boxes from one forward's outputs (selected on the device, one transfer); finished requests get results."""
        import torch

        passes = [text_pass for _, text_pass in chunk]
        nms_rows = [len(state.plans[index].passes) == 1 for index, _ in chunk]  # else NMS once merged
        with torch.inference_mode(), self._beside_the_forward(raw):
            probs, corners = _probabilities_and_corners(raw.logits, raw.pred_boxes)
            columns = token_phrase_columns(passes, probs.shape[-1])
            selected = select_boxes(probs, corners, columns, self._box_filter, nms_rows)
        for (index, text_pass), selection in zip(chunk, selected, strict=True):
            if index in state.failed:
                continue
            state.selections[index].append((selection, text_pass.phrase_ids))
            state.passes_left[index] -= 1
            if state.passes_left[index] == 0:
                state.results[index] = self._finish(batch[index], state.plans[index], state.selections.pop(index))

    def _beside_the_forward(self, raw: _RawOutputs) -> contextlib.AbstractContextManager:
        """On CUDA, a stream of its own that starts once the outputs are ready, so its waits skip later forwards."""
        if raw.ready is None:
            return contextlib.nullcontext()
        import torch

        if self._collect_stream is None:
            self._collect_stream = torch.cuda.Stream(device=self.device)
        self._collect_stream.wait_event(raw.ready)
        for tensor in (raw.logits, raw.pred_boxes):
            tensor.record_stream(self._collect_stream)  # not reused by the next forward while read here
        return torch.cuda.stream(self._collect_stream)

    def prepare_inputs(self, images: Sequence[Any], token_ids: Sequence[list[int]],
                       resize_pool: Any = None) -> dict[str, Any]:
        """Model inputs for one forward, on the device: pixels with pixel masks, text with attention masks.

        On CUDA every host tensor is pinned and copied without blocking, so the calling thread never waits
        for the forward that is running.
        """
        import numpy as np
        import torch

        longest = max(len(ids) for ids in token_ids)
        text = np.zeros((2, len(token_ids), longest), dtype=np.int64)  # input ids, attention mask
        for row, ids in enumerate(token_ids):
            text[0, row, : len(ids)] = ids
            text[1, row, : len(ids)] = 1
        input_ids, attention_mask = self._to_device(torch.from_numpy(text)).unbind(0)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "token_type_ids": torch.zeros_like(input_ids)}
        if not self.fast_preprocessing:
            processed = self.image_processor(images=list(images), return_tensors="pt")
            return {**inputs, **{name: self._to_device(tensor) for name, tensor in processed.items()}}
        # 8-bit pixels travel to the device (a quarter of the bytes) and are normalised there; so is the mask
        pixels, sizes = self._resize_into_buffer(images, resize_pool)
        pixel_values, pixel_mask = self._pixels_on_device(self._to_device(pixels), self._to_device(sizes))
        return {**inputs, "pixel_values": pixel_values, "pixel_mask": pixel_mask}

    def _to_device(self, tensor: Any) -> Any:
        if self.device.startswith("cuda"):
            return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def preprocess_images(self, images: Sequence[Any]) -> dict[str, Any]:
        """pixel_values and pixel_mask on the CPU, as the checkpoint's image processor makes them for one batch."""
        if not self.fast_preprocessing:
            return self.image_processor(images=list(images), return_tensors="pt")
        pixels, sizes = self._resize_into_buffer(images, None, pinned=False)
        pixel_values, pixel_mask = self._pixels_on_device(pixels, sizes)
        return {"pixel_values": pixel_values, "pixel_mask": pixel_mask}

    def _resize_into_buffer(self, images: Sequence[Any], pool: Any, pinned: bool | None = None) -> tuple[Any, Any]:
        """(batch, H, W, 3) 8-bit pixels resized exactly as the processor does, zero-padded bottom-right, and the sizes.

        Resizing uses the processor's own size rule and PIL filter, and each image is written straight into
        one (pinned, on CUDA) buffer, in `pool`'s threads when given (PIL and numpy release the GIL there).
        The sizes are a (batch, 2) int64 tensor of (height, width).
        """
        import numpy as np
        import torch
        from transformers.image_transforms import get_size_with_aspect_ratio

        size, resample = self.image_processor.size, self.image_processor.resample
        targets = [get_size_with_aspect_ratio((im.height, im.width), size.shortest_edge, size.longest_edge)
                   for im in images]
        height, width = max(h for h, _ in targets), max(w for _, w in targets)
        pin = self.device.startswith("cuda") if pinned is None else pinned
        buffer = torch.empty((len(images), height, width, 3), dtype=torch.uint8, pin_memory=pin)
        array = buffer.numpy()

        def resize_into(row: int) -> None:
            image, (h, w) = images[row], targets[row]
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            array[row, :h, :w] = np.asarray(rgb.resize((w, h), resample=resample))
            array[row, h:] = 0
            array[row, :h, w:] = 0

        if pool is not None and len(images) > 1:
            list(pool.map(resize_into, range(len(images))))
        else:
            for row in range(len(images)):
                resize_into(row)
        return buffer, torch.tensor(targets, dtype=torch.int64)  # _to_device pins it

    def _pixels_on_device(self, pixels_hwc: Any, sizes: Any) -> tuple[Any, Any]:
        """Normalised (batch, 3, H, W) pixel values and the (batch, H, W) pixel mask, on the pixels' device."""
        import torch

        _, height, width, _ = pixels_hwc.shape
        rows = torch.arange(height, device=pixels_hwc.device)[None, :, None] < sizes[:, 0, None, None]
        columns = torch.arange(width, device=pixels_hwc.device)[None, None, :] < sizes[:, 1, None, None]
        pixel_mask = (rows & columns).long()
        return self._normalize(pixels_hwc.permute(0, 3, 1, 2), pixel_mask), pixel_mask

    def _normalize(self, pixels_uint8: Any, pixel_mask: Any) -> Any:
        """Rescale and normalise like the processor; padding stays 0 (the processor pads after normalising).

        One strided pass makes contiguous float32 (batch, 3, H, W) values; the rest is in place.
        """
        import torch

        processor = self.image_processor
        mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=pixels_uint8.device).view(1, -1, 1, 1)
        std = torch.tensor(processor.image_std, dtype=torch.float32, device=pixels_uint8.device).view(1, -1, 1, 1)
        values = pixels_uint8.to(torch.float32, memory_format=torch.contiguous_format)
        values.mul_(processor.rescale_factor).sub_(mean).div_(std)
        return values.mul_(pixel_mask[:, None])

    def forward(self, images: Sequence[Any], token_ids: Sequence[list[int]]) -> tuple[Any, Any]:
        """Token probabilities (batch, queries, tokens) and corner boxes (batch, queries, 4) as numpy arrays."""
        import torch

        raw = self._forward_raw(self.prepare_inputs(images, token_ids))
        with torch.inference_mode():
            probs, corners = _probabilities_and_corners(raw.logits, raw.pred_boxes)
        return probs.cpu().numpy(), corners.cpu().numpy()

    def _forward_raw(self, inputs: dict[str, Any]) -> _RawOutputs:
        """The model's logits and boxes, and on CUDA an event marking when they are ready (nothing waits here)."""
        import torch

        with torch.inference_mode(), self._autocast():
            outputs = self.model(**inputs)
        ready = None
        if self.device.startswith("cuda"):
            ready = torch.cuda.Event()
            ready.record()
        return _RawOutputs(outputs.logits, outputs.pred_boxes, ready)

    def _autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.autocast_dtype)

    def describe(self) -> dict[str, Any]:
        """Provenance for the manifest: detector id, resolved revision or weights digest, thresholds."""
        return {
            **self.config.to_dict(),
            "grounder": "grounding-dino",
            "model_class": type(self.model).__name__,
            "revision": getattr(self.model.config, "_commit_hash", None),
            "weights_sha256": self._local_weights_digest(),
            "device": self.device,
            "autocast_dtype": str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else None,
        }

    def _local_weights_digest(self) -> str | None:
        """sha256 of a local checkpoint folder's weight files, hashed in name order (None for a hub id)."""
        local = Path(self.config.detector).expanduser()
        if self._weights_digest is None and local.is_dir():
            self._weights_digest = file_sha256(*sorted(local.glob("*.safetensors")), *sorted(local.glob("*.bin")))
        return self._weights_digest


@dataclass(frozen=True, slots=True)
class _RawOutputs:
    """One forward's logits (passes, queries, tokens) and boxes (passes, queries, 4), still on the device."""

    logits: Any
    pred_boxes: Any
    ready: Any = None  # a CUDA event recorded after the forward; None elsewhere


def _probabilities_and_corners(logits: Any, pred_boxes: Any) -> tuple[Any, Any]:
    """Sigmoid token probabilities and (x1, y1, x2, y2) corners from the model's (cx, cy, w, h), in float32."""
    import torch

    probs = logits.float().sigmoid()
    cx, cy, w, h = pred_boxes.float().unbind(-1)
    return probs, torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


class _PassState:
    """Book-keeping of one `ground` call across forwards: selected boxes, passes still to run, results."""

    def __init__(self, plans: dict[int, PromptPlan]):
        self.plans = plans
        self.selections: dict[int, list[tuple[SelectedBoxes, list[int]]]] = {index: [] for index in plans}
        self.passes_left = {index: len(plan.passes) for index, plan in plans.items()}
        self.results: dict[int, GroundingResult] = {}
        self.failed: set[int] = set()

    def fail(self, index: int, request: GroundingRequest, error: Exception) -> None:
        """Drop request `index` with STAGE_ERROR (its pass failed even alone)."""
        if index in self.failed:
            return
        self.failed.add(index)
        self.selections.pop(index, None)
        result = ungroundable_result(len(request.phrases), DropReason.STAGE_ERROR)
        result.error = f"grounding-dino: {type(error).__name__}: {error}"
        self.results[index] = result


def _special_token_ids(tokenizer: Any) -> dict[str, int]:
    dot = tokenizer.convert_tokens_to_ids(".")
    if dot is None or dot == tokenizer.unk_token_id:
        raise DetectorUnavailableError("the detector's tokenizer has no '.' token to delimit phrases")
    return {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "dot": dot}


def _default_preprocess_threads(device: str) -> int:
    """One thread on CPU (the forward needs the cores); on an accelerator, up to 8 cores feed it."""
    if not device.startswith(("cuda", "mps")):
        return 1
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def is_standard_processor(processor: Any) -> bool:
    """True when the processor does exactly resize (shortest/longest edge), rescale, normalise, pad.

    Only then are its steps reproduced by the fast path (tested equal to the processor); any other
    configuration goes through the processor itself.
    """
    size = getattr(processor, "size", None)
    return bool(
        getattr(processor, "do_resize", False)
        and getattr(size, "shortest_edge", None)
        and getattr(size, "longest_edge", None)
        and getattr(processor, "do_rescale", False)
        and getattr(processor, "do_normalize", False)
        and getattr(processor, "do_pad", False)
        and getattr(processor, "pad_size", None) is None
        and not getattr(processor, "do_center_crop", False)
    )
