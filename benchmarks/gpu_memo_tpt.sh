#!/usr/bin/env bash
# TPT images/s at CLIP ViT-B/16 shapes (open_clip ViT-B-16 built without pretrained weights, 1000 ImageNet
# class prompts, 64 views, 1 AdamW step under AMP + GradScaler) and batched vs PIL views/s, on one GPU.
# Then TPT ViT-B/16 with its text encoder on each prompt's used positions (length groups) vs all 77 positions
# (benchmarks/bench_tpt_prompt_length.py, fp16 as upstream; $OUT/tpt_prompt_length.md; cap 45 s).
# Run from the repo root:  bash benchmarks/gpu_memo_tpt.sh     (writes $OUT/memo_tpt.md; ~60 s on an H200)
#   GPU_DRY_RUN=1 bash benchmarks/gpu_memo_tpt.sh    # CPU check of the same code path (ViT-B-16, 4 classes,
#                                                    # 4 views; augment._GENERIC: the kernels CUDA runs)
# open_clip_torch / ftfy / wcwidth come from the carried .whl/ (benchmarks/gpu_env.sh; never the network).
# Part of benchmarks/gpu_all.sh.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source benchmarks/gpu_env.sh || exit 1
set -e
if ! "$PY" -c "import open_clip" >/dev/null 2>&1; then
  echo "open_clip_torch is not importable (carry .whl with open_clip_torch, ftfy, wcwidth): no numbers" | tee "$OUT/memo_tpt.md"
  exit 1
fi
if [[ "$GPU_DRY_RUN" == 1 ]]; then
  ARGS=(--device cpu --threads 1 --tpt-arch ViT-B-16 --classes 4 --views 4 --repeats 1 --e2e-repeats 1)
  LIMIT=${MEMO_TPT_S:-300}
else
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
  ARGS=(--device cuda --threads 8 --tpt-arch ViT-B-16 --classes 1000 --repeats 3 --e2e-repeats 3)
  LIMIT=${MEMO_TPT_S:-85}
fi
if [[ "$GPU_DRY_RUN" == 1 ]]; then
  # the device-agnostic view kernels (what CUDA runs) instead of the CPU-only numba/numpy fast paths
  LAUNCH=(-c 'import runpy, sys; import tttlab.memo_tpt.augment as A; A._GENERIC = True; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")')
else
  LAUNCH=()
fi
timeout -k 5 "$LIMIT" "$PY" "${LAUNCH[@]}" benchmarks/bench_memo_tpt.py "${ARGS[@]}" --out "$OUT/memo_tpt.md"
if [[ "$GPU_DRY_RUN" == 1 ]]; then
  CUT_ARGS=(--device cpu --threads 1 --arch ViT-B-16 --classes 4 --views 4 --images 1)
else
  CUT_ARGS=(--device cuda --threads 8 --arch ViT-B-16 --classes 1000 --images 8 --amp auto)
fi
timeout -k 5 "${TPT_CUT_S:-45}" "$PY" benchmarks/bench_tpt_prompt_length.py "${CUT_ARGS[@]}" --out "$OUT/tpt_prompt_length.md"
