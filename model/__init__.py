"""The bundled Kosmos-2 trainer (transformers' Kosmos2ForConditionalGeneration) for `grit build` shards.

- presets.py: `tiny` (CPU in minutes) and `kosmos-2` (the released 1.6B patch14-224 architecture).
- tokenizer.py: a BPE built from the shards plus exactly the Kosmos-2 tag and patch-index tokens.
- data.py: the webdataset loader (deterministic, resumable, split by rank and worker, bad-sample budget).
- encoding.py: one shard sample to model inputs (text choice, Kosmos2Processor's token layout, collate).
- pixels.py: image bytes to model pixels (scaled JPEG decode, antialiased resize, normalisation).
- config.py: TrainConfig (RUN/config.json) and the checks before a run may start.
- train.py: one TrainState stepped by the loop: AdamW, warm-up + linear decay, accumulation, bf16 on GPU.
- distributed.py: torchrun ranks, DDP; checkpoints.py: atomic checkpoints and the exact resume.
- generate.py: grounded generation parsed by Kosmos2Processor.post_process_generation.
- e2e.py: `make e2e`, the proof that the shards teach grounding; bench.py: `grit bench loader`.

    grit train --shards OUT/shards --preset tiny --steps N --out RUN [--resume]
    grit generate --checkpoint RUN --image IMG [--prompt "<grounding> An image of"] [--png OUT.png]
    torchrun --nproc_per_node G $(which grit) train --shards OUT/shards --preset kosmos-2 --out RUN
"""
