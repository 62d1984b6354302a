#!/usr/bin/env bash
# TPT images/s at CLIP ViT-B/16 shapes (open_clip ViT-B-16 built without pretrained weights, 1000 ImageNet
# class prompts, 64 views, 1 AdamW step under AMP + GradScaler) and batched vs PIL views/s, on one GPU.
# Run from the repo root:  bash benchmarks/gpu_memo_tpt.sh     (writes $OUT/memo_tpt.md; ~60 s on an H200)
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
PY=${PYTHON:-python}
$PY -m pip install -q --no-deps -e packages/core -e packages/memo_tpt >/dev/null 2>&1 || true
if ! $PY -c "import open_clip" >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps open_clip_torch==3.3.0 ftfy regex wcwidth >/dev/null 2>&1 || true
fi
if ! $PY -c "import open_clip" >/dev/null 2>&1; then
  echo "open_clip_torch is not installed on this machine (and no network): no GPU numbers" | tee "$OUT/memo_tpt.md"
  exit 0
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
timeout 85 $PY benchmarks/bench_memo_tpt.py --device cuda --threads 8 --tpt-arch ViT-B-16 --classes 1000 \
  --repeats 3 --e2e-repeats 3 --out "$OUT/memo_tpt.md"
