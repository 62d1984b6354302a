#!/usr/bin/env bash
# TTT-MAE on one GPU at the paper's shapes: ViT-L/16 encoder + 512-d x 8 decoder + 12-block vit_head,
# 224 px, 20 steps x 128 copies per image, 75 % masks, SGD momentum 0.9, finetune_mode encoder.
# Random weights and images (the speed does not depend on them); no network.
#
#   bash benchmarks/gpu_ttt_mae.sh            # from the repo root; writes $OUT/ttt_mae.md (default /tmp/gpu_out)
#   GPU_DRY_RUN=1 bash benchmarks/gpu_ttt_mae.sh         # CPU check of this script (tiny smoke model)
#   TTT_MAE_COMPILE=1 bash benchmarks/gpu_ttt_mae.sh     # also time torch.compile of the MAE loss
#                                                        # (adds the compile time, ~1 min; gpu_all.sh sets it
#                                                        # and gives this part 150 s)
#   TTT_MAE_COMPILE_MODE=reduce-overhead ...             # the compiled row in that torch.compile mode
#                                                        # (reduce-overhead: CUDA graphs; default: None)
#   TTT_MAE_SKIP_FP32=1 ...                              # only the bf16 rows (no fp32 ours, no reference)
#   TTT_MAE_PROFILE=1 ...                                # + $OUT/ttt_mae_profile.md: torch.profiler of one
#                                                        # eager bf16 image, GPU kernel time by class (~10 s)
#   TTT_MAE_BATCHED=G ...                                # + a row for BatchedTTT: G images at once, each
#                                                        # with its own weights, the whole step (grads + SGD
#                                                        # update) one compiled graph (TTT_MAE_COMPILE_MODE);
#                                                        # timed on G images after G warm-up images, last
#
# Paths timed on the same images and seeds:
#   reference: upstream-style (deep copy of the state dict into a clone per image, plain SGD,
#              explicit softmax attention, fp32 with TF32 off; the 128 copies built on the host and
#              copied to the GPU each step, as upstream's DataLoader delivers them) -- 1 image;
#   ours fp32: snapshot restore, fused SGD, SDPA, fp32, copies expanded on the GPU (no host copy);
#   ours bf16: the same under bf16 autocast (+ torch.compile when TTT_MAE_COMPILE=1).
# Achieved TFLOP/s = FLOP of one image (counted with torch.utils.flop_counter on one step and one
# prediction) / measured seconds per image; the floor is ~3e14 FLOP / 989 TFLOP/s (dense bf16 peak of
# an H100/H200 SXM) ~ 0.3-0.4 s.  Expected run time ~60 s on an H200 (budget 90 s): fp32 steps with TF32
# off are the slow part (~6 s per image for each fp32 path, 2 images of ours incl. warm-up, 1 reference).
# Set-up (carried wheels, PYTHONPATH): benchmarks/gpu_env.sh.  Part of benchmarks/gpu_all.sh.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source benchmarks/gpu_env.sh || exit 1
set -e
if [[ "$GPU_DRY_RUN" == 1 ]]; then export TTT_MAE_DRYRUN=1; fi
timeout -k 5 "${TTT_MAE_S:-100}" "$PY" - "$OUT/ttt_mae.md" <<'PY'
import os
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
from torch.utils.flop_counter import FlopCounterMode

from tttlab.ttt_mae.model import build_model
from tttlab.ttt_mae.reference import ReferenceTTT
from tttlab.ttt_mae.ttt import TTTAdapter, TTTSettings, image_generator
from tttlab.ttt_mae.views import Normalizer

out_path = sys.argv[1]
DRY = os.environ.get("TTT_MAE_DRYRUN") == "1"  # CPU check of this script with a tiny model
assert DRY or torch.cuda.is_available(), "needs a CUDA GPU"
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if dev.type == "cpu":
    torch.set_num_threads(1)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
name = "mae_vit_smoke_patch7" if DRY else "mae_vit_large_patch16"
PEAK_BF16 = 989e12  # dense bf16 tensor-core peak of H100/H200 SXM
STEPS, COPIES = (3, 8) if DRY else (20, 128)
t_start = time.perf_counter()
torch.manual_seed(0)
base = build_model(name).to(dev)
C, S = base.cfg.in_chans, base.cfg.img_size
norm = Normalizer((0.485, 0.456, 0.406)[:C], (0.229, 0.224, 0.225)[:C])
g = torch.Generator().manual_seed(0)
raws = [torch.rand(C, S, S, generator=g) for _ in range(4)]
s = TTTSettings(steps_per_example=STEPS, batch_size=COPIES, lr=1e-2 * COPIES / 256, single_crop=True)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def flops_per_image(adapter, lean=True):
    """FLOP of one step (fwd + bwd) and one prediction, x steps (+ the unadapted prediction).

    ``lean``: the step as our adapter executes it (``mae_loss_lean`` on one image + n masks: the exact
    cuts skip ~2 % of the FLOP at this shape); ``lean=False``: the full ``mae_loss`` on n copies, as the
    reference executes it (the method's nominal FLOP)."""
    views, noise = adapter.draw(raws[0], torch.Generator().manual_seed(1), norm)
    test = norm(raws[0][None]).to(dev)
    with FlopCounterMode(display=False) as fc:
        adapter.model.train()
        if lean:
            loss = adapter.model.mae_loss_lean(views[:1].to(dev), 0.75, noise.to(dev))
        else:
            loss = adapter.model.mae_loss(views.to(dev), 0.75, noise.to(dev))
        loss.backward()
    step = fc.get_total_flops()
    adapter.optimizer.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            adapter.model.eval()
            adapter.model.classify(test)
    pred = fc.get_total_flops()
    return STEPS * step + (STEPS + 1) * pred, step, pred


def time_images(fn, images, warm=1):
    for i in range(warm):
        fn(images[0], image_generator(0, 0, 1000 + i))
    sync()
    t0 = time.perf_counter()
    res = [fn(x, image_generator(0, 0, i)) for i, x in enumerate(images)]
    sync()
    return (time.perf_counter() - t0) / len(images), res


rows = []
tb = None  # BatchedTTT row (TTT_MAE_BATCHED=G)
# ours, fp32 (TF32 off) and bf16
ours = TTTAdapter(base, TTTSettings(**{**s.__dict__, "fused": True}), dev)
total, step_f, pred_f = flops_per_image(ours)  # executed by our paths (TFLOP/s column: conservative)
nominal, _, _ = flops_per_image(ours, lean=False)  # the reference's full loss
ours.reset()
SKIP32 = os.environ.get("TTT_MAE_SKIP_FP32") == "1"
MODE = os.environ.get("TTT_MAE_COMPILE_MODE") or None
t32, r32 = (None, None) if SKIP32 else time_images(lambda x, gen: ours.adapt(x, gen, norm), raws[:1])
ours.s.amp = "bf16"
t16, r16 = time_images(lambda x, gen: ours.adapt(x, gen, norm), raws[:3])
ours.reset()  # base weights back (the adapter works in place on `base`)
tc = None


def kernel_class(name):
    n = name.lower()
    for label, keys in (("matrix products", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_", "wgmma",
                                             "aten::linear", "addmm", "aten::mm", "aten::bmm", "conv")),
                        ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
                        ("optimizer (fused SGD)", ("fused_sgd", "multi_tensor", "foreach")),
                        ("layer norm", ("layer_norm", "layernorm")),
                        ("copies / casts", ("copy", "cast", "memcpy", "memset")),
                        ("indexing (gather, scatter, embedding)", ("index", "gather", "scatter", "embedding",
                                                                   "sort", "radix"))):  # fmt: skip
        if any(k in n for k in keys):
            return label
    return "other elementwise / reductions"


def host_syncs(fn):
    """Host syncs made by ``fn()`` on a GPU (torch.cuda.set_sync_debug_mode("warn") reports each blocking
    call), as ``"N (file:line xK, ...)"``; on the CPU (dry run) ``"n/a on the CPU"``."""
    if dev.type != "cuda":
        fn()
        return "n/a on the CPU"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync()
    where = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            key = f"{os.path.basename(w.filename)}:{w.lineno}"
            where[key] = where.get(key, 0) + 1
    n = sum(where.values())
    top = ", ".join(f"{k} x{v}" for k, v in sorted(where.items(), key=lambda kv: -kv[1])[:6])
    return f"{n}" + (f" ({top})" if top else "")


def profile_eager_bf16(path):
    """One image of the eager bf16 path under torch.profiler: GPU kernel time by class and the top kernels,
    against the wall time (the GPU's busy share; the rest is launch/Python time, inflated a little by the
    profiler itself).  On the CPU (dry run) the same table of top-level CPU operators."""
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ours.s.amp = "bf16"
    ours.reset()
    sync()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        ours.adapt(raws[0], image_generator(0, 0, 0), norm)
        sync()
    wall = time.perf_counter() - t0
    ours.reset()
    # the image's time split without the profiler: its STEPS steps alone, its STEPS + 1 predictions alone
    gen = image_generator(0, 0, 0)
    x = raws[0].to(dev)
    test = norm(x[None])
    draws = [ours.draw(x, gen, norm) for _ in range(STEPS)]
    ours.predict(test)  # warm
    sync()
    t0 = time.perf_counter()
    for v, n in draws:
        ours.step(v, n)
    sync()
    t_steps = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(STEPS + 1):
        int(ours.predict(test).argmax(1))
    sync()
    t_preds = time.perf_counter() - t0
    ours.reset()
    syncs = host_syncs(lambda: ours.adapt(raws[0], image_generator(0, 0, 0), norm))
    ours.reset()
    per = {}
    for e in prof.events():
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not cuda and (e.device_type != torch.autograd.DeviceType.CPU or e.cpu_parent is not None):
            continue  # CPU: top-level operators only (their time includes children)
        us = e.time_range.elapsed_us()
        k = per.setdefault(e.name, [0.0, 0])
        k[0] += us
        k[1] += 1
    busy = sum(v[0] for v in per.values()) / 1e6
    classes = {}
    for name, (us, _) in per.items():
        classes[kernel_class(name)] = classes.get(kernel_class(name), 0.0) + us / 1e6
    what = "GPU kernel" if cuda else "CPU top-level operator"
    lines = [f"Profile of one image (eager bf16, {STEPS} steps + {STEPS + 1} predictions): wall {wall:.3f} s, "
             f"{what} time {busy:.3f} s ({100 * busy / wall:.0f} % of the wall time; FLOP at the dense bf16 "
             f"peak would take {total / PEAK_BF16:.3f} s).",
             f"Without the profiler: the {STEPS} steps alone {t_steps:.3f} s ({1e3 * t_steps / max(STEPS, 1):.1f} ms "
             f"per step, {step_f / PEAK_BF16 * 1e3:.1f} ms at the peak), the {STEPS + 1} predictions alone "
             f"{t_preds:.3f} s.",
             f"Host syncs in one image (eager bf16, {STEPS} steps; torch.cuda.set_sync_debug_mode; 1 expected, the read of the image's results): {syncs}.", "",
             f"| {what} class | s | share of {what} time |", "| --- | ---: | ---: |"]  # fmt: skip
    for c, t in sorted(classes.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {c} | {t:.3f} | {100 * t / busy:.0f} % |")
    lines += ["", f"| top {what}s | calls | s | share |", "| --- | ---: | ---: | ---: |"]
    for name, (us, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:25]:
        short = name if len(name) <= 110 else name[:107] + "..."
        short = short.replace("|", "/")
        lines.append(f"| `{short}` | {n} | {us / 1e6:.3f} | {100 * us / 1e6 / busy:.1f} % |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def row(label, sec, tref, note=""):
    tf = total / sec / 1e12
    vs = f"{tref / sec:.1f}x" if tref else "-"
    return (f"| {label} | {sec:.2f} | {1 / sec:.2f} | {vs} | {tf:.0f} | "
            f"{100 * total / sec / PEAK_BF16:.0f} % | {note} |")


def write(tref=None, rref=None):
    """The table so far (written after our paths and again after the reference: a run stopped by its
    time limit while the slow fp32 reference runs still leaves our rows)."""
    if rref is not None:
        same = rref[0].predictions == r32[0].predictions
        loss_diff = max(abs(a - b) for a, b in zip(rref[0].losses, r32[0].losses))
        loss_diff16 = max(abs(a - b) for a, b in zip(rref[0].losses, r16[0].losses))
        note32 = f"per-step predictions = reference: {'yes' if same else 'NO'}; max loss diff {loss_diff:.1e}"
        note16 = f"max loss diff to fp32 reference {loss_diff16:.1e}"
    else:
        note32 = note16 = "reference not run (" + ("TTT_MAE_SKIP_FP32=1" if SKIP32 else "time limit") + ")"
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (dry run)"
    lines = [
        f"TTT-MAE per image on {dev_name}: {name} + decoder 512x8 + vit_head 12, {S} px, "
        f"{STEPS} steps x {COPIES} copies, mask 0.75, torch {torch.__version__}.",
        f"FLOP per image (counted, as our paths execute it: exact cuts on): {total:.3e} (one step fwd+bwd "
        f"{step_f:.3e}, one prediction {pred_f:.3e}); the reference's full loss: {nominal:.3e} "
        f"({nominal / total:.3f}x). TFLOP/s below = executed FLOP / time (for the reference row too, so its "
        f"figure is {100 * (nominal / total - 1):.1f} % low). "
        f"Floor at the dense bf16 peak ({PEAK_BF16 / 1e12:.0f} TFLOP/s): {total / PEAK_BF16:.2f} s.",
        "",
        "| path | s/image | images/s | vs reference | TFLOP/s | of bf16 peak | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    if tref is not None:
        lines.append(row("reference (deepcopy, plain SGD, explicit attention, fp32)", tref, tref, "1 image"))
    if t32 is not None:
        lines.append(row("ours fp32 (snapshot, fused SGD, SDPA)", t32, tref, note32))
    lines.append(row("ours bf16 autocast", t16, tref, note16))
    if tc is not None:
        lines.append(row(f"ours bf16 + torch.compile (mode {MODE or 'default'})", tc, tref,
                         note_c))
    if tb is not None:
        lines.append(row(f"ours bf16, {GB} images at once (BatchedTTT), whole step compiled (mode "
                         f"{MODE or 'default'})", tb, tref, note_b))
    lines.append("")
    lines.append(f"Total script time {time.perf_counter() - t_start:.0f} s.")
    text = "\n".join(lines) + "\n"
    with open(out_path, "w") as f:
        f.write(text)
    return text


write()
if os.environ.get("TTT_MAE_PROFILE") == "1":  # issue 5: where the eager bf16 step's time goes
    profile_eager_bf16(os.path.join(os.path.dirname(out_path), "ttt_mae_profile.md"))
if os.environ.get("TTT_MAE_COMPILE") == "1":  # after the first table: a compile that overruns the limit
    comp = TTTAdapter(base, TTTSettings(**{**s.__dict__, "fused": True, "amp": "bf16", "compile": True,
                                           "compile_mode": MODE}), dev)
    tc, rc = time_images(lambda x, gen: comp.adapt(x, gen, norm), raws[:3], warm=2)
    same_c = all(a.predictions == b.predictions for a, b in zip(rc, r16))
    diff_c = max(abs(x - y) for a, b in zip(rc, r16) for x, y in zip(a.losses, b.losses))
    syncs_c = host_syncs(lambda: comp.adapt(raws[0], image_generator(0, 0, 0), norm))
    note_c = (f"compile time excluded (2 warm-up images); per-step predictions = eager bf16: "
              f"{'yes' if same_c else 'NO'}, max loss diff {diff_c:.1e}; host syncs per image: {syncs_c}")
    comp.reset()
    write()
GB = int(os.environ.get("TTT_MAE_BATCHED") or 0)


def run_batched():
    """BatchedTTT on GB images at once (vmap over per-image weights; the whole step, per-image grads and SGD
    updates, one compiled graph; the per-step predictions compiled too): compiled and warmed on GB other
    images, then timed on GB images; s/image = the group's time / GB.  Checked against eager bf16."""
    global tb, note_b
    if GB < 1:
        return
    from tttlab.ttt_mae.ttt import BatchedTTT

    imgs = (raws * GB)[:GB]
    bt = BatchedTTT(base, TTTSettings(**{**s.__dict__, "amp": "bf16", "compile": True, "compile_mode": MODE}), dev)
    t0 = time.perf_counter()
    bt.adapt(imgs, [image_generator(0, 0, 1000 + i) for i in range(GB)], norm)
    sync()
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    rb = bt.adapt(imgs, [image_generator(0, 0, i) for i in range(GB)], norm)
    sync()
    tb = (time.perf_counter() - t0) / GB
    pairs = list(zip(rb, r16))  # eager bf16 ran raws[:3] with the same generators
    same = all(a.predictions == b.predictions for a, b in pairs)
    diff = max(abs(x - y) for a, b in pairs for x, y in zip(a.losses, b.losses))
    note_b = (f"compile + first group {t_warm:.0f} s excluded; per-step predictions = eager bf16 "
              f"({len(pairs)} images): {'yes' if same else 'NO'}, max loss diff {diff:.1e}")
    write(*((tref, rref) if "tref" in globals() else ()))


if SKIP32:
    run_batched()
    print(write())
    sys.exit(0)
# reference: fp32, explicit attention, deep copy per image, plain SGD -- 1 image
import copy

ref_model = copy.deepcopy(base).set_fused_attn(False)
ref = ReferenceTTT(ref_model, TTTSettings(**{**s.__dict__, "foreach": False}), dev)
tref, rref = time_images(lambda x, gen: ref.adapt(x, gen, norm), raws[:1], warm=0)
write(tref, rref)
run_batched()  # last: its compile may run past the time limit, the table above is written already
print(write(tref, rref))
PY
