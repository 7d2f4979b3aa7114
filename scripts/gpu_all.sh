#!/usr/bin/env bash
# One device session for the GPU figures of the closing notes: the grounding stage (grounding-dino-tiny
# architecture, random weights, bf16, batch 1/8/16) and the trainer (tiny preset and the 1.6B kosmos-2 preset).
# Runs from the repository root on a machine with torch + transformers; the package is laid out under
# /tmp/grit-pkg (stages/, model/, manifests/ mapped under grit_pipeline as setuptools does) so nothing
# needs installing; pure-Python wheels carried in .whl/ (webdataset, braceexpand) go to /tmp/grit-site.
set -uo pipefail
OUT=${OUT:-/tmp/grit-gpu-out}
mkdir -p "$OUT" /tmp/grit-pkg
rm -rf /tmp/grit-pkg/grit_pipeline
cp -r grit_pipeline /tmp/grit-pkg/ && for d in stages model manifests; do cp -r "$d" /tmp/grit-pkg/grit_pipeline/; done
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/grit-site .whl/*.whl
fi
export PYTHONPATH=/tmp/grit-pkg:/tmp/grit-site PYTHONUNBUFFERED=1 PYTHON=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
REPO=$(pwd)
echo "== grounding"
[ -n "${SKIP_GROUNDING:-}" ] || timeout "${GROUNDING_TIMEOUT:-110}" python3 scripts/gpu_grounding.py ${GROUNDING_ARGS:-} 2>"$OUT/grounding.err" | tee "$OUT/grounding.json"
[ -n "${SKIP_GROUNDING:-}" ] || tail -5 "$OUT/grounding.err"
[ -n "${SKIP_TRAIN:-}" ] && exit 0
echo "== train"
# From the laid-out package folder: `python -` puts the working directory first on sys.path, and the
# repository root's grit_pipeline/ lacks the mapped stages/model/manifests subpackages.
(cd /tmp/grit-pkg && timeout "${TRAIN_TIMEOUT:-270}" bash "$REPO/scripts/gpu_train.sh") 2>"$OUT/train.err" | tee "$OUT/train.jsonl"
tail -5 "$OUT/train.err"
