#!/usr/bin/env bash
# GPU figures for the grounding stage (grounding-dino-tiny architecture, random weights, bf16, batch 1/8/16).
# Needs python with torch (CUDA), transformers >= 5 and pillow; prints JSON; about a minute on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && PYTHON=.venv/bin/python
exec timeout 170 "$PYTHON" scripts/gpu_grounding.py "$@"
