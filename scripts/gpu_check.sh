#!/usr/bin/env bash
# What we check on one H100/H200, in one go (~6-6.5 minutes with BUDGET_S=330), results under $OUT:
#   1. scripts/gpu_ab.py: ViT-B/16 bf16 train with timm torch.compile alongside, the implementation
#      switches A/B'd in one process, a kernel profile + the step's optimised HLO (ab.json,
#      profile_summary.json, perfetto_trace.json.gz, hlo_after_optimizations.txt.gz, gpu_ab.log); with
#      budget left, ViT-L/16 and DINOv2 S/14, L/14 next to PyTorch (at 330 s there is none);
#   2. with EXTRA=1: cuDNN vs XLA attention numerics (gpu_attention.json) and a short bf16 `lvm-train`.
# The formal suite (`lvm-bench --suite gpu`, scripts/gpu_suite.sh) stays separately runnable.
# Wheels in .whl/ (packages the machine lacks: grain, ml_collections, open_clip, ...; fetch them here
# with `bash scripts/gpu_wheels.sh`) are installed offline into /tmp/site first.
# The device returns at most 8 files from $OUT: this writes 5 (8 with EXTRA=1); do not tee a log there
# (the call's output tail has it). Keep EXTRA off in a 15-minute session (it adds ~3 minutes).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -3
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
# A jax that does not see the GPU (a CUDA plugin mismatch) would spend the whole budget on the CPU.
if [[ -z "${LVM_AB_SMOKE:-}" ]] && ! "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  echo "gpu_check: jax does not see a GPU here ($("$PY" -c 'import jax; print(jax.devices())' 2>&1 | tail -1)); stopping."
  exit 1
fi

# 1. The switch A/B + profile + the other models' rows (scripts/gpu_ab.py; ~6 min at BUDGET_S=330).
timeout $(( ${BUDGET_S:-330} + 60 )) "$PY" scripts/gpu_ab.py --out "$OUT" --budget-s "${BUDGET_S:-330}" 2>&1 \
  | tee "$OUT/gpu_ab.log"
# 2. Optional (EXTRA=1): cuDNN vs XLA attention numerics and a short GPU training run.
if [[ -n "${EXTRA:-}" ]]; then
  echo "=== attention check"
  timeout 100 "$PY" scripts/gpu_attention_check.py --json "$OUT/gpu_attention.json" 2>&1 | tee "$OUT/gpu_attention.log"
  echo "=== lvm-train on the GPU"
  rm -rf /tmp/gpu_run
  timeout 90 "$PY" -m train --config configs/vit_synthetic.py --workdir /tmp/gpu_run --config.model.dtype=bfloat16 \
    --config.data.worker_count=8 --config.total_steps=600 --config.eval_every=600 --config.ckpt_every=600 \
    2>&1 | tail -40 | tee "$OUT/train.log"
fi
echo "gpu_check done"
