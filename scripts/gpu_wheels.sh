#!/usr/bin/env bash
# Fetches into .whl/ the wheels scripts/gpu_check.sh installs on the lent H100/H200, whose image
# (jax 0.11, flax, optax, orbax, torch, timm, fsspec, etils, ...; /work/.library/device/KINDS.md)
# lacks them and cannot reach PyPI. Run it here, where pip works, then carry [".whl"]:
#   bash scripts/gpu_wheels.sh && ls .whl
# The benchmarks themselves need none of them (tests/test_bench.py runs lvm-bench without grain,
# ml_collections and open_clip); open_clip is the CLIP row's PyTorch side, grain + ml_collections
# the EXTRA=1 lvm-train run. Versions are the ones this repo's CI resolves (open_clip: the one the
# H200 ran in session 4). --no-deps: every needed dependency is named here.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.whl/" .gitignore || echo "/.whl/" >> .git/info/exclude
PY="${PYTHON:-python3}"
WHEELS=(grain==0.2.18 array_record==0.8.6 dm-tree==0.1.10 ml_collections==1.1.0
        open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 portpicker==1.6.0)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_31_x86_64 any; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${WHEELS[@]}"
ls -la .whl
