#!/usr/bin/env bash
# pilimit on one GPU (H200): per-step time / steps per second of an infinite pi-net training step
# (InfMLP 3072 -> 400 -> 400 -> 10, batch 8, the paper's CIFAR-10 optimizer) with every pi-layer at
# M = 100k and 1M rows, bfloat16 A/B storage (Amult float32), reference path vs chunked path.
# Run from the repository root; no network; total < 90 s.  Writes $OUT/pilimit.md.
set -euo pipefail
OUT="${OUT:-.}"
mkdir -p "$OUT"
python -m pip install -q --no-deps -e packages/core -e packages/pilimit >/dev/null 2>&1 \
  || python -m pip install -q --no-deps --no-build-isolation -e packages/core -e packages/pilimit >/dev/null 2>&1 || true
# fallback when an editable install is impossible offline: the src folders on the path (PEP 420 namespace)
export PYTHONPATH="$PWD/packages/core/src:$PWD/packages/pilimit/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1 > "$OUT/pilimit_gpu.txt" || true
{
  echo "# pilimit on GPU ($(cat "$OUT/pilimit_gpu.txt" 2>/dev/null || echo unknown))"
  echo
  echo 'Command: `bash benchmarks/gpu_pilimit.sh` (= `python benchmarks/bench_pilimit.py --device cuda --dtype bfloat16 --rows 100000 1000000 --steps 10 --chunk-size 262144 --paths reference chunked`)'
  echo
} > "$OUT/pilimit.md"
timeout 80 python benchmarks/bench_pilimit.py --device cuda --dtype bfloat16 --rows 100000 1000000 \
  --steps 10 --chunk-size 262144 --paths reference chunked --out "$OUT/pilimit_table.md"
cat "$OUT/pilimit_table.md" >> "$OUT/pilimit.md"
cat "$OUT/pilimit.md"
