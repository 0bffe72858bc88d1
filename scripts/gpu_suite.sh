#!/usr/bin/env bash
# The GPU benchmark: ViT-B/16 and ViT-L/16 bf16 training, CLIP B/16, DINOv2 S/14 and L/14, each next to
# timm / open_clip (torch.compile + SDPA) in the same process, on one H100/H200, in <= 6 minutes.
#
#   OUT=/some/dir scripts/gpu_suite.sh        # writes $OUT/gpu_suite.json (+ .md, .log, versions.txt)
#
# Needs jax[cuda], flax, optax, torch, timm on the machine. Not needed (the suite falls back and says
# so): grain (the ViT row then times the bench's copy of the supervised step instead of the task's),
# ml_collections (optax chain instead of lvm_jax.optim), open_clip (the CLIP row times JAX only).
# Pure-python wheels placed in .whl/ are installed first, offline, without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"  # the device's interpreter is python3 (no `python` there)

if [[ -z "${NO_WHEELS:-}" ]] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install --no-index --no-deps --quiet .whl/*.whl 2>&1 | tail -3
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  "$PY" - <<'PY'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "torch", "timm", "open_clip", "ml_collections", "grain"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "MISSING", type(e).__name__)
import jax
print("devices", jax.devices())
PY
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

# 330 s for the rows (each in its own process, with its own timeout); the outer timeout is a backstop.
timeout $(( ${BUDGET_S:-330} + 40 )) "$PY" -m lvm_jax.bench --suite gpu --budget-s "${BUDGET_S:-330}" --json "$OUT/gpu_suite.json" \
  2>&1 | tee "$OUT/gpu_suite.log"
status=${PIPESTATUS[0]}
"$PY" - "$OUT/gpu_suite.json" > "$OUT/gpu_suite.md" <<'PY'
import json, sys
from lvm_jax.bench.measure import markdown_table, ratio_lines
payload = json.load(open(sys.argv[1]))
print(markdown_table(payload["results"]))
print()
for line in ratio_lines(payload["ratios"]):
    print("-", line)
for row in payload["rows"]:
    print("-", row["model"], row["variant"], "b%s:" % row["batch"], row["status"], row.get("note", ""),
          row.get("torch_error", ""))
PY
echo "suite exit status $status; results in $OUT"
exit $status
