#!/usr/bin/env bash
# torch_ttt engines vs upstream torch-ttt 0.0.2 on one GPU (issue 3's time ratio): the CPU benchmark of
# BENCHMARKS.md (seed 004's network, 30 noisy MNIST batches of 32, 1 Adam step, reset per batch; ttt, ttt
# with rotation_type="rand", tent, tent predict_before_update, memo), the models trained on the CPU and
# moved, every timed call synchronised.  Needs the torch-ttt 0.0.2 and einops wheels in .whl/
# (`make gpu-wheels`).  ~30-60 s (cap 60 s).  Writes $OUT/torch_ttt_gpu.md.
#   bash benchmarks/gpu_torch_ttt.sh                  # on the GPU (OUT defaults to /tmp/gpu_out)
#   GPU_DRY_RUN=1 bash benchmarks/gpu_torch_ttt.sh    # CPU check of the same code path, tiny sizes
# Set-up (carried wheels, PYTHONPATH): benchmarks/gpu_env.sh.  Part of benchmarks/gpu_all.sh.
# Opt-in, not part of the default run (compilation needs its own time): TORCH_TTT_COMPILE=<torch.compile
# mode> (e.g. reduce-overhead = CUDA graphs) runs the same comparison with our engines compiled
# (engine.compile(mode=...), 3 untimed warm-up batches each), 2 repeats, cap TORCH_TTT_S (give ~150 s):
#   GPU_PARTS=torch_ttt TORCH_TTT_COMPILE=reduce-overhead TORCH_TTT_S=150 GPU_TOTAL_S=200 bash benchmarks/gpu_all.sh
# (gpu_all.sh's part `torch_ttt_compiled` runs exactly that, into TORCH_TTT_TABLE=torch_ttt_gpu_compiled.md.)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source benchmarks/gpu_env.sh || exit 1
set -e
if [[ "$GPU_DRY_RUN" == 1 ]]; then
  ARGS=(--device cpu --batches 3 --repeats 1 --train-steps 30 --threads 1)
  LIMIT=${TORCH_TTT_S:-120}
else
  ARGS=(--device cuda --batches 30 --repeats 3 --threads 8)
  LIMIT=${TORCH_TTT_S:-60}
fi
if [[ -n "${TORCH_TTT_COMPILE:-}" ]]; then  # opt-in: our engines compiled (see the header)
  [[ "$GPU_DRY_RUN" == 1 ]] || ARGS=(--device cuda --batches 30 --repeats 2 --threads 8)
  ARGS+=(--compile "$TORCH_TTT_COMPILE")
fi
"$PY" -c "import torch_ttt, einops" || { echo "torch-ttt 0.0.2 / einops not installed: run make gpu-wheels and carry .whl" >&2; exit 3; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/torch_ttt.XXXXXX")
TABLE=${TORCH_TTT_TABLE:-torch_ttt_gpu.md}
{
  echo "# torch_ttt vs torch-ttt 0.0.2 on $([[ $GPU_DRY_RUN == 1 ]] && echo "CPU (dry run)" || nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  echo
  echo "Command: \`python benchmarks/bench_torch_ttt.py ${ARGS[*]} --tent-before-update --ttt-rand\`"
  echo
} > "$WORK/$TABLE"
timeout -k 5 "$LIMIT" "$PY" benchmarks/bench_torch_ttt.py "${ARGS[@]}" --tent-before-update --ttt-rand \
  --out "$WORK/table.md"
cat "$WORK/table.md" >> "$WORK/$TABLE"
cp "$WORK/$TABLE" "$OUT/$TABLE"
cat "$OUT/$TABLE"
