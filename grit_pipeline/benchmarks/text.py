"""Benchmarks of the text stages and the serialiser: each stage against the limit for that stage."""

from __future__ import annotations

import gc
import random
from typing import Any

from grit_pipeline.benchmarks.timing import best_rates, pin_to_one_core
from grit_pipeline.records import Box, GritRecord, GroundedSpan, Span
from grit_pipeline.samples import cycle_to, load_caption_sample


def bench_text_stage(n: int, pipe_batch_size: int, naive_n: int, repeats: int) -> dict[str, Any]:
    """PhraseExtractor vs raw `nlp.pipe` (same pipeline object, same captions) and the naive loop."""
    from grit_pipeline.stages.text import PhraseExtractor, TextConfig

    core = pin_to_one_core()
    captions = cycle_to(load_caption_sample(), n)
    extractor = PhraseExtractor(TextConfig(pipe_batch_size=pipe_batch_size))
    nlp = extractor.nlp
    extractor(captions[:200])  # warm-up: first batches allocate

    def raw() -> int:
        for _ in nlp.pipe(captions, batch_size=pipe_batch_size):
            pass
        return n

    def stage() -> int:
        # Streamed batch by batch and consumed, as the pipeline runs it (nothing accumulates).
        for _ in extractor.iter_phrases(captions):
            pass
        return n

    rates = best_rates({"raw": raw, "stage": stage}, repeats)
    naive_captions = captions[:naive_n]
    naive = best_rates({"naive": lambda: len([nlp(c) for c in naive_captions])}, 1)["naive"]
    return {
        "bench": "text",
        "n": n,
        "pipe_batch_size": pipe_batch_size,
        "pinned_core": core,
        "spacy_components": list(nlp.pipe_names),
        "items_per_s": round(rates["stage"], 1),
        "baseline_items_per_s": round(rates["raw"], 1),
        "ratio": round(rates["stage"] / rates["raw"], 3),
        "naive_nlp_loop_items_per_s": round(naive, 1),
        "target_ratio": 0.90,
    }


def synthetic_records(n: int, seed: int = 0) -> list[GritRecord]:
    """GRIT-20M-like records over the bundled captions: 1-6 word-aligned chunks with expansions and boxes."""
    rng = random.Random(seed)
    captions = cycle_to(load_caption_sample(), n)
    records = []
    for index, caption in enumerate(captions):
        words = [i for i, ch in enumerate(caption) if ch != " " and (i == 0 or caption[i - 1] == " ")]
        chunks, exps = [], []
        for start in sorted(rng.sample(words, min(len(words), rng.randint(1, 6)))):
            end = caption.find(" ", start)
            end = len(caption) if end < 0 else end
            exp_end = caption.find(" ", min(len(caption), end + rng.randint(0, 20)))
            exp_end = len(caption) if exp_end < 0 else exp_end
            for _ in range(rng.choice((1, 1, 1, 2))):
                x1, y1 = rng.random() * 0.8, rng.random() * 0.8
                box = Box(x1, y1, min(1.0, x1 + rng.random() * 0.5 + 0.01), min(1.0, y1 + rng.random() * 0.5 + 0.01))
                score = 0.65 + rng.random() * 0.35
                chunks.append(GroundedSpan(Span(start, end), box, score))
                exps.append(GroundedSpan(Span(start, exp_end), box, score))
        records.append(GritRecord(key=f"{index:09d}", caption=caption, noun_chunks=chunks, ref_exps=exps))
    return records


def bench_serializer(n: int, token_format: str, mode: str, repeats: int) -> dict[str, Any]:
    """Records per second through `serialize_record` on one core."""
    from grit_pipeline.stages.serialize import SerializeConfig, serialize_record

    core = pin_to_one_core()
    records = synthetic_records(n)
    config = SerializeConfig(format=token_format, mode=mode)
    entries = sum(len(r.noun_chunks) for r in records)
    # The prepared inputs are long-lived: freeze them so the cyclic GC does not re-scan them on every
    # collection (a streaming stage holds one batch, not 50,000 records), and consume outputs as a writer would.
    gc.collect()
    gc.freeze()

    def run() -> int:
        for record in records:
            serialize_record(record, config)
        return n

    try:
        rate = best_rates({"serialize": run}, repeats)["serialize"]
    finally:
        gc.unfreeze()
    return {
        "bench": "serialize",
        "n": n,
        "entries_per_record": round(entries / n, 2),
        "format": token_format,
        "mode": mode,
        "pinned_core": core,
        "records_per_s": round(rate, 1),
        "inputs_gc_frozen": True,
        "target_records_per_s": 50_000,
    }
