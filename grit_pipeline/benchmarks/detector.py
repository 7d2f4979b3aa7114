"""`grit bench detector`: images/s through the grounding stage against the bare model forward on the very
batches the stage forms (the limit it can reach), plus plain transformers use (processor, then model)."""

from __future__ import annotations

import os
from typing import Any

from grit_pipeline.benchmarks.timing import best_of
from grit_pipeline.work import batched

_BENCH_CAPTIONS = (
    "a dog in a field of flowers",
    "two children and a puppy on a red sofa near the window",
    "a man with a blue hat rides a bike on the street next to a white car",
    "a cat on a table with a plate of food and a cup",
    "a group of people on the beach with a boat in the water under the sky",
)


def bench_requests(n_images: int, seed: int = 0) -> list[Any]:
    """Synthetic noise images of varied sizes with captions whose phrases are found by a word pattern."""
    import re

    import numpy as np
    from PIL import Image

    from grit_pipeline.records import Span
    from grit_pipeline.stages.grounding import GroundingRequest
    from grit_pipeline.stages.text import Phrase

    rng = np.random.default_rng(seed)
    requests = []
    for index in range(n_images):
        caption = _BENCH_CAPTIONS[index % len(_BENCH_CAPTIONS)]
        chunks = [m.span() for m in re.finditer(r"\b(?:an?|the|two) (?:\w+ )?\w+", caption)]
        phrases = [Phrase(Span(a, b), Span(a, b), caption[a:b].split()[-1]) for a, b in chunks]
        size = (int(rng.integers(160, 400)), int(rng.integers(120, 300)))
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        requests.append(GroundingRequest(key=f"{index:06d}", caption=caption, phrases=phrases,
                                         image=Image.fromarray(pixels)))
    return requests


def run_detector_bench(detector: str | None, n_images: int, passes_per_forward: int, device: str, repeats: int,
                       threads: int | None = None) -> dict:
    """Best-of-`repeats` images/s of `GroundingDinoGrounder.ground` and of the bare model forward.

    The baseline runs `model(**inputs)` on the very batches the stage forms (same passes, same padding),
    with inputs prepared outside the timed region: it is the limit the stage can reach. Both run with the
    same torch thread count; by default one core is left for the stage's preprocessing thread.
    """
    import tempfile

    import torch
    from transformers.utils import logging as hf_logging

    from grit_pipeline.fixtures.detector import build_tiny_grounding_dino
    from grit_pipeline.stages.detector_loading import GroundingConfig
    from grit_pipeline.stages.groundingdino import GroundingDinoGrounder

    hf_logging.disable_progress_bar()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads or max(1, cores - 1))
    with tempfile.TemporaryDirectory() as tmp:
        path = detector or str(build_tiny_grounding_dino(tmp))
        grounder = GroundingDinoGrounder(GroundingConfig(detector=path, passes_per_forward=passes_per_forward, device=device))
    requests = bench_requests(n_images)
    items = [(r.image, p.input_ids) for r in requests for p in grounder.plan(r).passes]
    batches = batched(items, passes_per_forward)
    inputs = [grounder.prepare_inputs([im for im, _ in b], [ids for _, ids in b]) for b in batches]

    def stage() -> float:
        grounder.ground(requests)
        return n_images

    def baseline() -> float:
        with torch.inference_mode(), grounder._autocast():
            for batch_inputs in inputs:
                grounder.model(**batch_inputs)
        if grounder.device.startswith("cuda"):
            torch.cuda.synchronize()
        return n_images

    def processor_then_forward() -> float:  # plain transformers use: processor and model in turn
        with torch.inference_mode(), grounder._autocast():
            for batch in batches:
                grounder.model(**grounder.prepare_inputs([im for im, _ in batch], [ids for _, ids in batch]))
        return n_images

    runs = {"stage": stage, "baseline": baseline, "serial": processor_then_forward}
    for run in runs.values():
        run()  # warm-up
    best = best_of(runs, repeats)
    wall = {name: found.wall_s for name, found in best.items()}
    cpu = {name: found.cpu_s for name, found in best.items()}
    return {
        "bench": "detector",
        "detector": detector or "tiny-random (grit_pipeline.fixtures.detector)",
        "device": grounder.device,
        "torch_threads": torch.get_num_threads(),
        "cores": cores,
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "n_images": n_images,
        "text_passes": len(items),
        "passes_per_forward": passes_per_forward,
        "items_per_s": round(n_images / wall["stage"], 2),
        "baseline_items_per_s": round(n_images / wall["baseline"], 2),
        "ratio": round(wall["baseline"] / wall["stage"], 3),
        "target_ratio": 0.9,
        "processor_then_forward_items_per_s": round(n_images / wall["serial"], 2),
        "cpu_ms_per_image": {name: round(1000 * cpu[name] / n_images, 2) for name in runs},
        "cpu_ratio": round(cpu["baseline"] / cpu["stage"], 3),
    }
