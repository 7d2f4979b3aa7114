"""The ground stage: a detector that fails on one sample drops that sample (STAGE_ERROR) with the detector's own
message in the shard's parquet, through the real GroundingDINO grounder and the real `grit build`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from grit_pipeline.build import run_build
from grit_pipeline.config import BuildConfig
from grit_pipeline.fixtures.detector import build_tiny_grounding_dino
from grit_pipeline.stages.detector_loading import GroundingConfig
from grit_pipeline.stages.groundingdino import GroundingDinoGrounder

CAPTIONS = {"dog": "a dog on a red sofa", "horse": "a horse near a tree", "cat": "a cat with a hat"}


def _captions_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    lines = []
    for seed, (key, caption) in enumerate(CAPTIONS.items()):
        pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{key}.jpg", quality=95)
        lines.append(json.dumps({"key": key, "image": f"{key}.jpg", "caption": caption}))
    (folder / "captions.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return folder


def test_a_detector_error_reaches_the_samples_error_message(tmp_path: Path, monkeypatch) -> None:
    detector = build_tiny_grounding_dino(tmp_path / "detector")
    real_forward = GroundingDinoGrounder._forward_raw

    def forward_raw(self, inputs):
        """The detector fails on every forward that holds the horse caption's prompt, even alone."""
        if (inputs["input_ids"] == self.tokenizer.convert_tokens_to_ids("horse")).any():
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return real_forward(self, inputs)

    monkeypatch.setattr(GroundingDinoGrounder, "_forward_raw", forward_raw)
    config = BuildConfig(inputs=(str(_captions_folder(tmp_path / "in")),), out_dir=str(tmp_path / "out"),
                         grounder="grounding-dino", runner="local", samples_per_shard=8, stage_batch_size=4,
                         grounding=GroundingConfig(detector=str(detector), box_threshold=0.0, device="cpu"))
    result = run_build(config)
    assert result.ok
    rows = {row["source_key"]: row for row in pq.read_table(tmp_path / "out" / "shards" / "00000.parquet").to_pylist()}
    horse = rows["horse"]
    assert (horse["status"], horse["drop_reason"]) == ("dropped", "stage_error")
    assert horse["error_message"] == ("grounding-dino: RuntimeError: CUDA error: an illegal memory access was "
                                      "encountered (simulated)")
    # the batch-mates were retried alone and grounded; they carry no error
    assert [(rows[k]["status"], rows[k]["error_message"]) for k in ("dog", "cat")] == [("kept", None)] * 2
    assert result.manifest["totals"]["drop_reasons"] == {"stage_error": 1}
