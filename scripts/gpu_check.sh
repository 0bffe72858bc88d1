#!/usr/bin/env bash
# Everything we check on one H100/H200, in one go (~8 minutes), results under $OUT:
#   1. the GPU benchmark suite (scripts/gpu_suite.sh -> gpu_suite.json/.md/.log),
#   2. cuDNN vs XLA attention numerics + speed on ViT-B/16 (gpu_attention.json/.log),
#   3. a short `lvm-train` of the default config in bfloat16 on the GPU (train.log).
# Wheels in .whl/ (packages the machine lacks: grain, ml_collections, open_clip, ...) are installed
# offline into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -3
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1

BUDGET_S="${BUDGET_S:-300}" OUT="$OUT" PYTHON="$PY" NO_WHEELS=1 bash scripts/gpu_suite.sh
echo "=== attention check"
timeout 100 "$PY" scripts/gpu_attention_check.py --json "$OUT/gpu_attention.json" 2>&1 | tee "$OUT/gpu_attention.log"
echo "=== lvm-train on the GPU"
rm -rf /tmp/gpu_run
timeout 90 "$PY" -m train --config configs/vit_synthetic.py --workdir /tmp/gpu_run --config.model.dtype=bfloat16 \
  --config.data.worker_count=8 --config.total_steps=600 --config.eval_every=600 --config.ckpt_every=600 \
  2>&1 | tail -40 | tee "$OUT/train.log"
echo "gpu_check done"
