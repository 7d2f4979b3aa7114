"""GPU figures for the grounding stage: grounding-dino-tiny's architecture, random weights, bf16.

Builds the IDEA-Research/grounding-dino-tiny architecture by hand (Swin-T backbone, BERT-base text encoder,
6+6 layers, 900 queries; nothing is downloaded), then at batch 1, 8 and 16 reports images/s of the bare
model forward and, when the repository's package imports, of the whole grounding stage on the same batches,
with peak GPU memory. Each batch size runs at least `--min-batches` batches (default 8), so the stage is
measured in its steady state: its first batch's preprocessing and last batch's post-processing cannot
overlap a forward, which a 2-batch run would count twice as heavily. Forward and stage runs alternate and
each keeps its best of `--repeats`. Prints one JSON object. Needs only torch, transformers and pillow
(numpy comes with them); about a minute on an H100 (`--budget-s` drops to one repeat when time runs short).

    python scripts/gpu_grounding.py [--images-per-size 32] [--min-batches 8] [--batch-sizes 1,8,16]

`--cpu-profile` needs no GPU: the stage's CPU cost per image with the model forward replaced by fixed
outputs of the real sizes (900 queries x 256 tokens, random logits so most boxes pass, web-size images
resized to 800 px), split into its parts.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import string
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CAPTION = "a man with a red hat rides a bike on the street next to a white car and a dog"
CHUNKS = ["a man", "a red hat", "a bike", "the street", "a white car", "a dog"]


def _requests(images: list) -> list:
    """One GroundingRequest per image: CAPTION with each of CHUNKS as a phrase."""
    from grit_pipeline.records import Span
    from grit_pipeline.stages.grounding import GroundingRequest
    from grit_pipeline.stages.text import Phrase

    starts = [CAPTION.index(c) for c in CHUNKS]
    phrases = [Phrase(Span(s, s + len(c)), Span(s, s + len(c)), c.split()[-1]) for s, c in zip(starts, CHUNKS, strict=True)]
    return [GroundingRequest(key=str(i), caption=CAPTION, phrases=phrases, image=im) for i, im in enumerate(images)]


def tiny_architecture_config():
    """GroundingDinoConfig equal to IDEA-Research/grounding-dino-tiny's config.json, written out by hand."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    swin_t = SwinConfig(image_size=224, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                        window_size=7, out_indices=[2, 3, 4])
    bert_base = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, max_position_embeddings=512)
    return GroundingDinoConfig(backbone_config=swin_t, text_config=bert_base, d_model=256, num_queries=900,
                               encoder_layers=6, decoder_layers=6, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                               max_text_len=256, two_stage=True, num_feature_levels=4)


def synthetic_tokenizer():
    """A BERT tokenizer over a synthetic vocabulary with bert-base-uncased's special-token ids."""
    from transformers import BertTokenizer

    tokens = [f"[unused{i}]" for i in range(30522)]
    for token, index in {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012,
                         "?": 1029}.items():
        tokens[index] = token
    pieces = list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase]
    pieces += sorted({w for c in CHUNKS for w in c.split()})
    for offset, piece in enumerate(pieces):
        tokens[2000 + offset] = piece
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)


def web_images(count: int, seed: int = 0) -> list[Image.Image]:
    """Noise images of typical web sizes (the processor resizes them to 800 px on the short side)."""
    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (500, 375), (1024, 683), (480, 640), (800, 800)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in
            (sizes[i % len(sizes)] for i in range(count))]


def import_stage():
    """The repository's grounder, importable without installing the package; None when it cannot import."""
    try:
        import grit_pipeline.stages.groundingdino as module  # installed
        return module
    except ImportError:
        pass
    try:
        sys.path.insert(0, str(ROOT))
        import grit_pipeline  # noqa: F401 - the core package folder at the repository root

        spec = importlib.util.spec_from_file_location(
            "grit_pipeline.stages", ROOT / "stages" / "__init__.py", submodule_search_locations=[str(ROOT / "stages")]
        )
        stages = importlib.util.module_from_spec(spec)
        sys.modules["grit_pipeline.stages"] = stages
        spec.loader.exec_module(stages)
        import grit_pipeline.stages.groundingdino as module

        return module
    except ImportError as exc:  # e.g. pyarrow missing on the GPU box: report the bare forward only
        print(f"stage not importable ({exc}); reporting the model forward only", file=sys.stderr)
        return None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(run) -> float:
    _sync()
    start = time.perf_counter()
    run()
    _sync()
    return time.perf_counter() - start


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-size", type=int, default=32, help="At least this many images per batch size.")
    parser.add_argument("--min-batches", type=int, default=8, help="At least this many batches per batch size.")
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs of each kind; the best one counts.")
    parser.add_argument("--budget-s", type=float, default=80.0, help="Past this, one timed run per kind.")
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--allow-cpu", action="store_true", help="Smoke-test the script on CPU (float32, slow).")
    parser.add_argument("--cpu-profile", action="store_true", help="CPU cost per image of the stage minus the forward.")
    args = parser.parse_args()
    if args.cpu_profile:
        print(json.dumps(cpu_profile(), indent=1))
        return
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(json.dumps({"error": "no CUDA device"}))
        sys.exit(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from transformers import GroundingDinoForObjectDetection
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = GroundingDinoForObjectDetection(tiny_architecture_config()).eval()
    tokenizer, image_processor = synthetic_tokenizer(), GroundingDinoImageProcessorPil()
    stage_module = import_stage()
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
              "dtype": "bfloat16" if device == "cuda" else "float32",
              "architecture": "grounding-dino-tiny (Swin-T + BERT-base, random weights)",
              "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1), "runs": []}
    grounder = None
    if stage_module is not None:
        folder = tempfile.mkdtemp(prefix="gdino-tiny-")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        image_processor.save_pretrained(folder)
        config = stage_module.GroundingConfig(detector=folder, dtype="bfloat16", device=device)
        grounder = stage_module.GroundingDinoGrounder(config)
        model = grounder.model
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    images = web_images(max(max(args.images_per_size, args.min_batches * b) for b in sizes))
    for batch_size in sizes:
        count = max(args.images_per_size, args.min_batches * batch_size)
        repeats = args.repeats if time.perf_counter() - started < args.budget_s else 1
        report["runs"].append(run_batch_size(model, tokenizer, image_processor, grounder, batch_size,
                                             images[:count], device, repeats))
    if grounder is not None:
        report["selection_check"] = check_selection(stage_module, grounder, images[: max(sizes)])
    report["seconds_total"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))


def run_batch_size(model, tokenizer, image_processor, grounder, batch_size: int, images: list, device: str,
                   repeats: int) -> dict:
    """images/s of the bare bf16 forward and of the stage over the same batches, and peak memory."""
    count = len(images)
    prompt = " . ".join(CHUNKS) + " ."
    batches = [images[i : i + batch_size] for i in range(0, count, batch_size)]
    inputs = []
    for batch in batches:  # the stage's fast preprocessing is tested equal to the processor, and much quicker
        pixels = grounder.preprocess_images(batch) if grounder else image_processor(images=batch, return_tensors="pt")
        text = tokenizer([prompt] * len(batch), return_tensors="pt", padding=True)
        inputs.append({k: v.to(device) for k, v in {**pixels, **text}.items()})

    def forward_all(selected=inputs) -> None:
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            for batch_inputs in selected:
                model(**batch_inputs)

    forward_all(inputs[:2])  # warm-up (kernel selection)
    runs = {"forward": forward_all}
    requests = []
    if grounder is not None:
        requests = _requests(images)
        grounder.config = dataclasses.replace(grounder.config, passes_per_forward=batch_size)  # the same batches
        grounder.ground(requests[: 2 * batch_size])  # warm-up (pinned memory, streams)
        runs["stage"] = lambda: grounder.ground(requests)
    best = dict.fromkeys(runs, float("inf"))
    peaks = dict.fromkeys(runs, 0.0)
    cpu_s = dict.fromkeys(runs, float("inf"))  # CPU seconds of all threads, the forward's kernel launches included
    for _ in range(repeats):  # alternate, so that both meet the same machine state
        for name, run in runs.items():
            reset_peak()
            cpu = time.process_time()
            best[name] = min(best[name], timed(run))
            cpu_s[name] = min(cpu_s[name], time.process_time() - cpu)
            peaks[name] = max(peaks[name], peak_gib() or 0.0)
    result = {"batch_size": batch_size, "images": count, "batches": len(batches), "repeats": repeats,
              "forward_images_per_s": round(count / best["forward"], 1),
              "forward_peak_gpu_mem_gib": peaks["forward"] if device == "cuda" else None,
              "forward_cpu_ms_per_image": round(1000 * cpu_s["forward"] / count, 1)}
    if grounder is not None:
        kept = sum(len(boxes) for result_ in grounder.ground(requests[:batch_size]) for boxes in result_.boxes)
        result.update({"stage_images_per_s": round(count / best["stage"], 1),
                       "ratio": round(best["forward"] / best["stage"], 3),
                       "stage_peak_gpu_mem_gib": peaks["stage"] if device == "cuda" else None,
                       "stage_cpu_ms_per_image": round(1000 * cpu_s["stage"] / count, 1),
                       "kept_boxes_per_image": round(kept / batch_size, 1),
                       "preprocess_threads": grounder.preprocess_threads})
    return result


def check_selection(module, grounder, images: list) -> dict:
    """The stage's device-side selection (assignment, threshold, clamping, NMS rounds) on this device's real
    outputs, compared exactly with the reference numpy logic on the same probabilities, and with itself on CPU."""
    from grit_pipeline.stages import box_selection, grounding

    requests = _requests(images)
    plans = grounder._plan_all(requests)
    chunk = [(i, p) for i, plan in enumerate(plans) for p in plan.passes]
    raw = grounder._forward_raw(grounder.prepare_inputs([images[i] for i, _ in chunk], [p.input_ids for _, p in chunk]))
    with torch.inference_mode():
        probs, corners = module._probabilities_and_corners(raw.logits, raw.pred_boxes)
    columns = box_selection.token_phrase_columns([p for _, p in chunk], probs.shape[-1])
    probs_np, corners_np = probs.cpu().numpy(), corners.cpu().numpy()
    report = {"requests": len(chunk)}
    for filter_name, box_filter in (("default", grounder._box_filter),
                                    ("threshold_0.3", grounding.BoxFilter(box_threshold=0.3, nms_iou=0.6))):
        expected = []
        for row, (index, text_pass) in enumerate(chunk):
            candidates = grounding.assign_boxes(probs_np[row, :, : len(text_pass.input_ids)], corners_np[row],
                                                text_pass.phrase_tokens, text_pass.phrase_ids,
                                                min_score=box_filter.box_threshold)
            expected.append(grounding.result_from_candidates(candidates, plans[index].phrase_targets, len(CHUNKS),
                                                             box_filter))
        for where, (p, c) in (("device", (probs, corners)), ("cpu", (probs.cpu(), corners.cpu()))):
            selected = box_selection.select_boxes(p, c, columns, box_filter, [True] * len(chunk))
            got = [box_selection.result_from_selected([(selection, text_pass.phrase_ids)], plans[index].phrase_targets,
                                                  len(CHUNKS), box_filter)
                   for (index, text_pass), selection in zip(chunk, selected, strict=True)]
            report[f"{filter_name}_{where}_mismatches"] = sum(
                a.boxes != b.boxes or a.dropped != b.dropped for a, b in zip(got, expected, strict=True))
        report[f"{filter_name}_kept_boxes"] = sum(len(b) for r in expected for b in r.boxes)
    return report


class _FixedOutputs:
    """Stands in for the model: returns fixed logits (batch, 900, 256) and boxes of the real sizes."""

    def __init__(self, batch: int, queries: int = 900, tokens: int = 256, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.logits = torch.randn(batch, queries, tokens, generator=generator) + 1.5  # most sigmoids above 0.65
        sizes = torch.rand(batch, queries, 2, generator=generator) * 0.5 + 0.02
        centres = torch.rand(batch, queries, 2, generator=generator)
        self.pred_boxes = torch.cat((centres, sizes), dim=-1)  # (cx, cy, w, h); some corners fall outside

    def __call__(self, **inputs):
        rows = inputs["input_ids"].shape[0]
        return types.SimpleNamespace(logits=self.logits[:rows].clone(), pred_boxes=self.pred_boxes[:rows].clone())


def cpu_profile(batch_size: int = 16, count: int = 64) -> dict:
    """CPU ms per image of everything in the stage but the forward, at the real sizes, in its parts.

    Runs on the CPU: the parts that run on the device under CUDA (normalisation, selection and NMS) are
    reported separately, since on a GPU their CPU cost is only the kernel launches.
    """
    from concurrent.futures import ThreadPoolExecutor

    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    module = import_stage()
    from grit_pipeline.fixtures.detector import build_tiny_grounding_dino
    from grit_pipeline.stages import box_selection

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        config = module.GroundingConfig(detector=str(build_tiny_grounding_dino(folder)), passes_per_forward=batch_size,
                                        device="cpu", preprocess_threads=1)
        grounder = module.GroundingDinoGrounder(config)
    grounder.image_processor = GroundingDinoImageProcessorPil()  # grounding-dino-tiny's 800/1333 resizing
    grounder.model = _FixedOutputs(batch_size)
    images = web_images(count)
    requests = _requests(images)

    def cpu_ms(run) -> tuple[object, float]:  # best of two: the machine may be busy
        spent = []
        for _ in range(2):
            start = time.process_time()
            value = run()
            spent.append(time.process_time() - start)
        return value, round(1000 * min(spent) / count, 2)

    grounder.ground(requests[:batch_size])  # warm-up
    results, whole = cpu_ms(lambda: grounder.ground(requests))
    plans, plan_ms = cpu_ms(lambda: grounder._plan_all(requests))
    chunks = [[(i, p) for i in range(s, min(s + batch_size, count)) for p in plans[i].passes]
              for s in range(0, count, batch_size)]
    with ThreadPoolExecutor(1) as pool:  # the resize path with a pool, as on a GPU box (one thread here)
        _, resize_ms = cpu_ms(lambda: [grounder._resize_into_buffer([images[i] for i, _ in c], pool) for c in chunks])
    raws, prepare_ms = cpu_ms(lambda: [  # each batch's inputs freed before the next, as in the stage
        grounder._forward_raw(grounder.prepare_inputs([images[i] for i, _ in c], [p.input_ids for _, p in c]))
        for c in chunks
    ])

    def select() -> list:
        out = []
        for chunk, raw in zip(chunks, raws, strict=True):
            probs, corners = module._probabilities_and_corners(raw.logits, raw.pred_boxes)
            columns = box_selection.token_phrase_columns([p for _, p in chunk], probs.shape[-1])
            out.append(box_selection.select_boxes(probs, corners, columns, grounder._box_filter, [True] * len(chunk)))
        return out

    selections, select_ms = cpu_ms(select)

    def build() -> None:
        for chunk, selected in zip(chunks, selections, strict=True):
            for (index, text_pass), selection in zip(chunk, selected, strict=True):
                box_selection.result_from_selected([(selection, text_pass.phrase_ids)], plans[index].phrase_targets,
                                               len(CHUNKS), grounder._box_filter)

    _, build_ms = cpu_ms(build)
    host_ms = round(plan_ms + resize_ms + build_ms, 2)
    return {"mode": "cpu-profile", "batch_size": batch_size, "images": count, "queries": 900, "text_tokens": 256,
            "kept_boxes_per_image": round(sum(len(b) for r in results for b in r.boxes) / count, 1),
            "cpu_ms_per_image": {
                "whole_stage_without_forward_on_cpu": whole,
                "plan_and_tokenise": plan_ms,
                "resize_into_pinned_buffer": resize_ms,
                "prepare_inputs_incl_normalise_on_cpu_and_fixed_forward": prepare_ms,
                "select_assign_threshold_nms_on_cpu_tensors": select_ms,
                "results_from_selected_boxes": build_ms,
                "host_only_on_gpu (plan + resize + results)": host_ms,
            }}


if __name__ == "__main__":
    main()
