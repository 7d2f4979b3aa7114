"""`grit bench clip`: pairs/s through the CLIP stage against plain transformers use on the very batches the
stage forms (processor, then the model forward), plus the forward alone on prepared inputs for reference."""

from __future__ import annotations

import tempfile
from typing import Any

from grit_pipeline.benchmarks.timing import best_of

_CAPTIONS = ("a red circle above a blue square", "a green star next to a yellow diamond",
             "a white hexagon to the left of a black triangle", "an orange square below a purple circle")


def bench_items(n_images: int, seed: int = 0) -> list[Any]:
    """WorkItems with decoded noise images of varied sizes and short captions, as the stage receives them."""
    import numpy as np
    from PIL import Image

    from grit_pipeline.inputs.base import InputSample
    from grit_pipeline.stages.image import DecodedImage
    from grit_pipeline.work import WorkItem

    rng = np.random.default_rng(seed)
    items = []
    for index in range(n_images):
        size = (int(rng.integers(160, 400)), int(rng.integers(120, 300)))
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        sample = InputSample(source_key=f"{index:06d}", caption=_CAPTIONS[index % len(_CAPTIONS)])
        item = WorkItem(0, index, f"{index:06d}", sample, {})
        item.decoded = DecodedImage(image=image, width=size[0], height=size[1], stored_bytes=b"", reencoded=False,
                                    extension="jpg")
        items.append(item)
    return items


def bench_clip_stage(clip_model: str | None, n_images: int, images_per_forward: int, device: str,
                     repeats: int) -> dict[str, Any]:
    """Best-of-`repeats` pairs/s of ClipStage against the processor + forward on the same batches."""
    from types import SimpleNamespace

    from grit_pipeline.fixtures.clip import build_tiny_clip
    from grit_pipeline.stages.clip import ClipConfig, ClipStage

    with tempfile.TemporaryDirectory() as tmp:
        model = clip_model or str(build_tiny_clip(f"{tmp}/tiny-clip"))
        config = ClipConfig(model=model, recompute=True, images_per_forward=images_per_forward, device=device)
        stage = ClipStage(SimpleNamespace(clip=config))  # type: ignore[arg-type]
        scorer = stage.scorer()
        items = bench_items(n_images)
        images = [i.decoded.image for i in items]
        captions = [i.sample.caption for i in items]
        batches = [(images[s : s + images_per_forward], captions[s : s + images_per_forward])
                   for s in range(0, n_images, images_per_forward)]
        prepared = [scorer.inputs(*batch) for batch in batches]

        def run_stage() -> float:
            stage(items)
            return n_images

        def run_bare() -> float:  # plain transformers: processor, then the model, batch by batch
            for batch in batches:
                scorer.forward(scorer.inputs(*batch))
            return n_images

        def run_forward() -> float:
            for inputs in prepared:
                scorer.forward(inputs)
            return n_images

        run_stage(), run_bare()  # warm-up
        best = best_of({"stage": run_stage, "bare": run_bare, "forward_only": run_forward}, repeats)
    ratio = best["stage"].rate / best["bare"].rate
    return {
        "model": clip_model or "tiny random CLIP (grit_pipeline.fixtures.clip)",
        "column": scorer.column,
        "device": scorer.device,
        "n_images": n_images,
        "images_per_forward": images_per_forward,
        "stage_pairs_per_s": round(best["stage"].rate, 1),
        "bare_processor_forward_pairs_per_s": round(best["bare"].rate, 1),
        "forward_only_pairs_per_s": round(best["forward_only"].rate, 1),
        "ratio": round(ratio, 3),
        "target_ratio": 0.9,
        "meets_target": ratio >= 0.9,
    }
