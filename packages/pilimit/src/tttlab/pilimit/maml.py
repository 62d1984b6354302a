"""MAML few-shot classification with inner-loop adaptation of the readout (the paper's test-time adaptation).

Paper: Yang, Santacroce, Hu, ICLR 2022 (``yang2022pinets``), Omniglot MAML experiment; upstream
``experiments/meta`` of github.com/santacml/pilim (facts: the command's hyperparameters).

An episode: N classes (``num_ways``), K support images per class (``num_shots``), ``num_shots_test``
query images per class, labels permuted per episode.  The inner loop takes ``num_inner_steps`` full-batch
SGD steps (lr ``step_size``) of the support cross-entropy on the readout only (weights and bias,
``adapt_readout_only``).  For a readout ``out(f) = a (W f + a_b b)`` (``a`` = last_layer_alpha, ``a_b`` =
last_bias_alpha) one step adds ``-step a (K(f, f_s) G + a_b^2 sum_j G_j)`` with ``G = a dL/dout_s`` and

* infinite pi-net: ``K(f, f') = |g| |g'| V(gbar . gbar')`` (the appended pi rows, exactly),
* finite net: ``K(f, f') = f . f'`` (the relu features),

so the adapted query logits are differentiable in closed form and the outer loss back-propagates through
the inner step (second-order MAML, no ``create_graph`` needed).  The outer step is :class:`PiSGD` on the
*sum* over the ``meta_batch_size`` episodes of each episode's mean query loss, as both upstreams
(``pilimit_orig``'s and ``pilimit_lib``'s ``InfMAML`` and the finite ``ModelAgnosticMetaLearning`` run one
backward per task into the same gradient buffer and never divide it by the number of tasks; their
``mean_outer_loss`` is only logged); ``gproj_outer`` projects the finite net's outer
gradients (Gproj).  ``gproj_inner`` would project inner gradients of non-readout layers; with
``adapt_readout_only`` (the paper's setting and the only one implemented) there are none, so it changes
nothing (the output layer is never projected).

Deviations: Omniglot classes are not augmented with rotations; meta-train = ``images_background``,
meta-test = ``images_evaluation``; the proxy uses MNIST digits 0-4 (train split) for meta-training and
5-9 (test split) for meta-testing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tttlab.core.errors import ConfigError, InvalidInputError

from .functional import v_transform
from .nets import FinPiMLP, InfMLP


@dataclass
class Episode:
    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor


def sample_episode(
    classes, num_ways: int, num_shots: int, num_query: int, rng: np.random.Generator
) -> Episode:
    """One N-way K-shot episode from a list of per-class uint8 image arrays (n, H, W)."""
    if num_ways > len(classes):
        raise InvalidInputError(f"num_ways={num_ways} but only {len(classes)} classes are available")
    picks = rng.choice(len(classes), num_ways, replace=False)
    xs, ys, xq, yq = [], [], [], []
    for label, c in enumerate(picks):
        imgs = classes[c]
        if len(imgs) < num_shots + num_query:
            raise InvalidInputError(
                f"class {c} has {len(imgs)} images; an episode needs {num_shots + num_query}"
            )
        idx = rng.choice(len(imgs), num_shots + num_query, replace=False)
        xs.append(imgs[idx[:num_shots]])
        xq.append(imgs[idx[num_shots:]])
        ys += [label] * num_shots
        yq += [label] * num_query

    def flat(parts):
        return torch.from_numpy(
            np.concatenate(parts).reshape(-1, parts[0][0].size).astype(np.float32) / 255.0
        )

    return Episode(flat(xs), torch.tensor(ys), flat(xq), torch.tensor(yq))


def _kernel(net, f: torch.Tensor, fs: torch.Tensor) -> torch.Tensor:
    if isinstance(net, InfMLP):
        s = f.norm(dim=1, keepdim=True).clamp_min(1e-30)
        ss = fs.norm(dim=1, keepdim=True).clamp_min(1e-30)
        return v_transform((f / s) @ (fs / ss).T) * s * ss.T
    return f @ fs.T


def adapted_logits(
    net, ep: Episode, step_size: float, num_inner_steps: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(query logits after the inner loop, support logits before it)`` for an InfMLP or FinPiMLP."""
    if not isinstance(net, (InfMLP, FinPiMLP)):
        raise InvalidInputError(f"MAML needs an InfMLP or FinPiMLP, got {type(net).__name__}")
    ns = ep.xs.shape[0]
    f = net.features(torch.cat([ep.xs, ep.xq]))
    out = net.readout(f)
    k = _kernel(net, f, f[:ns])
    a, ab = net.last_layer_alpha, net.last_bias_alpha if _has_readout_bias(net) else 0.0
    num_classes = out.shape[1]
    onehot = F.one_hot(ep.ys, num_classes).to(out.dtype)
    base_support = out[:ns]
    for _ in range(int(num_inner_steps)):
        G = a * (torch.softmax(out[:ns], dim=1) - onehot) / ns
        out = out - step_size * a * (k @ G + ab * ab * G.sum(0, keepdim=True))
    return out[ns:], base_support


def _has_readout_bias(net) -> bool:
    if isinstance(net, InfMLP):
        return net.output_layer.bias is not None
    return net.has_bias[-1]


def check_maml_config(m: dict) -> None:
    if not m.get("adapt_readout_only", True):
        raise ConfigError(
            "maml.adapt_readout_only=false is not implemented; expected true (the paper's setting)"
        )
    for key in ("num_ways", "num_shots", "num_shots_test", "meta_batch_size", "num_inner_steps", "num_batches",
                "num_test_batches", "image_size"):  # fmt: skip
        if key in m and int(m[key]) < 1:
            raise ConfigError(f"maml.{key}={m[key]!r}: expected an integer >= 1")
    if "step_size" in m and not 0 <= float(m["step_size"]) < math.inf:  # NaN fails too
        raise ConfigError(f"maml.step_size={m['step_size']!r}: expected a finite number >= 0")


def meta_loss(net, episodes, step_size: float, num_inner_steps: int) -> tuple[torch.Tensor, float]:
    """The outer loss to differentiate, the *sum* over episodes of each episode's mean query cross-entropy
    (upstream's meta-gradient: one backward per task, accumulated, not divided by the number of tasks;
    divide by ``len(episodes)`` for the mean loss to report), and the query accuracy."""
    losses, correct, n = [], 0, 0
    for ep in episodes:
        logits, _ = adapted_logits(net, ep, step_size, num_inner_steps)
        losses.append(F.cross_entropy(logits, ep.yq))
        correct += int((logits.argmax(1) == ep.yq).sum())
        n += len(ep.yq)
    return torch.stack(losses).sum(), correct / max(n, 1)


def evaluate_fewshot(net, classes, m: dict, num_episodes: int, seed: int, device=None) -> dict:
    """Query accuracy (mean and 95% interval half-width over episodes) on ``classes``."""
    rng = np.random.default_rng(seed)
    accs = []
    with torch.no_grad():
        for _ in range(int(num_episodes)):
            ep = sample_episode(
                classes, int(m["num_ways"]), int(m["num_shots"]), int(m["num_shots_test"]), rng
            )
            if device is not None:
                ep = Episode(*(t.to(device) for t in (ep.xs, ep.ys, ep.xq, ep.yq)))
            logits, _ = adapted_logits(net, ep, float(m["step_size"]), int(m["num_inner_steps"]))
            accs.append(float((logits.argmax(1) == ep.yq).float().mean()))
    a = np.asarray(accs)
    return {
        "accuracy": float(a.mean()),
        "ci95": float(1.96 * a.std() / max(len(a), 1) ** 0.5),
        "episodes": len(a),
    }
