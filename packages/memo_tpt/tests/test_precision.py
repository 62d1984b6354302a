"""amp and compile (tttlab.memo_tpt.precision) in TPT, MEMO, the ensemble, the tiny trainers and the
evaluate contract.  Invariants that also hold with amp=bf16 (resets, 0 steps = the plain model) are
parametrized in test_methods.py."""

import os

import numpy as np
import pytest
import torch

from tttlab.core.errors import ConfigError
from tttlab.memo_tpt import tiny_clip as T
from tttlab.memo_tpt.memo import Memo
from tttlab.memo_tpt.precision import resolve_amp
from tttlab.memo_tpt.tpt import TPT, encode_prompts, encode_shared_prefix

NAMES = ["zero", "one", "two", "three", "four"]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")

compile_test = pytest.mark.skipif(
    os.environ.get("TTTLAB_COMPILE_TESTS") != "1",
    reason="torch.compile test (about a minute of inductor compiles); set TTTLAB_COMPILE_TESTS=1",
)


def test_amp_scheme():
    """auto is each method's upstream precision; fp16 (TPT's upstream GradScaler mode) only for TPT on
    CUDA; TPT's earlier booleans keep their meaning; anything else names the key and the values."""
    assert resolve_amp("auto", CUDA, "tpt") == "fp16" and resolve_amp("auto", CPU, "tpt") == "none"
    assert resolve_amp("auto", CUDA, "memo") == "none" == resolve_amp("auto", CUDA, "train")
    assert resolve_amp(True, CUDA, "tpt") == "fp16" and resolve_amp(True, CPU, "tpt") == "none"
    assert resolve_amp(False, CUDA, "tpt") == "none" and resolve_amp("fp16", CUDA, "tpt") == "fp16"
    assert all(resolve_amp("bf16", d, m) == "bf16" for d in (CPU, CUDA) for m in ("tpt", "memo", "train"))
    for amp, device, method, needle in (
        ("fp32", CPU, "tpt", "amp='fp32'; expected one of auto, none, bf16, fp16"),
        (None, CPU, "memo", "amp=None; expected one of"),
        ("fp16", CPU, "tpt", "amp='fp16' on device 'cpu'"),
        ("fp16", CUDA, "memo", "amp='fp16' for memo"),
        ("fp16", CUDA, "train", "amp='fp16' for train"),
    ):
        with pytest.raises(ConfigError, match=needle):
            resolve_amp(amp, device, method)
    with pytest.raises(ConfigError, match="compile='yes'; expected true or false"):
        Memo(torch.nn.Linear(2, 2), compile="yes")


def _dtype_hooks(*modules):
    seen = []
    for m in modules:
        m.register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    return seen


def test_tpt_bf16_autocast_active_state_float32_and_close(tiny_clip, image):
    """amp=bf16: the image encoder and the text path compute in bfloat16 (hooked Linear outputs), no
    GradScaler, the context and AdamW moments stay float32; the tuned logits are within 0.4 of fp32's
    (under 3 % of the logit scale 1/0.07) and the prediction is the same.  The bound is wider than bf16's 8
    bits of a cosine because AdamW's first steps move each context entry by about lr * sign(gradient), and
    bf16 flips the sign of the smallest gradients: over 6 images the tuned bf16 logits were 0.02-0.32 from
    fp32's (0.02-0.26 with the text encoder on all 16 positions, before prompt_lengths)."""
    ref = TPT(tiny_clip, NAMES, n_views=16, selection=0.25, tts=2, seed=3)
    want = ref(image)
    seen = _dtype_hooks(tiny_clip.visual.transformer.resblocks[0].mlp.c_fc,
                        tiny_clip.transformer.resblocks[0].mlp.c_fc)  # fmt: skip
    tpt = TPT(tiny_clip, NAMES, n_views=16, selection=0.25, tts=2, seed=3, amp="bf16")
    got = tpt(image)
    assert seen and set(seen) == {torch.bfloat16} and len(seen) >= 4  # views, 2 steps' text, predict
    assert tpt.scaler is None and tpt.prompts.ctx.dtype == torch.float32
    assert all(
        v.dtype == torch.float32 for st in tpt.optimizer.state.values() for k, v in st.items() if k != "step"
    )
    assert got.dtype == torch.float32 and int(got.argmax()) == int(want.argmax())
    torch.testing.assert_close(got, want, atol=0.4, rtol=0)
    assert not torch.equal(got, want)


def test_memo_bf16_autocast_active_state_float32_and_close(bn_net, image):
    """amp=bf16: the conv computes in bfloat16, BN-prior statistics, parameters and AdamW moments stay
    float32; the adapted logits are within 2e-2 of fp32's."""
    import copy

    ref = Memo(copy.deepcopy(bn_net), n_augmentations=8, size=16, seed=0, optimizer="adamw", lr=1e-3)
    want = ref(image)
    seen = _dtype_hooks(bn_net.conv)
    memo = Memo(bn_net, n_augmentations=8, size=16, seed=0, optimizer="adamw", lr=1e-3, amp="bf16")
    got = memo(image)
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in bn_net.parameters())
    assert all(
        v.dtype == torch.float32 for st in memo.optimizer.state.values() for k, v in st.items() if k != "step"
    )
    assert got.dtype == torch.float32 and int(got.argmax()) == int(want.argmax())
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)


class _Recorder:
    """Stands for torch.compile: what it was given, and the calls of what it returned."""

    def __init__(self):
        self.given, self.calls = [], {}

    def __call__(self, fn, **kw):
        self.given.append(fn)
        self.calls[len(self.given) - 1] = 0
        i = len(self.given) - 1

        def compiled(*a, **k):
            self.calls[i] += 1
            return fn(*a, **k)

        return compiled


def test_compile_plumbing_tpt_and_memo(tiny_clip, bn_net, image, monkeypatch):
    """compile=true: TPT compiles the image encoder (model.visual) and the prompt -> text path it takes (a
    partial of encode_shared_prefix: a shared context; encode_prompts otherwise, in one batch) and uses both;
    MEMO compiles the model and installs the same BN-prior forwards on every call (so a compiled graph's
    guards hold).  The recorder is the identity: results equal eager."""
    rec = _Recorder()
    monkeypatch.setattr(torch, "compile", rec)
    want = TPT(tiny_clip, NAMES, n_views=8, selection=0.5, tts=1, seed=0)(image)
    got = TPT(tiny_clip, NAMES, n_views=8, selection=0.5, tts=1, seed=0, compile=True)(image)
    assert rec.given[0] is tiny_clip.visual and rec.given[1].func is encode_shared_prefix
    assert rec.calls == {0: 2, 1: 2}  # views once + predict; the tuning step + predict
    assert torch.equal(got, want)
    # class-specific contexts with prompts of several lengths: compiled, one batch cut to the longest prompt
    # (one graph shape, not one per length group: dynamo keeps 8 entries per function); the same logits
    names = NAMES + ["a much longer class name"]
    csc = dict(n_views=8, selection=0.5, tts=1, seed=0, class_specific_context=True)
    eager = TPT(tiny_clip, names, **csc)
    compiled = TPT(tiny_clip, names, compile=True, **csc)
    assert eager.prompts.groups is not None and compiled.prompts.groups is None
    assert rec.given[-1].func is encode_prompts
    torch.testing.assert_close(compiled(image), eager(image), atol=1e-5, rtol=1e-5)
    m0 = Memo(bn_net, n_augmentations=8, size=16, seed=0)
    want = m0(image)
    m0.reset()  # the model is left adapted after a call
    k = len(rec.given)
    memo = Memo(bn_net, n_augmentations=8, size=16, seed=0, compile=True)
    got = memo(image)
    assert rec.given[k] is bn_net and rec.calls[k] == 2 and torch.equal(got, want)
    first = dict(memo._bn_forwards)
    memo(image)
    assert memo._bn_forwards == first and len(first) == 1 and "forward" not in vars(bn_net.bn)


@pytest.mark.parametrize("kind", ["clip", "cnn"])
def test_trainers_amp_and_compile(kind, monkeypatch):
    """The tiny trainers: amp=bf16 runs the loss's forward under autocast with float32 weights; compile
    goes through torch.compile once and every step calls it (identity recorder: the same weights as
    eager); a bad amp is a ConfigError before any training."""
    p = {**(T.PROFILES if kind == "clip" else T.CNN_PROFILES)["smoke"], "steps": 3, "num_train": 64}
    train = T.train_clip if kind == "clip" else T.train_cnn
    eager = train(p, seed=0)
    rec = _Recorder()
    monkeypatch.setattr(torch, "compile", rec)
    compiled = train(p, seed=0, compile=True)
    assert len(rec.given) == 1 and rec.calls == {0: 3}
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), compiled.state_dict().values()))
    seen = []
    real = torch.nn.Linear.forward
    monkeypatch.setattr(
        torch.nn.Linear, "forward", lambda self, x: seen.append(real(self, x).dtype) or real(self, x)
    )
    bf = train(p, seed=0, amp="bf16")
    assert torch.bfloat16 in seen and all(v.dtype == torch.float32 for v in bf.state_dict().values()
                                          if v.is_floating_point())  # fmt: skip
    with pytest.raises(ConfigError, match="amp='fp16' for train"):
        train(p, amp="fp16")


def test_trainer_cache_key_has_the_options_only_when_set(tmp_path, monkeypatch):
    """The fp32 eager model keeps the cache file name it always had; bf16 / compiled ones are others."""
    from tttlab.core.records import config_hash

    monkeypatch.setattr(
        T, "train_cnn", lambda p, seed, progress, amp="none", compile=False: T.MnistCNN(p["channels"])
    )
    p = T.CNN_PROFILES["smoke"]
    old = config_hash({"kind": "mnist_cnn", "params": p, "seed": 0, "version": 1})
    names = {a: T.load_or_train_cnn("smoke", tmp_path, amp=a)[1].name for a in ("none", "auto", "bf16")}
    assert names["none"] == names["auto"] == f"mnist_cnn-{old}.pt" != names["bf16"]
    assert T.load_or_train_cnn("smoke", tmp_path, compile=True)[1].name not in names.values()


def test_evaluate_contract_bf16_and_compile(tmp_path, monkeypatch):
    """evaluate.run: amp enters the config (hash); bf16 runs MEMO/TPT under autocast with accuracies within
    10 points of fp32 on 2 x 6 smoke images; compile reaches torch.compile; fp16 on the CPU and a bad
    compile are ConfigErrors before any model is trained."""
    from tttlab.core.records import load_records
    from tttlab.memo_tpt.evaluate import run

    cache = tmp_path / "cache"
    kw = dict(profile="smoke", cache_dir=str(cache), progress=False,
              benchmark={"corruptions": ["gaussian_noise", "fog"], "num_examples": 6})  # fmt: skip
    with pytest.raises(ConfigError, match="amp='fp16' on device 'cpu'"):
        run(method="memo_tpt.tpt", out_dir=str(tmp_path / "x"), amp="fp16", **kw)
    with pytest.raises(ConfigError, match="compile=1; expected true or false"):
        run(method="memo_tpt.memo", out_dir=str(tmp_path / "x"), compile=1, **kw)
    assert not cache.exists()
    for method in ("memo_tpt.memo", "memo_tpt.tpt"):
        # one folder per method and precision (a folder holding another config's records is refused)
        fp = load_records(run(method=method, out_dir=str(tmp_path / f"fp-{method}"), **kw), metric="accuracy")
        bf = load_records(
            run(method=method, out_dir=str(tmp_path / f"bf-{method}"), amp="bf16", **kw), metric="accuracy"
        )
        assert set(fp.config_hash).isdisjoint(bf.config_hash)
        assert np.abs(fp.value.to_numpy() - bf.value.to_numpy()).max() <= 0.1
    rec = _Recorder()
    monkeypatch.setattr(torch, "compile", rec)
    run(method="memo_tpt.clip_zeroshot", out_dir=str(tmp_path / "c"), compile=True, **kw)
    assert len(rec.given) == 2 and rec.calls[0] > 0  # the image encoder (and the text path)


@pytest.mark.slow
@compile_test
def test_compiled_equals_eager(tiny_clip, bn_net, image):
    """Real inductor compiles: TPT (2 tuning steps) and MEMO (1 SGD step) equal eager to float rounding,
    and repeated images reuse the graphs (no recompiles: the BN prior's forwards are installed once)."""
    from torch._dynamo.utils import counters

    counters.clear()
    kw = dict(n_views=8, selection=0.5, tts=2, seed=0)
    eager, comp = TPT(tiny_clip, NAMES, **kw), TPT(tiny_clip, NAMES, compile=True, **kw)
    for _ in range(3):
        torch.testing.assert_close(comp(image), eager(image), atol=1e-4, rtol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    kw = dict(n_augmentations=8, size=16, seed=0, lr=0.1, optimizer="sgd")
    eager, comp = Memo(bn_net, **kw), Memo(bn_net, compile=True, **kw)  # both snapshot the source weights
    for _ in range(3):
        want = eager(image)
        eager.reset()
        torch.testing.assert_close(comp(image), want, atol=1e-4, rtol=1e-4)
        comp.reset()
    assert counters["stats"]["unique_graphs"] - graphs <= 2  # the views' step and the clean view
