"""Pieces the self-supervised engines share: auxiliary heads built at construction, feature-shape
inference, an early exit at the features layer, and exact running statistics of features.

* :func:`infer_feature_shape` tells the shape of a layer's output without running the model when the
  layer type says it (``nn.Linear`` -> ``(1, out_features)``; ``nn.Conv1d/2d/3d`` -> ``(1, out_channels,
  1, ...)``), else from ``feature_shape=`` or a dry run on ``example_input=``; otherwise it raises an
  :class:`~tttlab.core.errors.InvalidInputError` that tells the user which argument to pass.  Heads built
  from it exist before the first call, so ``optimizer(engine.parameters())`` trains them (upstream
  torch-ttt built them lazily inside the first forward).
* :func:`features_only` runs a model up to a module and stops there (a forward hook raises a private
  exception carrying the output), so layers after it cost nothing.
* :class:`RunningMoments` merges batches of features into mean / variance / covariance in float64 with
  Chan et al.'s pairwise update, so statistics gathered batch by batch equal those of the concatenation
  (up to float64 rounding) without keeping the features in memory (upstream stacked every feature).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tttlab.core.errors import InvalidInputError

from .precision import eager, full_precision, is_compiled, no_autocast

__all__ = [
    "RunningMoments",
    "build_angle_head",
    "build_contrastive_head",
    "compile_features",
    "features_only",
    "has_training_batchnorm",
    "infer_feature_shape",
    "model_device_dtype",
    "place_like_model",
    "run_model",
    "truncated_model",
]


class _StopForward(Exception):
    """Raised by a forward hook to end the model's forward once the wanted outputs exist."""


def run_model(model: nn.Module, inputs: Any):
    """``model(**inputs)`` for a dict of keyword inputs (token models), ``model(inputs)`` otherwise."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def features_only(model: nn.Module, modules: nn.Module | Sequence[nn.Module], inputs: Any, names=None):
    """Outputs of ``modules`` (one module -> its output; a sequence -> a list), computing the model only
    until the last of them has run.

    A module that runs more than once in a forward pass contributes its first output (the forward stops
    once every module has produced one).  After :func:`compile_features` for these modules, a tensor
    input runs the compiled truncated copy of the model instead; otherwise a compiled model
    (``engine.compile()``) runs its eager forward here (a compiled graph would skip the hooks).
    """
    single = isinstance(modules, nn.Module)
    mods = [modules] if single else list(modules)
    compiled = model.__dict__.get("_tttlab_features", {}).get(tuple(id(m) for m in mods))
    if compiled is not None and isinstance(inputs, torch.Tensor) and is_compiled(model):
        outs = list(compiled(inputs))
        return outs[0] if single else outs
    outputs: list[Any] = [None] * len(mods)
    seen = [False] * len(mods)
    handles = []

    def make_hook(i):
        def hook(module, args, output):
            if not seen[i]:
                outputs[i], seen[i] = output, True
            if all(seen):
                raise _StopForward

        return hook

    for i, m in enumerate(mods):
        handles.append(m.register_forward_hook(make_hook(i)))
    try:
        with eager(model):
            run_model(model, inputs)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if not all(seen):
        missing = [names[i] if names else type(mods[i]).__name__ for i in range(len(mods)) if not seen[i]]
        raise InvalidInputError(f"layers {missing} were not called by the model's forward")
    return outputs[0] if single else outputs


def truncated_model(model: nn.Module, modules: Sequence[nn.Module]) -> nn.Module | None:
    """A ``torch.fx`` copy of ``model`` that returns the (first) outputs of ``modules`` as a tuple and
    computes nothing after them, sharing the model's parameters, buffers and submodules (so optimizer
    steps, resets and BatchNorm mode switches apply to it); None when the model cannot be traced
    symbolically (data-dependent control flow, dict inputs, ...) or a module is not called as a layer."""
    import torch.fx

    qualname = {id(m): n for n, m in model.named_modules() if n}
    targets = [qualname.get(id(m)) for m in modules]
    if None in targets:
        return None

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, name):  # the hooked layers stay single nodes
            return name in targets or super().is_leaf_module(m, name)

    try:
        graph = Tracer().trace(model)
    except Exception:  # noqa: BLE001 - fx raises many kinds for untraceable code
        return None
    first: dict[str, torch.fx.Node] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in targets:
            first.setdefault(node.target, node)
    if len(first) != len(set(targets)):
        return None
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        graph.output(tuple(first[t] for t in targets))
    graph.erase_node(output)
    truncated = torch.fx.GraphModule(model, graph)
    truncated.graph.eliminate_dead_code()
    truncated.delete_all_unused_submodules()  # the copy's references only; the model keeps its layers
    truncated.recompile()
    return truncated


def compile_features(model: nn.Module, modules: Sequence[nn.Module], **compile_kwargs) -> bool:
    """Compile :func:`truncated_model` for ``modules`` and register it for :func:`features_only` (kept in
    the model's ``__dict__``, not as a submodule: ``state_dict`` keys stay the same).  False (nothing
    done) when the model cannot be traced."""
    truncated = truncated_model(model, modules)
    if truncated is None:
        return False
    model.__dict__.setdefault("_tttlab_features", {})[tuple(id(m) for m in modules)] = torch.compile(
        truncated, **compile_kwargs
    )
    return True


def has_training_batchnorm(model: nn.Module) -> bool:
    """True when some BatchNorm layer would use batch statistics (concatenating batches would mix them)."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and (m.training or not m.track_running_stats or m.running_mean is None)
        for m in model.modules()
    )


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first floating parameter (or buffer); CPU float32 if none."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def place_like_model(module: nn.Module, model: nn.Module) -> nn.Module:
    device, dtype = model_device_dtype(model)
    return module.to(device=device, dtype=dtype)


_LAYER_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}


def infer_feature_shape(
    model: nn.Module,
    layer: nn.Module,
    name: str,
    feature_shape: Sequence[int] | None = None,
    example_input: Any = None,
    what: str = "the auxiliary head",
) -> tuple[int, ...]:
    """Shape of ``layer``'s output, batch axis first (only its rank and channel size are used when the
    shape comes from the layer type: spatial sizes are reported as 1)."""
    if feature_shape is not None:
        shape = tuple(int(s) for s in feature_shape)
        if len(shape) < 2:
            raise InvalidInputError(f"feature_shape={feature_shape!r}: expected (batch, features, ...)")
        return shape
    if isinstance(layer, nn.Linear):
        return (1, layer.out_features)
    for kind, dims in _LAYER_DIMS.items():
        if isinstance(layer, kind):
            return (1, layer.out_channels) + (1,) * dims
    if example_input is not None:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = features_only(model, layer, example_input, names=[name])
        finally:
            model.train(was)
        if not isinstance(out, torch.Tensor):
            raise InvalidInputError(f"layer {name!r} returns {type(out).__name__}, expected a tensor")
        return tuple(out.shape)
    raise InvalidInputError(
        f"cannot tell the output shape of layer {name!r} ({type(layer).__name__}) without running the model; "
        f"pass feature_shape=(batch, features, ...) or example_input=<a batch> so {what} can be built now"
    )


def build_angle_head(feature_shape: Sequence[int]) -> nn.Module:
    """The 4-way rotation classifier, upstream's shapes: 2-D features -> Linear(d,16)-ReLU-Linear(16,8)-
    ReLU-Linear(8,4); 4-D -> Conv2d(C,16,3)-ReLU-Conv2d(16,4,3)-global average pool-Flatten; 5-D: the
    Conv3d analogue.  (The conv heads need feature maps of at least 5x5.)"""
    rank = len(feature_shape)
    if rank == 2:
        d = int(feature_shape[1])
        return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    if rank in (4, 5):
        c = int(feature_shape[1])
        conv, pool = (nn.Conv2d, nn.AdaptiveAvgPool2d) if rank == 4 else (nn.Conv3d, nn.AdaptiveAvgPool3d)
        return nn.Sequential(conv(c, 16, 3), nn.ReLU(), conv(16, 4, 3), pool(1), nn.Flatten())
    raise InvalidInputError(
        f"features of shape {tuple(feature_shape)}: the default head needs 2-D, 4-D or 5-D features; "
        "pass your own head"
    )


def build_contrastive_head(feature_shape: Sequence[int], dim: int = 16) -> nn.Module:
    """TTT++'s projection head, upstream's shape: Linear(d,16)-ReLU-Linear(16,16)-ReLU-Linear(16,16).
    Feature maps (3-D or more) are global-average-pooled first (upstream accepted only 2-D features)."""
    rank = len(feature_shape)
    if rank < 2:
        raise InvalidInputError(f"features of shape {tuple(feature_shape)}: expected (batch, features, ...)")
    d = int(feature_shape[1])
    mlp = [nn.Linear(d, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)]
    if rank == 2:
        return nn.Sequential(*mlp)
    return nn.Sequential(GlobalAvgPool(), *mlp)


class GlobalAvgPool(nn.Module):
    """Mean over every axis after the channel axis: (N, C, ...) -> (N, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(dim=2) if x.ndim > 2 else x


class RunningMoments:
    """Mean, unbiased variance and (optionally) covariance of samples given batch by batch.

    ``update(x)`` takes ``x`` of shape ``(N, *shape)``; statistics are element-wise over ``shape``
    (``covariance=True`` needs ``shape == (d,)`` and keeps the d x d covariance).  Accumulation is in float64
    with the pairwise (Chan et al. 1979) merge, so the result does not depend on how the data was batched
    beyond float64 rounding.
    """

    def __init__(self, covariance: bool = False):
        self.covariance = covariance
        self.count = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return
        if self.covariance and x.ndim != 2:
            raise InvalidInputError(f"covariance statistics need (N, d) features, got {tuple(x.shape)}")
        mean_b = x.mean(dim=0)
        centred = x - mean_b
        m2_b = centred.T @ centred if self.covariance else (centred * centred).sum(dim=0)
        if self._mean is None:
            self.count, self._mean, self._m2 = n_b, mean_b, m2_b
            return
        if self._mean.shape != mean_b.shape:
            raise InvalidInputError(
                f"features of shape {tuple(x.shape[1:])} do not match earlier ones {tuple(self._mean.shape)}"
            )
        n_a = self.count
        n = n_a + n_b
        delta = (mean_b - self._mean).to(self._mean.device)
        scale = n_a * n_b / n
        extra = torch.outer(delta, delta) if self.covariance else delta * delta
        self._m2 = self._m2 + m2_b.to(self._m2.device) + extra * scale
        self._mean = self._mean + delta * (n_b / n)
        self.count = n

    def _check(self, need: int = 1) -> None:
        if self._mean is None or self.count < need:
            raise InvalidInputError(f"statistics need at least {need} samples, got {self.count}")

    @property
    def mean(self) -> torch.Tensor:
        self._check()
        return self._mean

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance (element-wise; the covariance diagonal when ``covariance=True``)."""
        self._check(2)
        m2 = self._m2.diagonal() if self.covariance else self._m2
        return m2 / (self.count - 1)

    @property
    def cov(self) -> torch.Tensor:
        self._check(2)
        if not self.covariance:
            raise InvalidInputError("this accumulator was made with covariance=False")
        return self._m2 / (self.count - 1)


def covariance(x: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance of the rows of ``x`` (N, d) -> (d, d), differentiable (float32 under ``amp``)."""
    x = full_precision(x)
    with no_autocast(x):
        centred = x - x.mean(dim=0, keepdim=True)
        return centred.T @ centred / (x.shape[0] - 1)
