#!/usr/bin/env bash
# pilimit on one GPU (H200): per-step time / steps per second of an infinite pi-net training step
# (InfMLP 3072 -> 400 -> 400 -> 10, batch 8, the paper's CIFAR-10 optimizer) with every pi-layer at
# M = 100k and 1M rows, bfloat16 A/B storage (Amult float32), reference path vs chunked path.
# Run from the repository root; no network; ~40-60 s (cap 80 s).  Writes $OUT/pilimit.md.
#   bash benchmarks/gpu_pilimit.sh                  # on the GPU (OUT defaults to /tmp/gpu_out)
#   GPU_DRY_RUN=1 bash benchmarks/gpu_pilimit.sh    # CPU check of the same code path, tiny sizes
# Set-up (carried wheels, PYTHONPATH): benchmarks/gpu_env.sh.  Part of benchmarks/gpu_all.sh.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source benchmarks/gpu_env.sh || exit 1
set -e
if [[ "$GPU_DRY_RUN" == 1 ]]; then
  ARGS=(--device cpu --dtype bfloat16 --rows 3000 6000 --r 64 --steps 2 --chunk-size 1024 --paths reference chunked)
  LIMIT=${PILIMIT_S:-120}
  GPU_NAME="CPU (dry run)"
else
  ARGS=(--device cuda --dtype bfloat16 --rows 100000 1000000 --steps 10 --chunk-size 262144 --paths reference chunked)
  LIMIT=${PILIMIT_S:-80}
  GPU_NAME=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1 || true)
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pilimit.XXXXXX")
{
  echo "# pilimit on GPU (${GPU_NAME:-unknown})"
  echo
  echo "Command: \`bash benchmarks/gpu_pilimit.sh\` (= \`python benchmarks/bench_pilimit.py ${ARGS[*]}\`)"
  echo
} > "$WORK/pilimit.md"
timeout -k 5 "$LIMIT" "$PY" benchmarks/bench_pilimit.py "${ARGS[@]}" --out "$WORK/table.md"
cat "$WORK/table.md" >> "$WORK/pilimit.md"
cp "$WORK/pilimit.md" "$OUT/pilimit.md"
cat "$OUT/pilimit.md"
