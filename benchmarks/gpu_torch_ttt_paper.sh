#!/usr/bin/env bash
# torch_ttt's CIFAR-10-C paper profile (+experiment=paper_tent_cifar10c) on one GPU: how long the real run
# takes.  No CIFAR-10-C and no RobustBench checkpoint on the device machine, so this times the exact code
# path on stand-ins of the same shapes: random uint8 CIFAR-10-C files in the release's layout (15
# corruptions, N_PER_SEV images per severity), a random WideResNet-28-10 saved in RobustBench's checkpoint
# layout, CIFAR-10 train batches for EATA's Fisher pass.  Accuracies are meaningless here; the time per
# image is what the full run (150,000 images per engine) will take.  Engines source, bn, tent, eata at
# batch 200 (the paper's), one evaluate process each (start-up not in the per-image time), plus TENT's
# peak GPU memory at batch 200.  ~60 s (cap 85 s).  Writes $OUT/torch_ttt_paper.md.
#   bash benchmarks/gpu_torch_ttt_paper.sh                  # on the GPU (carry .whl: hydra/omegaconf)
#   GPU_DRY_RUN=1 bash benchmarks/gpu_torch_ttt_paper.sh    # CPU check of the same code path, tiny sizes
# Set-up (carried wheels, PYTHONPATH): benchmarks/gpu_env.sh.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source benchmarks/gpu_env.sh || exit 1
set -e
if [[ "$GPU_DRY_RUN" == 1 ]]; then
  N_PER_SEV=8; BATCH=4; CORR="[gaussian_noise,fog]"; KW="+model_checkpoint.kwargs.depth=10 +model_checkpoint.kwargs.widen_factor=1"
  DEPTH=10; WIDEN=1; CAL=8; LIMIT=${TORCH_TTT_PAPER_S:-240}
else
  N_PER_SEV=${N_PER_SEV:-1000}; BATCH=200; CORR=common; KW=""; DEPTH=28; WIDEN=10; CAL=2000
  LIMIT=${TORCH_TTT_PAPER_S:-85}
fi
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/torch_ttt_paper.XXXXXX")
"$PY" - "$WORK" "$N_PER_SEV" "$DEPTH" "$WIDEN" "$CAL" <<'EOF'
import sys, torch
from tttlab.core import testing
from tttlab.core.corruptions import COMMON
from tttlab.torch_ttt.wide_resnet import WideResNet
work, n, depth, widen, cal = sys.argv[1], *map(int, sys.argv[2:])
testing.make_cifar10_c(work, corruptions=COMMON, n_per_severity=n)
testing.make_cifar10(work, n_train=max(cal, 10), n_test=10)
torch.manual_seed(0)
sd = WideResNet(depth, widen).state_dict()
torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, f"{work}/Standard.pt")
EOF
echo "data and checkpoint: $(( $(date +%s) - START )) s"
for ENGINE in source bn tent eata; do
  LEFT=$(( LIMIT - ($(date +%s) - START) ))
  if (( LEFT < 10 )); then echo "skipping $ENGINE: time cap" >&2; continue; fi
  SETTING=reset_each_shift; [[ $ENGINE == eata ]] && SETTING=continual
  # shellcheck disable=SC2086
  timeout -k 5 "$LEFT" "$PY" -m tttlab.torch_ttt.evaluate +experiment=paper_tent_cifar10c engine=$ENGINE \
    device="$DEVICE" benchmark.root="$WORK" model_checkpoint.path="$WORK/Standard.pt" $KW \
    "benchmark.corruptions=$CORR" benchmark.batch_size=$BATCH benchmark.setting=$SETTING \
    calibration.num_examples=$CAL logging.progress=false out_dir="$WORK/runs/$ENGINE" \
    > "$WORK/$ENGINE.log" 2>&1 || { echo "$ENGINE failed:" >&2; tail -20 "$WORK/$ENGINE.log" >&2; }
done
"$PY" - "$WORK" "$DEVICE" "$DEPTH" "$WIDEN" "$BATCH" "$N_PER_SEV" > "$WORK/torch_ttt_paper.md" <<'EOF'
import sys, time
from pathlib import Path
import torch
from tttlab.core.records import load_records
work, device, depth, widen, batch, n = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
print(f"# torch_ttt CIFAR-10-C paper profile on {name}: time per image\n")
print(f"WRN-{depth}-{widen}, random weights in RobustBench's layout; random CIFAR-10-C stand-in files, "
      f"{n} images per corruption at severity 5; batch {batch}; `tttlab-torch-ttt-evaluate "
      "+experiment=paper_tent_cifar10c` (TENT/EATA: 1 Adam step, lr 1e-3, predict_before_update).  "
      "Accuracies on random data are meaningless; the full run has 150,000 images per engine.\n")
print("| engine | setting | images | s, adaptation + prediction | ms/image (all) | ms/image (corruptions 2-15) "
      "| full run, min (150,000 images) |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |")
for engine in ("source", "bn", "tent", "eata"):
    path = Path(work, "runs", engine, "records.jsonl")
    if not path.exists():
        print(f"| {engine} | | | failed or skipped | | | |")
        continue
    df = load_records(path, metric="s_per_image")
    df = df[df["corruption"] != "mean"]
    images, secs = int(df["n"].sum()), float(df["wall_time_s"].sum())
    later = df.iloc[1:] if len(df) > 1 else df
    ms_later = 1000 * float(later["wall_time_s"].sum()) / int(later["n"].sum())
    print(f"| {engine} | {df['setting'].iloc[0]} | {images} | {secs:.2f} | {1000 * secs / images:.3f} | "
          f"{ms_later:.3f} | {150_000 * ms_later / 1000 / 60:.1f} |")
if device == "cuda":
    from tttlab.torch_ttt import get_engine
    from tttlab.torch_ttt.wide_resnet import WideResNet
    model = WideResNet(depth, widen).to(device).eval()
    engine = get_engine("tent")(model, {"reset": "never"}, predict_before_update=True).to(device).eval()
    x = torch.rand(batch, 3, 32, 32, device=device)
    engine(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(10):
        engine(x)
    torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - t0) / 10
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"\nTENT alone (no data loading), batch {batch}: {ms:.1f} ms/batch = {ms / batch:.3f} ms/image; "
          f"peak GPU memory {peak:.2f} GiB (torch.cuda.max_memory_allocated).")
print("\nEATA on random weights and data: its entropy filter (E0 = 0.4 ln 10) keeps few or no samples, so its "
      "backward step mostly does not run; its row is a lower bound (with the real model it costs about TENT's).")
print(f"\nTF32 for convolutions (torch.backends.cudnn.allow_tf32): {torch.backends.cudnn.allow_tf32}.")
EOF
cp "$WORK/torch_ttt_paper.md" "$OUT/torch_ttt_paper.md"
cat "$OUT/torch_ttt_paper.md"
echo "total $(( $(date +%s) - START )) s"
rm -rf "$WORK"
