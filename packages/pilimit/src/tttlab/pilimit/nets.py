"""Pi-net MLPs: the infinite-width :class:`InfMLP`, finite pi-nets sampled from it (:class:`FinPiMLP`)
and the muP baseline (a :class:`FinPiMLP` with ``gaussian_init=True`` trained without Gproj).

Paper: Yang, Santacroce, Hu, ICLR 2022 (``yang2022pinets``); upstream ``experiments/networks/networks.py``
(``InfMLP``, ``FinPiMLPSample``) and ``pilimit_lib/inf/layers.py`` of github.com/santacml/pilim (facts).

InfMLP: input layer -> ``depth`` hidden pi-layers -> output pi-layer; the input layer's output is
multiplied by ``first_layer_alpha``, the output by ``last_layer_alpha``.  The ReLU lives inside the next
layer (outputs are pre-activations).  The readout starts at zero (``pilimit_lib``; the MAML commands'
``--readout-zero-init``) or, with ``readout_zero_init=False``, as ``pilimit_orig``'s ``InfPiMLP`` by
default (its CIFAR-10 and ImageNet scripts): r rows with A ~ N(0, 1/r^2), Amult 1.

Finite sample at width n, with ``Omega_l ~ N(0,1)^{n x r}`` per non-output layer:
input ``W = n^-1/2 Omega_0 A^T``; hidden ``W = n^-1 Omega_l (Amult A)^T relu(Omega_{l-1} B^T)^T``; output
``W = n^-1/2 (Amult A)^T relu(Omega_L B^T)^T``; hidden biases ``n^-1/2 Omega_l b``.  Gproj projects the
gradient of every non-output weight/bias onto the column space of its Omega,
``Omega (Omega^T Omega)^-1 Omega^T grad``.  As n grows the finite net's outputs and training approach the
infinite net's (tested).

Which upstream: the sampling formulas above are ``pilimit_orig``'s (the paper's code), whose finite
activations are O(n^-1/2) so that the output weight's ``n^-1/2`` makes the finite output approach the
infinite one (tested on a trained net).  ``pilimit_lib``'s sampler scales the output weight by
``d_out^-1/2`` and leaves the output bias at zero; neither matters at initialisation (the output layer's A
and bias are zero), both do for a sampled trained net, so we follow ``pilimit_orig``.

muP baseline (``gaussian_init=True``): every weight, the readout included, is re-drawn ``N(0, 2 / fan_in)``
after sampling (biases keep their sampled values), which is ``pilimit_orig``'s ``--gaussian-init``
(``cifar10infmlp.py``) and ``--mu-init`` (``meta/train.py``): the same formula under two names.

Per-layer init multipliers (``pilimit_orig``'s ``meta/train.py``: ``--first-layer-init-alpha``,
``--second-layer-init-alpha``, default 1): after sampling (and the muP re-draw) ``weights[0]`` (the
input layer's weight) is multiplied by ``first_layer_init_alpha`` and ``weights[1]`` (the next weight: the
first hidden layer, or the readout when ``depth == 0``) by ``second_layer_init_alpha``; biases
and the other layers are left alone.  Unlike ``first_layer_alpha`` (a forward multiplier, all along
training) they only scale the initial weights.

Deviations: Omega is drawn from a ``torch.Generator`` seeded by ``seed``; Gproj is skipped when
``width <= r`` (Omega then spans R^width, the projection is the identity; ``pilimit_orig`` skips it too).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tttlab.core.errors import InvalidInputError

from .layers import InfPiInput, InfPiLinear, check_positive_int, resolve_dtype


class InfMLP(nn.Module):
    """Infinite-width pi-MLP ``d_in -> r (x depth hidden pi-layers) -> d_out``.

    >>> net = InfMLP(784, 10, r=64, depth=2, first_layer_alpha=1.0, last_layer_alpha=0.5, bias_alpha=0.5)
    >>> opt = PiSGD(net, lr=1.0)            # tttlab.pilimit.optim
    >>> loss = F.cross_entropy(net(x), y); loss.backward(); opt.step(); opt.zero_grad()   # M += batch
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        r: int = 400,
        depth: int = 2,
        first_layer_alpha: float = 1.0,
        last_layer_alpha: float = 1.0,
        bias_alpha: float = 1.0,
        last_bias_alpha: float | None = None,
        chunk_size: int | None = 16384,
        impl: str = "chunked",
        dtype="float32",
        device=None,
        cache_mb: float = 64.0,
        readout_zero_init: bool = True,
    ):
        super().__init__()
        self.d_in = check_positive_int("d_in", d_in)
        self.d_out = check_positive_int("d_out", d_out)
        self.r = check_positive_int("r", r)
        self.depth = check_positive_int("depth", depth, minimum=0)
        self.first_layer_alpha = float(first_layer_alpha)
        self.last_layer_alpha = float(last_layer_alpha)
        self.bias_alpha = float(bias_alpha)
        self.last_bias_alpha = float(bias_alpha if last_bias_alpha is None else last_bias_alpha)
        dt = resolve_dtype(dtype)
        self.input_layer = InfPiInput(self.d_in, self.r, bias_alpha=self.bias_alpha, device=device)
        kw = dict(chunk_size=chunk_size, impl=impl, device=device, dtype=dt, cache_mb=cache_mb)
        self.hidden = nn.ModuleList(
            [InfPiLinear(self.r, bias_alpha=self.bias_alpha, **kw) for _ in range(self.depth)]
        )
        self.readout_zero_init = bool(readout_zero_init)
        self.output_layer = InfPiLinear(
            self.r, self.d_out, bias_alpha=self.last_bias_alpha, output_layer=True,
            zero_init=self.readout_zero_init, **kw,
        )  # fmt: skip

    # the layers an optimizer treats differently
    @property
    def pi_layers(self) -> list[InfPiLinear]:
        return [*self.hidden, self.output_layer]

    def config(self) -> dict:
        return dict(
            d_in=self.d_in, d_out=self.d_out, r=self.r, depth=self.depth,
            first_layer_alpha=self.first_layer_alpha, last_layer_alpha=self.last_layer_alpha,
            bias_alpha=self.bias_alpha, last_bias_alpha=self.last_bias_alpha,
        )  # fmt: skip

    @property
    def M(self) -> int:
        return self.output_layer.M

    def set_chunk_size(self, chunk_size: int | None, cache_mb: float | None = None) -> None:
        for layer in self.pi_layers:
            layer.chunk_size = chunk_size
            if cache_mb is not None:
                layer.cache_mb = float(cache_mb)

    def compile_kernels(self, **compile_kwargs):
        """``torch.compile`` the chunked pi-layers' per-chunk work (``dynamic=True``: M changes every
        step; ``compile_kwargs``: more ``torch.compile`` arguments, e.g. ``mode``) and use it in every
        pi-layer; returns the :class:`~tttlab.pilimit.functional.ChunkKernels`.  The input layer, the
        Python loop over chunks, the accumulating matmuls and the row appends stay eager (the rows grow in
        place every step, which a compiled graph cannot own)."""
        from .functional import ChunkKernels

        if any(layer.impl != "chunked" for layer in self.pi_layers):
            raise InvalidInputError(
                "compile: only impl='chunked' pi-layers have compiled kernels; impl='reference' is the "
                "uncompiled baseline"
            )
        kernels = ChunkKernels(**compile_kwargs)
        for layer in self.pi_layers:
            layer.kernels = kernels
        return kernels

    def reserve(self, rows: int) -> None:
        """Pre-allocate ``rows`` rows per pi-layer (e.g. r + steps x batch) so appends never copy."""
        for layer in self.pi_layers:
            layer.reserve(rows)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2:
            x = x.flatten(1)
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise InvalidInputError(
                f"input of shape {tuple(x.shape)} (flattened); expected (batch, {self.d_in}) = d_in features"
            )
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden representation ``g_L`` (batch x r), the readout's input."""
        g = self.input_layer(self._flat(x)) * self.first_layer_alpha
        for layer in self.hidden:
            g = layer(g)
        return g

    def readout(self, g: torch.Tensor) -> torch.Tensor:
        return self.output_layer(g) * self.last_layer_alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.features(x))

    def zero_pi_grad(self) -> None:
        for layer in self.pi_layers:
            layer.zero_pi_grad()

    def sample(
        self,
        width: int,
        seed: int = 0,
        gaussian_init: bool = False,
        first_layer_init_alpha: float = 1.0,
        second_layer_init_alpha: float = 1.0,
    ) -> FinPiMLP:
        """A finite pi-net of ``width`` sampled from this one (see :class:`FinPiMLP`)."""
        return FinPiMLP(
            self, width, seed=seed, gaussian_init=gaussian_init,
            first_layer_init_alpha=first_layer_init_alpha, second_layer_init_alpha=second_layer_init_alpha,
        )  # fmt: skip


def _relu(x):
    return torch.relu(x)


class FinPiMLP(nn.Module):
    """Finite pi-MLP of hidden width ``width`` sampled from an :class:`InfMLP` (see the module docstring).

    ``gaussian_init=True`` re-draws every weight ``N(0, 2 / fan_in)`` (the muP baseline of the paper,
    trained with ``PiSGD(gproj=False)``; upstream's ``--gaussian-init`` / ``--mu-init``).  Then
    ``weights[0] *= first_layer_init_alpha`` and ``weights[1] *= second_layer_init_alpha`` (upstream's
    ``--first-layer-init-alpha`` / ``--second-layer-init-alpha``; 1 leaves the weights as they are).
    Parameters: ``weights[l]``, ``biases[l]`` for l = 0 (input) .. depth + 1 (output); ``omegas[l]``
    buffers for l = 0..depth.
    """

    def __init__(
        self,
        inf: InfMLP,
        width: int,
        seed: int = 0,
        gaussian_init: bool = False,
        first_layer_init_alpha: float = 1.0,
        second_layer_init_alpha: float = 1.0,
    ):
        super().__init__()
        n = check_positive_int("width", width)
        init_alphas = []
        for name, value in (("first_layer_init_alpha", first_layer_init_alpha),
                            ("second_layer_init_alpha", second_layer_init_alpha)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidInputError(f"{name}={value!r}: expected a finite number")
            init_alphas.append(float(value))
        self.first_layer_init_alpha, self.second_layer_init_alpha = init_alphas
        self.width, self.d_in, self.d_out, self.r, self.depth = n, inf.d_in, inf.d_out, inf.r, inf.depth
        self.first_layer_alpha, self.last_layer_alpha = inf.first_layer_alpha, inf.last_layer_alpha
        self.bias_alpha, self.last_bias_alpha = inf.bias_alpha, inf.last_bias_alpha
        self.gaussian_init = bool(gaussian_init)
        dev = inf.input_layer.A.device
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        omegas = [torch.randn(n, self.r, generator=gen).to(dev) for _ in range(self.depth + 1)]
        weights, biases = [], []
        with torch.no_grad():
            A0 = inf.input_layer.A.float()
            weights.append(n**-0.5 * omegas[0] @ A0.T)
            b0 = inf.input_layer.bias
            biases.append(n**-0.5 * omegas[0] @ b0.float() if b0 is not None else None)
            for i, layer in enumerate(inf.pi_layers):
                A = layer.A.float() * layer.Amult[:, None]
                act = _relu(omegas[i] @ layer.B.float().T)  # n x M
                if layer.output_layer:
                    weights.append(n**-0.5 * A.T @ act.T)
                    biases.append(layer.bias.detach().float().clone() if layer.bias is not None else None)
                else:
                    weights.append(n**-1.0 * omegas[i + 1] @ (A.T @ act.T))
                    biases.append(
                        n**-0.5 * omegas[i + 1] @ layer.bias.float() if layer.bias is not None else None
                    )
            if self.gaussian_init:
                for w in weights:
                    w.copy_(torch.randn(w.shape, generator=gen).to(dev) * (2.0 / w.shape[1]) ** 0.5)
            # after sampling and the muP re-draw, as upstream; weights only (biases untouched)
            for w, alpha in zip(weights[:2], init_alphas):
                if alpha != 1.0:
                    w.mul_(alpha)
        self.weights = nn.ParameterList([nn.Parameter(w) for w in weights])
        self.has_bias = [b is not None for b in biases]
        self.biases = nn.ParameterList(
            [nn.Parameter(b if b is not None else torch.zeros(0, device=dev)) for b in biases]
        )
        for i, om in enumerate(omegas):
            self.register_buffer(f"omega{i}", om)
            # width <= r: Omega^T Omega (r x r) has rank <= width, its inverse does not exist (unused then)
            inv = torch.linalg.inv if n > self.r else torch.linalg.pinv
            self.register_buffer(f"gcovinv{i}", inv(om.T @ om))

    def config(self) -> dict:
        return dict(
            width=self.width, gaussian_init=self.gaussian_init,
            first_layer_init_alpha=self.first_layer_init_alpha, second_layer_init_alpha=self.second_layer_init_alpha,
        )  # fmt: skip

    def compile_forward(self, **compile_kwargs) -> None:
        """``torch.compile`` :meth:`features` and :meth:`readout` (every forward path goes through them:
        ``forward``, MAML's closed-form readout, transfer features; ``compile_kwargs``: ``torch.compile``
        arguments, e.g. ``mode``); the parameters stay this module's."""
        self.features = torch.compile(self.features, **compile_kwargs)
        self.readout = torch.compile(self.readout, **compile_kwargs)

    def _bias(self, i: int):
        if not self.has_bias[i]:
            return None
        alpha = self.last_bias_alpha if i == self.depth + 1 else self.bias_alpha
        return alpha * self.biases[i]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """relu of the last hidden pre-activations (batch x width), the readout's input."""
        if x.dim() > 2:
            x = x.flatten(1)
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise InvalidInputError(f"input of shape {tuple(x.shape)}; expected (batch, {self.d_in})")
        h = (
            nn.functional.linear(x.to(self.weights[0].dtype), self.weights[0], self._bias(0))
            * self.first_layer_alpha
        )
        for i in range(1, self.depth + 1):
            h = nn.functional.linear(_relu(h), self.weights[i], self._bias(i))
        return _relu(h)

    def readout(self, f: torch.Tensor) -> torch.Tensor:
        i = self.depth + 1
        return nn.functional.linear(f, self.weights[i], self._bias(i)) * self.last_layer_alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.features(x))

    @torch.no_grad()
    def project_gradients_(self) -> None:
        """Gproj: grad <- Omega (Omega^T Omega)^-1 Omega^T grad for every non-output weight and bias.

        A no-op when ``width <= r``: Omega (width x r) then spans all of R^width, so the projection is the
        identity (as upstream, which skips Gproj when r >= width); the formula would instead multiply
        the gradient by the inverse of a singular matrix."""
        if self.width <= self.r:
            return
        for i in range(self.depth + 1):
            om, gi = getattr(self, f"omega{i}"), getattr(self, f"gcovinv{i}")
            for p in (self.weights[i], self.biases[i] if self.has_bias[i] else None):
                if p is None or p.grad is None:
                    continue
                g = p.grad.reshape(p.shape[0], -1).float()
                p.grad.copy_((om @ (gi @ (om.T @ g))).reshape(p.shape).to(p.grad.dtype))


def mup_baseline(inf: InfMLP, width: int, seed: int = 0) -> FinPiMLP:
    """The muP baseline of the paper: Gaussian-initialised finite net (train with ``gproj=False``)."""
    return FinPiMLP(inf, width, seed=seed, gaussian_init=True)


def save_net(path, net: nn.Module) -> None:
    """Save an :class:`InfMLP` (with all its grown rows) or :class:`FinPiMLP` atomically (temp + rename)."""
    from tttlab.core._io import atomic_path

    if isinstance(net, InfMLP):
        payload = {"kind": "InfMLP", "config": net.config(), "state": net.state_dict()}
    elif isinstance(net, FinPiMLP):
        inf_cfg = dict(d_in=net.d_in, d_out=net.d_out, r=net.r, depth=net.depth,
                       first_layer_alpha=net.first_layer_alpha, last_layer_alpha=net.last_layer_alpha,
                       bias_alpha=net.bias_alpha, last_bias_alpha=net.last_bias_alpha)  # fmt: skip
        payload = {"kind": "FinPiMLP", "config": inf_cfg, "finite": net.config(), "state": net.state_dict()}
    else:
        raise InvalidInputError(f"save_net needs an InfMLP or FinPiMLP, got {type(net).__name__}")
    payload["format"] = "tttlab.pilimit.net/1"
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_net(path, device=None, **kwargs) -> nn.Module:
    """Load a net saved by :func:`save_net` (``kwargs``: e.g. ``chunk_size``, ``impl``, ``dtype`` of an InfMLP)."""
    from tttlab.core.errors import CheckpointError
    from tttlab.core.torch import read_torch_file

    # a missing, truncated or foreign file: a CheckpointError naming the path (core's safe reader)
    payload = read_torch_file(path, option=None, what="pi-net file")
    if not isinstance(payload, dict) or payload.get("format") != "tttlab.pilimit.net/1":
        raise CheckpointError(f"{path}: not a tttlab.pilimit.net/1 file (written by save_net)")
    inf = InfMLP(**payload["config"], device=device, **kwargs)
    if payload["kind"] == "InfMLP":
        net = inf
    else:
        fin = payload["finite"]
        # the init alphas only scale the initial weights, which load_state_dict replaces; kept for the record
        net = FinPiMLP(
            inf, fin["width"], gaussian_init=fin["gaussian_init"],
            first_layer_init_alpha=fin.get("first_layer_init_alpha", 1.0),
            second_layer_init_alpha=fin.get("second_layer_init_alpha", 1.0),
        )  # fmt: skip
    net.load_state_dict(payload["state"])
    return net.to(device) if device is not None else net
