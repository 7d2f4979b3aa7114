#!/usr/bin/env bash
# GPU check of the bundled Kosmos-2 trainer (issue 5). Run from the repository root on a CUDA machine with
# torch + transformers installed (`pip install -e .` or an existing environment). Prints one JSON object per
# check; finishes in about 2-3 minutes on one H100:
#   1. tiny preset, bf16 autocast, 200 steps: loss falls, samples/s;
#   2. kosmos-2 preset (1.6B, from scratch), 12 steps at batch 8: fits, bf16 samples/s and tokens/s;
#   3. when more than one GPU is visible: tiny preset under torchrun DDP (one process per GPU).
set -euo pipefail
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}        # DEVICE=cpu TINY_STEPS=5 SKIP_KOSMOS2=1 for a dry run on a CPU
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
printf 'from grit_pipeline.cli import main\nmain()\n' > "$WORK/grit_main.py"
$PY - "$WORK" <<'PYEOF'
import sys
from grit_pipeline.fixtures.scene_shards import write_scene_shards
from grit_pipeline.fixtures.synthetic import generate_scenes
write_scene_shards(generate_scenes(2000, seed=0, size=(256, 256)), sys.argv[1] + "/build", per_shard=250)
PYEOF
run() {  # run NAME EXTRA_TRAIN_ARGS...
  local name=$1; shift
  local started=$SECONDS
  local summary
  summary=$($PY "$WORK/grit_main.py" train --shards "$WORK/build/shards" --out "$WORK/$name" --device "$DEVICE" \
            --workers 4 --warmup-steps 20 --checkpoint-every 100000 "$@" 2>"$WORK/$name.log" | tail -1)
  local first last
  first=$(head -1 "$WORK/$name/metrics.jsonl")
  last=$(tail -1 "$WORK/$name/metrics.jsonl")
  echo "{\"check\": \"$name\", \"summary\": $summary, \"first_log\": $first, \"last_log\": $last, \"wall_s\": $((SECONDS - started))}"
}
run tiny --preset tiny --steps "${TINY_STEPS:-200}" --batch-size 64 --lr 1e-3
[ -n "${SKIP_KOSMOS2:-}" ] || run kosmos2 --preset kosmos-2 --steps 12 --batch-size 8 --vocab-size 8000 --lr 1e-4
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -gt 1 ]; then
  started=$SECONDS
  $PY -m torch.distributed.run --standalone --nproc_per_node "$GPUS" "$WORK/grit_main.py" train \
      --shards "$WORK/build/shards" --out "$WORK/ddp" --device cuda --workers 2 --preset tiny --steps 100 \
      --batch-size 32 --warmup-steps 10 --checkpoint-every 50 2>"$WORK/ddp.log" | tail -1
  echo "{\"check\": \"ddp\", \"gpus\": $GPUS, \"last_log\": $(tail -1 "$WORK/ddp/metrics.jsonl"), \"wall_s\": $((SECONDS - started))}"
fi
