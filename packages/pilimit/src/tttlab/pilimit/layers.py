"""Infinite-width pi-layers with torch-like syntax (``nn.Module``s): input layer, hidden/output layers.

Paper: Yang, Santacroce, Hu, ICLR 2022 (``yang2022pinets``); upstream ``pilimit_lib/inf/layers.py`` of
github.com/santacml/pilim (facts: initialisation, shapes, what the pi-gradient is; our own code).

* :class:`InfPiInput`: ``g = x A + bias_alpha * bias`` with ``A`` (d_in x r) unit-norm columns, trained
  by ordinary SGD (autograd).
* :class:`InfPiLinear`: a hidden (or, with ``output_layer=True``, the output) pi-layer; it stores
  ``A`` (M x r_out), ``B`` (M x r, unit rows) and ``Amult`` (M, float32 always). M starts at r (A random
  with variance 1/r_out; the output layer's A is 0, or with ``zero_init=False`` N(0, 1/r^2), as
  ``pilimit_orig``'s ``InfPiMLP`` without ``readout_zero_init``; Amult = 1) and grows by the batch size every
  :class:`~tttlab.pilimit.optim.PiSGD` step.  The rows live in a buffer with spare capacity (``reserve``),
  so an append is O(batch x r), not a copy of the whole layer (``impl="reference"`` appends with
  ``torch.cat`` instead, as upstream does).

Deviation: A/B/Amult are buffers, not ``nn.Parameter``s (autograd never differentiates them; the pi
gradient goes to :attr:`InfPiLinear.pi_rows` through the custom backward), and ``state_dict`` holds only
the M used rows.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tttlab.core.errors import CheckpointError, InvalidInputError

from .functional import IMPLS

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int,))
        and not (isinstance(value, float) and value.is_integer())
    ):
        raise InvalidInputError(f"{name}={value!r}: expected an integer >= {minimum}")
    if int(value) < minimum:
        raise InvalidInputError(f"{name}={value!r}: expected an integer >= {minimum}")
    return int(value)


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class InfPiInput(nn.Module):
    """Input layer of an infinite pi-net: ``x (batch x d_in) -> g = x A + bias_alpha * bias (batch x r)``."""

    def __init__(self, d_in: int, r: int, bias_alpha: float = 1.0, device=None, dtype=torch.float32):
        super().__init__()
        self.d_in = check_positive_int("d_in", d_in)
        self.r = check_positive_int("r", r)
        self.bias_alpha = float(bias_alpha)
        A = torch.randn(self.d_in, self.r, device=device, dtype=torch.float32)
        self.A = nn.Parameter((A / A.norm(dim=0, keepdim=True)).to(dtype))
        self.bias = nn.Parameter(torch.zeros(self.r, device=device, dtype=dtype)) if self.bias_alpha else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.to(self.A.dtype) @ self.A
        if self.bias is not None:
            g = g + self.bias_alpha * self.bias
        return g

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, r={self.r}, bias={self.bias is not None}"


class InfPiLinear(nn.Module):
    """A hidden (or output) infinite-width pi-layer; input ``g`` (batch x r) -> ``g_out`` (batch x r_out).

    ``chunk_size``: rows per chunk of the forward/backward (None: all at once); bounds the working
    memory at O(batch x chunk_size).  ``impl``: ``"chunked"`` (default) or ``"reference"``.
    ``dtype``: storage dtype of A and B (float32, bfloat16, float16); Amult is always float32.
    ``cache_mb``: at most this many MB of ``sqrt(1-q^2)``/``acos(-q)`` chunks kept from the forward for
    the backward (the rest is recomputed); 0: recompute everything (working memory O(batch x chunk_size)).
    ``zero_init`` (output layer only): A = 0 (``pilimit_lib``; ``pilimit_orig`` with ``readout_zero_init``)
    or, when False, its r initial rows N(0, 1/r^2) (``pilimit_orig``'s default: ``A.normal_()`` times
    ``M^-1`` with M = r); the same random draw either way.
    """

    def __init__(
        self,
        r: int,
        r_out: int | None = None,
        bias_alpha: float = 1.0,
        output_layer: bool = False,
        chunk_size: int | None = 16384,
        impl: str = "chunked",
        device=None,
        dtype=torch.float32,
        cache_mb: float = 64.0,
        zero_init: bool = True,
    ):
        super().__init__()
        self.r = check_positive_int("r", r)
        if not (isinstance(cache_mb, (int, float)) and cache_mb >= 0):
            raise InvalidInputError(f"cache_mb={cache_mb!r}: expected a number >= 0")
        self.cache_mb = float(cache_mb)
        self.r_out = check_positive_int("r_out", r_out if r_out is not None else r)
        if impl not in IMPLS:
            raise InvalidInputError(f"impl={impl!r}; expected one of {sorted(IMPLS)}")
        if chunk_size is not None:
            chunk_size = check_positive_int("chunk_size", chunk_size)
        self.impl, self.chunk_size = impl, chunk_size
        self.output_layer = bool(output_layer)
        self.bias_alpha = float(bias_alpha)
        dtype = resolve_dtype(dtype)
        if output_layer:
            scale = 0.0 if zero_init else 1.0 / self.r  # r initial rows: pilimit_orig's M^-1
        else:
            scale = self.r_out**-0.5
        A = torch.randn(self.r, self.r_out, device=device) * scale
        B = torch.randn(self.r, self.r, device=device)
        B = B / B.norm(dim=1, keepdim=True)
        self.register_buffer("A_store", A.to(dtype), persistent=False)
        self.register_buffer("B_store", B.to(dtype), persistent=False)
        self.register_buffer("Amult_store", torch.ones(self.r, device=device), persistent=False)
        self.M = self.r
        self.bias = nn.Parameter(torch.zeros(self.r_out, device=device)) if self.bias_alpha else None
        self.pi_rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        #: compiled chunk functions (:class:`~tttlab.pilimit.functional.ChunkKernels`, set by
        #: ``InfMLP.compile_kernels``; chunked path only) or None: eager
        self.kernels = None

    # rows -----------------------------------------------------------------------------------------------
    @property
    def A(self) -> torch.Tensor:
        return self.A_store[: self.M]

    @property
    def B(self) -> torch.Tensor:
        return self.B_store[: self.M]

    @property
    def Amult(self) -> torch.Tensor:
        return self.Amult_store[: self.M]

    @property
    def capacity(self) -> int:
        return self.A_store.shape[0]

    def reserve(self, rows: int) -> None:
        """Make room for ``rows`` rows in total (no copy on later appends up to that many)."""
        rows = int(rows)
        if rows <= self.capacity or self.impl == "reference":
            return
        for name in ("A_store", "B_store", "Amult_store"):
            old = getattr(self, name)
            new = old.new_zeros((rows, *old.shape[1:]))
            new[: self.M] = old[: self.M]
            setattr(self, name, new)

    @torch.no_grad()
    def append_rows(self, a_rows: torch.Tensor, b_rows: torch.Tensor, amult: float | torch.Tensor) -> None:
        """Append ``len(a_rows)`` rows: ``A += a_rows``, ``B += b_rows``, ``Amult += amult``."""
        n = a_rows.shape[0]
        am = torch.as_tensor(amult, dtype=torch.float32, device=self.Amult_store.device).expand(n)
        if self.impl == "reference":
            self.A_store = torch.cat([self.A, a_rows.to(self.A_store.dtype)])
            self.B_store = torch.cat([self.B, b_rows.to(self.B_store.dtype)])
            self.Amult_store = torch.cat([self.Amult, am])
        else:
            if self.M + n > self.capacity:
                self.reserve(max(self.M + n, int(math.ceil(self.capacity * 1.5))))
            self.A_store[self.M : self.M + n] = a_rows
            self.B_store[self.M : self.M + n] = b_rows
            self.Amult_store[self.M : self.M + n] = am
        self.M += n

    @torch.no_grad()
    def grow_random_(self, rows: int, scale: float = 1e-2, generator=None) -> None:
        """Append ``rows`` random rows (for benchmarks at a given M)."""
        dev = self.A_store.device
        self.reserve(self.M + rows)
        step = 65536
        for lo in range(0, rows, step):
            n = min(step, rows - lo)
            a = torch.randn(n, self.r_out, generator=generator, device=dev) * scale
            b = torch.randn(n, self.r, generator=generator, device=dev)
            self.append_rows(a, b / b.norm(dim=1, keepdim=True), -1.0)

    # pi gradient ----------------------------------------------------------------------------------------
    def _sink(self, a_rows: torch.Tensor, b_rows: torch.Tensor) -> None:
        self.pi_rows.append((a_rows, b_rows))

    def pi_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rows an SGD step would append (``grad_out * s``, ``gbar``), over all backward calls."""
        if not self.pi_rows:
            return None
        if len(self.pi_rows) == 1:
            return self.pi_rows[0]
        return torch.cat([a for a, _ in self.pi_rows]), torch.cat([b for _, b in self.pi_rows])

    def zero_pi_grad(self) -> None:
        self.pi_rows = []

    # forward ----------------------------------------------------------------------------------------------
    def forward(self, g: torch.Tensor) -> torch.Tensor:
        if g.dim() != 2 or g.shape[1] != self.r:
            raise InvalidInputError(f"pi-layer input of shape {tuple(g.shape)}; expected (batch, {self.r})")
        fn = IMPLS[self.impl]
        track = torch.is_grad_enabled()
        # a 0-element leaf that requires grad: the backward runs (pi rows recorded) whatever else needs grad
        anchor = torch.zeros(0, device=g.device, requires_grad=track)
        out = fn.apply(
            g, anchor, self.A, self.Amult, self.B,
            (self.chunk_size, int(self.cache_mb * 2**20), self.kernels), self._sink if track else None,
        )  # fmt: skip
        if self.bias is not None:
            out = out + (self.bias_alpha * self.bias).to(out.dtype)
        return out

    # state --------------------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "A"] = self.A.clone()
        destination[prefix + "B"] = self.B.clone()
        destination[prefix + "Amult"] = self.Amult.clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        keys = [prefix + k for k in ("A", "B", "Amult")]
        present = [k in state_dict for k in keys]
        if any(present) and not all(present):
            raise CheckpointError(f"state dict has only some of {keys}")
        if all(present):
            A, B, Am = (state_dict[k] for k in keys)
            if (
                A.shape[0] != B.shape[0]
                or A.shape[0] != Am.shape[0]
                or A.shape[1] != self.r_out
                or B.shape[1] != self.r
            ):
                raise CheckpointError(
                    f"{prefix}A/B/Amult shapes {tuple(A.shape)}/{tuple(B.shape)}/{tuple(Am.shape)} do not fit a "
                    f"pi-layer with r={self.r}, r_out={self.r_out}"
                )
            dev = self.A_store.device
            self.A_store = A.to(dev, self.A_store.dtype).clone()
            self.B_store = B.to(dev, self.B_store.dtype).clone()
            self.Amult_store = Am.to(dev, torch.float32).clone()
            self.M = A.shape[0]
        elif strict:
            missing.extend(keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        for k in keys:
            if k in unexpected:
                unexpected.remove(k)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.Amult_store = self.Amult_store.float()
        return self

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, r_out={self.r_out}, M={self.M}, output_layer={self.output_layer}, "
            f"bias={self.bias is not None}, impl={self.impl}, chunk_size={self.chunk_size}, cache_mb={self.cache_mb}"
        )
