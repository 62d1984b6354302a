"""The paper's Omniglot finite rows (pilimit_orig README "MAML FinPiNet" 92.21, "MAML MuNet" 91.22):
``--mu-init`` and the per-layer init alphas, pilimit_orig's depth, the README commands translated flag for
flag, and a shrunk MAML run of each experiment on a generated Omniglot layout (no data here)."""

from __future__ import annotations

import math

import pytest
import torch

from tttlab.core.config import config_diff
from tttlab.core.errors import ConfigError, InvalidInputError
from tttlab.core.records import config_hash, load_records
from tttlab.pilimit import train as T
from tttlab.pilimit.cli import translate_upstream_args
from tttlab.pilimit.nets import FinPiMLP, InfMLP

# pilimit_orig README, verbatim (the MAML rows of its Table 1)
MUNET = (
    "dataset --num-epochs 50 --meta-lr  4.0 --step-size 0.594604 --batch-size 8 --grad-clip 0.15 "
    "--meta-momentum 0 --bias-alpha  0.5 --first-layer-alpha  0.594604 --first-layer-lr-mult 0.4 "
    "--first-layer-init-alpha  0.840896 --second-layer-init-alpha 0.594604 --last-layer-lr-mult 0 "
    "--scheduler cosine --readout-zero-init --dataset omniglot --num-ways 5 --num-shots 1 --use-cuda "
    "--num-workers 2 --num-shots-test 1  --normalize None --hidden-size -1 --depth 2 --dtype float16 "
    "--num-batches 1000  --num-test-batches 500 --adapt-readout-only --mu-init  --output-folder  ./output/"
)
FINPINET = (
    "dataset --num-epochs 50 --meta-lr 5.656854 --step-size 0.25 --batch-size 8 --grad-clip 0.282843 "
    "--meta-momentum 0 --bias-alpha  2.828427  --first-layer-alpha 1.0 --first-layer-lr-mult 0.4 "
    "--last-layer-lr-mult 0 --scheduler cosine --readout-zero-init --dataset omniglot --num-ways 5 "
    "--num-shots 1 --use-cuda --num-workers 2 --num-shots-test 1  --normalize None --hidden-size -1 "
    "--depth 2 --dtype float16 --num-batches 1000  --num-test-batches 500 --adapt-readout-only "
    "--Gproj-inner  --Gproj-outer  --infnet_r 400  --output-folder  ./output/"
)
INFPINET = (
    "dataset --num-epochs 50 --meta-lr 32.0 --step-size 0.353553 --batch-size 8 --grad-clip  0.1   "
    "--meta-momentum 0 --bias-alpha 1.414214 --first-layer-alpha 1.0 --first-layer-lr-mult 0.400000 "
    "--last-layer-lr-mult 0 --scheduler cosine --readout-zero-init --dataset omniglot --num-ways 5 "
    "--num-shots 1 --use-cuda --num-workers 2 --num-shots-test 1  --normalize None --hidden-size -1 "
    "--depth 2 --dtype float16 --num-batches 1000  --num-test-batches 500 --adapt-readout-only "
    "--Gproj-inner  --Gproj-outer  --infnet_r 400  --output-folder  ./output/"
)
CIFAR_MUNET = (
    "--lr 1.00 --gclip-per-param --gclip 0.10 --lr-drop-ratio 0.15 --lr-drop-milestones 40 --scheduler "
    "multistep --wd 0.00016 --batch-size 32 --epochs 50 --width 2048 --cuda --seed 0  --depth 2 "
    "--bias-alpha 4.000 --first-layer-lr-mult 0.2 --last-layer-lr-mult 16.0 --first-layer-alpha 2.000 "
    "--last-layer-alpha 0.250 --no-apply-lr-mult-to-wd --save-dir ./output/ --gaussian-init --no-Gproj"
)
CIFAR_FINPINET = ("--lr 0.5 --gclip-per-param --gclip 3.20 --lr-drop-ratio 0.15 --lr-drop-milestones 35 --scheduler "
                  "multistep --wd 0.00016 --r 400 --batch-size 32 --epochs 50 --width 2048 --cuda --seed 0  --depth 2 "
                  "--bias-alpha 4.000 --first-layer-lr-mult 0.20 --last-layer-lr-mult 8.0 --first-layer-alpha 0.125 "
                  "--last-layer-alpha 0.500 --no-apply-lr-mult-to-wd --save-dir ./output/")  # fmt: skip
MAML_CHANGED = {"out_dir": "./output/", "device": "cuda", "maml.root": "dataset"}
CIFAR_CHANGED = {"out_dir": "./output/", "device": "cuda"}


def _roots(experiment: str) -> list[str]:
    return ["maml.root=/d"] if "omniglot" in experiment else ["data.root=/d"]


@pytest.mark.parametrize("experiment, flags, changed", [
    # the two finite rows with the README's --hidden-size -1 slip replaced by the benchmark drivers' width
    ("paper_omniglot_mup", MUNET.replace("--hidden-size -1", "--hidden-size 2048"), MAML_CHANGED),
    ("paper_omniglot_finite", FINPINET.replace("--hidden-size -1", "--hidden-size 2048"), MAML_CHANGED),
    ("paper_omniglot_orig", INFPINET, MAML_CHANGED),
    ("paper_cifar10_mup", CIFAR_MUNET, CIFAR_CHANGED),
    ("paper_cifar10_finite", CIFAR_FINPINET, CIFAR_CHANGED),
], ids=lambda v: v if isinstance(v, str) and v.startswith("paper") else "")  # fmt: skip
def test_pilimit_orig_readme_commands_translate_to_their_experiments(experiment, flags, changed):
    """Flag for flag: pilimit_orig's README command on top of its experiment changes only the output folder,
    the device and the data folder (its --depth 2 becoming model.depth=1, with a note)."""
    out, translated, notes = translate_upstream_args([f"+experiment={experiment}", *flags.split()])
    assert translated and out[0] == f"+experiment={experiment}" and "model.depth=1" in out
    assert any("pilimit_orig's depth" in n for n in notes)
    roots = _roots(experiment)
    diff = config_diff(T.train_config(experiment, roots), T.train_config(experiment, [*roots, *out[1:]]))
    assert {line.split(": ", 1)[0] for line in diff} == set(changed), (diff, out)
    for line in diff:
        key = line.split(": ", 1)[0]
        assert line.endswith(f"-> {changed[key]!r}"), (line, out)


def test_readme_hidden_size_minus_one_is_translated_as_given_with_a_note():
    """The README's finite MAML rows pass --hidden-size -1 (upstream then trains the infinite net and never
    reads --mu-init or the init alphas).  Taken as given: FinPiNet becomes an infinite run, MuNet stays muP
    (--mu-init wins, as --gaussian-init does); both say so."""
    for experiment, flags, kind in (
        ("paper_omniglot_finite", FINPINET, "inf"),
        ("paper_omniglot_mup", MUNET, "mup"),
    ):
        out, _, notes = translate_upstream_args([f"+experiment={experiment}", *flags.split()])
        assert any(
            "--hidden-size -1 selects the infinite pi-net" in n and "--hidden-size 2048" in n for n in notes
        )
        assert T.train_config(experiment, ["maml.root=/d", *out[1:]])["model"]["kind"] == kind
    # a pilimit_lib experiment: --hidden-size -1 is its infinite net, its depth is ours (no notes)
    out, _, notes = translate_upstream_args(
        ["+experiment=paper_omniglot", "--hidden-size", "-1", "--depth", "2"]
    )
    assert out[1:] == ["model.kind=inf", "model.depth=2"] and notes == []


def test_pilimit_orig_depth_two_is_one_hidden_layer():
    """pilimit_orig's InfPiMLP(L=2) has weights 1..L+1 = input, one hidden pi-layer, readout; the experiments
    built from its commands have exactly those three weight matrices (they had four before)."""
    for experiment in ("paper_omniglot_orig", "paper_omniglot_finite", "paper_omniglot_mup", "paper_cifar10_finite",
                       "paper_cifar10_mup"):  # fmt: skip
        c = T.train_config(experiment, _roots(experiment))
        small = {**c, "model": {**c["model"], "r": 8, "width": 16, "dtype": "float32"}}
        net = T.build_model(small, 12, 5, "cpu")
        if isinstance(net, InfMLP):
            assert len(net.hidden) == 1, experiment
        else:
            assert [tuple(w.shape) for w in net.weights] == [(16, 12), (16, 16), (5, 16)], experiment


def test_omniglot_finite_rows_compose_to_the_upstream_runs():
    mup = T.train_config("paper_omniglot_mup", ["maml.root=/d"])
    m, o, t = mup["model"], mup["optim"], mup["maml"]
    assert (m["kind"], m["width"], m["depth"], m["r"]) == ("mup", 2048, 1, 100)
    assert (m["first_layer_init_alpha"], m["second_layer_init_alpha"]) == (0.840896, 0.594604)
    assert (m["bias_alpha"], m["last_bias_alpha"], m["first_layer_alpha"], m["last_layer_alpha"]) == (
        0.5, 0.0, 0.594604, 1.0)  # fmt: skip
    assert (o["lr"], o["gclip"], o["gclip_per_param"], o["first_layer_lr_mult"], o["last_layer_lr_mult"],
            o["bias_lr_mult"], o["scheduler"]) == (4.0, 0.15, False, 0.4, 0.0, 1.0, "cosine")  # fmt: skip
    assert (t["step_size"], t["gproj_inner"], t["gproj_outer"], mup["train"]["epochs"]) == (
        0.594604,
        False,
        False,
        50,
    )
    fin = T.train_config("paper_omniglot_finite", ["maml.root=/d"])
    m, o, t = fin["model"], fin["optim"], fin["maml"]
    assert (m["kind"], m["width"], m["depth"], m["r"], m["bias_alpha"], m["last_bias_alpha"]) == (
        "finite", 2048, 1, 400, 2.828427, 0.0)  # fmt: skip
    assert (m["first_layer_init_alpha"], m["second_layer_init_alpha"]) == (1.0, 1.0)
    assert (o["lr"], o["gclip"], o["gclip_per_param"], o["first_layer_lr_mult"], o["last_layer_lr_mult"]) == (
        5.656854, 0.282843, False, 0.4, 0.0)  # fmt: skip
    assert (t["step_size"], t["gproj_inner"], t["gproj_outer"], fin["train"]["epochs"]) == (
        0.25,
        True,
        True,
        50,
    )


def _inf(depth=1, r=16, d_in=64, bias_alpha=0.5):
    torch.manual_seed(0)
    return InfMLP(d_in, 5, r=r, depth=depth, bias_alpha=bias_alpha, last_bias_alpha=0.0)


@pytest.mark.parametrize("gaussian_init", [False, True])
def test_init_alphas_scale_exactly_the_first_two_weights(gaussian_init):
    """Same seed, alphas (a1, a2) vs (1, 1): weights[0] x a1, weights[1] x a2, everything else (the other
    weights, every bias, Omega) identical, for a sampled pi-net and for the muP draw."""
    inf = _inf(depth=2)
    base = FinPiMLP(inf, 64, seed=3, gaussian_init=gaussian_init)
    scaled = FinPiMLP(inf, 64, seed=3, gaussian_init=gaussian_init, first_layer_init_alpha=0.25,
                      second_layer_init_alpha=3.0)  # fmt: skip
    factors = [0.25, 3.0, 1.0, 1.0]
    assert len(base.weights) == 4
    for w0, w1, f in zip(base.weights, scaled.weights, factors):
        torch.testing.assert_close(w1, f * w0, rtol=0, atol=0)
    for b0, b1 in zip(base.biases, scaled.biases):
        assert torch.equal(b0, b1)
    assert torch.equal(base.omega0, scaled.omega0)
    assert torch.count_nonzero(scaled.weights[1]) > 0  # depth 2: weights[1] is a hidden weight, not zero
    assert scaled.config()["first_layer_init_alpha"] == 0.25


def test_mu_init_statistics_follow_the_formula():
    """--mu-init: every weight N(0, 2 / fan_in), readout included, then the input weight x a1 and the next
    weight x a2: the per-layer std is sqrt(2 / fan_in) x (a1, a2, 1) and the mean 0 (width 1024: each
    estimate from >= 5,120 entries, within 5 %)."""
    a1, a2 = 0.840896, 0.594604
    inf = _inf(depth=1, r=16, d_in=784)
    net = FinPiMLP(
        inf, 1024, seed=0, gaussian_init=True, first_layer_init_alpha=a1, second_layer_init_alpha=a2
    )
    for w, a in zip(net.weights, (a1, a2, 1.0)):
        fan_in = w.shape[1]
        want = a * math.sqrt(2.0 / fan_in)
        assert float(w.detach().std()) == pytest.approx(want, rel=0.05), (tuple(w.shape), a)
        assert abs(float(w.detach().mean())) < 0.05 * want
    # the muP draw replaces the sampled weights: the readout is Gaussian, not the infinite net's zero one
    assert torch.count_nonzero(net.weights[2]) == net.weights[2].numel()
    # biases keep their sampled values (zero at initialisation) and the readout has none (last_bias_alpha 0)
    assert net.has_bias == [True, True, False] and all(
        float(b.detach().abs().max()) == 0 for b in net.biases[:2]
    )


def test_init_alphas_of_a_sampled_pi_net_keep_its_function_scaled():
    """On a sampled pi-net the input init alpha is a change of the first pre-activations' scale: with no biases
    and first_layer_alpha 1, a1 x W0 gives the features of the input x a1 (relu is positively homogeneous)."""
    inf = _inf(depth=1, bias_alpha=0.0)
    x = torch.rand(6, 64)
    base = FinPiMLP(inf, 256, seed=1)
    scaled = FinPiMLP(inf, 256, seed=1, first_layer_init_alpha=2.0)
    torch.testing.assert_close(scaled.features(x), base.features(2.0 * x))


def test_defaults_leave_nets_and_existing_experiments_unchanged():
    """Init alphas at 1.0 (the default): the same weights as before, and every existing experiment keeps
    the hash of its training part (the checkpoint / model-cache identity) it had on main before the option
    (computed there), except the three pilimit_orig experiments whose depth was corrected on purpose, and
    (2026-12-01) maml_mnist (meta-lr / clip rescaled for the outer gradient summed over episodes) and
    paper_cifar10_finite (pilimit_orig's non-zero readout init), changed on purpose too."""
    inf = _inf()
    a, b = FinPiMLP(inf, 32, seed=0, gaussian_init=True), inf.sample(32, seed=0, gaussian_init=True)
    assert all(torch.equal(x, y) for x, y in zip(a.weights, b.weights))
    # maml_mnist: 9b7f363a3d13 before the summed outer gradient (its lr 1.0 / clip 0.5 became 0.125 / 4.0)
    main = {"maml_mnist": "360821ce1f53", "mnist": "e68826d2ecd3", "paper_cifar10": "0fc252a68f60",
            "paper_omniglot": "500caf1d0a6d", "paper_transfer": "34b0a599bb76", "smoke": "242710fc9e24",
            # model.depth 2 -> 1 (pilimit_orig's --depth 2): main had ad69544aa152, 4ca778a6fe52, e883dffd76fa
            # paper_cifar10_finite: 762359aeaa8b before model.readout_zero_init=false
            "paper_cifar10_finite": "0a0f7fba5be9", "paper_cifar10_mup": "ea839602382d",
            "paper_omniglot_orig": "de66f5a2cc4d"}  # fmt: skip
    roots = {"paper_transfer": ["data.root=/d", "transfer.root=/d"]}
    for experiment, want in main.items():
        over = roots.get(experiment, _roots(experiment) if experiment.startswith("paper") else [])
        c = T.train_config(experiment, over)
        # at run semantics 1: the identity also holds train.SEMANTICS since 2026-12-01 (test_run_semantics)
        assert config_hash(T.training_part(c, semantics=1)) == want, experiment
        assert "first_layer_init_alpha" not in T.training_part(c)["model"]
    c = T.train_config("paper_omniglot_mup", ["maml.root=/d"])
    assert T.training_part(c)["model"]["first_layer_init_alpha"] == 0.840896  # not at 1: part of the identity


def test_bad_init_alphas_are_errors():
    with pytest.raises(ConfigError, match=r"model.first_layer_init_alpha=2.0 with model.kind=inf"):
        T.train_config("smoke", ["model.first_layer_init_alpha=2.0"])
    with pytest.raises(ConfigError, match=r"model.second_layer_init_alpha=nan: expected a finite number"):
        T.train_config("smoke", ["model.kind=finite", "model.second_layer_init_alpha=nan"])
    with pytest.raises(InvalidInputError, match=r"first_layer_init_alpha='2': expected a finite number"):
        FinPiMLP(_inf(), 8, first_layer_init_alpha="2")
    T.train_config("smoke", ["model.kind=mup", "model.first_layer_init_alpha=0.5"])  # finite / mup: fine


def test_finite_rows_have_hidden_biases_and_no_readout_bias():
    """bias_alpha > 0, last_bias_alpha 0 (meta/train.py's default): upstream's finite MetaFinPiMLP has a readout
    bias multiplied by 0 (inert), ours none; the hidden biases exist and train with bias_lr_mult 1.  The
    sampled pi-net's readout is zero (readout-zero-init): logits exactly 0 before adaptation; muP's is
    Gaussian."""
    for experiment, zero_logits in (("paper_omniglot_finite", True), ("paper_omniglot_mup", False)):
        c = T.train_config(experiment, ["maml.root=/d"])
        small = {**c, "model": {**c["model"], "r": 8, "width": 32, "dtype": "float32"}}
        net = T.build_model(small, 28 * 28, 5, "cpu")
        assert net.has_bias == [True, True, False], experiment
        out = net(torch.rand(3, 28 * 28))
        assert bool(torch.count_nonzero(out) == 0) is zero_logits, experiment
        opt, _ = T.build_optimizer(small, net, 10, 20)
        groups = {g["name"]: g["lr"] for g in opt.param_groups}
        assert groups["bias"] == pytest.approx(c["optim"]["lr"]) and groups["last"] == 0.0
        assert opt.gproj is (experiment == "paper_omniglot_finite")


@pytest.mark.parametrize("experiment", ["paper_omniglot_finite", "paper_omniglot_mup"])
def test_shrunk_omniglot_finite_rows_run(tmp_path, experiment, omniglot_root):
    """Each new experiment as it ships (init alphas, muP draw, Gproj, global clip) with the sizes shrunk, on
    a generated Omniglot layout: it trains, records a few-shot accuracy, and the init alphas reach the net."""
    root = omniglot_root
    over = ["logging.progress=false", "threads=1", f"maml.root={root}", "model.r=8", "model.width=32",
            "model.dtype=float32", "maml.num_batches=3", "maml.num_test_batches=4", "maml.meta_batch_size=2",
            "maml.num_ways=3", "train.epochs=1", f"out_dir={tmp_path / 'run'}"]  # fmt: skip
    c = T.train_config(experiment, over)
    out = T.run(c)
    recs = load_records(out, metric="fewshot_accuracy")
    assert len(recs) == 1 and 0.0 <= float(recs.value.iloc[0]) <= 1.0
    net, cfg, _ = T.load_trained(out)
    assert isinstance(net, FinPiMLP) and net.gaussian_init is (experiment == "paper_omniglot_mup")
    assert net.first_layer_init_alpha == cfg["model"]["first_layer_init_alpha"]
