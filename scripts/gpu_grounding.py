"""GPU figures for the grounding stage: grounding-dino-tiny's architecture, random weights, bf16.

Builds the IDEA-Research/grounding-dino-tiny architecture by hand (Swin-T backbone, BERT-base text encoder,
6+6 layers, 900 queries; nothing is downloaded), then at batch 1, 8 and 16 reports images/s of the bare
model forward and, when the repository's package imports, of the whole grounding stage on the same batches,
with peak GPU memory. Prints one JSON object. Needs only torch, transformers and pillow (numpy comes with
them); runs in about a minute on an H100.

    python scripts/gpu_grounding.py [--images-per-size 32] [--batch-sizes 1,8,16]
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
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CAPTION = "a man with a red hat rides a bike on the street next to a white car and a dog"
CHUNKS = ["a man", "a red hat", "a bike", "the street", "a white car", "a dog"]


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
    parser.add_argument("--images-per-size", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--allow-cpu", action="store_true", help="Smoke-test the script on CPU (float32, slow).")
    args = parser.parse_args()
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
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        report["runs"].append(run_batch_size(model, tokenizer, image_processor, grounder, batch_size,
                                             args.images_per_size, device))
    report["seconds_total"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))


def run_batch_size(model, tokenizer, image_processor, grounder, batch_size: int, count: int, device: str) -> dict:
    """images/s of the bare bf16 forward and of the stage over the same batches, and peak memory."""
    count = max(count, 2 * batch_size)
    images = web_images(count)
    prompt = " . ".join(CHUNKS) + " ."
    batches = [images[i : i + batch_size] for i in range(0, count, batch_size)]
    inputs = []
    for batch in batches:
        pixels = image_processor(images=batch, return_tensors="pt")
        text = tokenizer([prompt] * len(batch), return_tensors="pt", padding=True)
        inputs.append({k: v.to(device) for k, v in {**pixels, **text}.items()})

    def forward_all() -> None:
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            for batch_inputs in inputs:
                model(**batch_inputs)

    forward_all()  # warm-up (kernel selection)
    reset_peak()
    forward_s = min(timed(forward_all) for _ in range(2))
    result = {"batch_size": batch_size, "images": count,
              "forward_images_per_s": round(count / forward_s, 1),
              "forward_peak_gpu_mem_gib": peak_gib()}
    if grounder is not None:
        from grit_pipeline.records import Span
        from grit_pipeline.stages.grounding import GroundingRequest
        from grit_pipeline.stages.text import Phrase

        starts = [CAPTION.index(c) for c in CHUNKS]
        phrases = [Phrase(Span(s, s + len(c)), Span(s, s + len(c)), c.split()[-1]) for s, c in zip(starts, CHUNKS, strict=True)]
        requests = [GroundingRequest(key=str(i), caption=CAPTION, phrases=phrases, image=im) for i, im in enumerate(images)]
        grounder.config = dataclasses.replace(grounder.config, batch_size=batch_size)  # the same batches
        grounder.ground(requests[:batch_size])
        reset_peak()
        stage_s = min(timed(lambda: grounder.ground(requests)) for _ in range(2))
        result.update({"stage_images_per_s": round(count / stage_s, 1), "ratio": round(forward_s / stage_s, 3),
                       "stage_peak_gpu_mem_gib": peak_gib(),
                       "preprocess_threads": grounder.preprocess_threads})
    return result


if __name__ == "__main__":
    main()
