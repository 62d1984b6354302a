"""Noise corruptions: gaussian, shot (Poisson), impulse (salt and pepper), speckle.

Constants (``x`` in [0, 1]), from Hendrycks & Dietterich's ``make_imagenet_c.py`` (the values that
imagecorruptions-imaug also uses) and ``make_cifar_c.py`` (github.com/hendrycks/robustness,
``ImageNet-C/create_c/``):

==============  =============================  ===============================
corruption      imagenet                       cifar and mnist
==============  =============================  ===============================
gaussian sigma  .08 .12 .18 .26 .38            .04 .06 .08 .09 .10
shot photons    60 25 12 5 3                   500 250 100 75 50
impulse amount  .03 .06 .09 .17 .27            .01 .02 .03 .05 .07
speckle sigma   .15 .20 .35 .45 .60            .06 .10 .12 .16 .20
==============  =============================  ===============================

``mnist`` uses the CIFAR constants unchanged: the noise acts per pixel, so the image size plays no role,
and one channel is handled like any other channel.

Deviations from the original scripts (the distributions are the same, the random draws are not):

* all randomness comes from the ``numpy.random.Generator`` passed in; gaussian and speckle draw float32
  normals.
* impulse noise draws one uniform per value: below ``amount / 2`` it becomes 0 (pepper), below ``amount`` it
  becomes 1 (salt), as scikit-image's ``random_noise(mode="s&p", amount=...)`` with its default even salt
  to pepper ratio does with two Bernoulli draws.  It works on uint8 directly (same bytes as in float).
* shot noise: for images on the 1/255 grid (every image that :func:`~tttlab.core.corruptions.corrupt`
  passes in), the Poisson variate of each of the 256 levels is drawn by table inversion of its exact CDF
  (log-pmf cumulated, ``scipy.special.pdtr`` for the
  lower tail; a guide table indexes the CDF, lower tail below 12 standard deviations is
  dropped: under 1e-30 of the mass); other float inputs fall back to ``Generator.poisson``.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from ._common import pick

GAUSSIAN = {"imagenet": (0.08, 0.12, 0.18, 0.26, 0.38), "cifar": (0.04, 0.06, 0.08, 0.09, 0.10)}
SHOT = {"imagenet": (60, 25, 12, 5, 3), "cifar": (500, 250, 100, 75, 50)}
IMPULSE = {"imagenet": (0.03, 0.06, 0.09, 0.17, 0.27), "cifar": (0.01, 0.02, 0.03, 0.05, 0.07)}
SPECKLE = {"imagenet": (0.15, 0.2, 0.35, 0.45, 0.6), "cifar": (0.06, 0.1, 0.12, 0.16, 0.2)}
for _table in (GAUSSIAN, SHOT, IMPULSE, SPECKLE):
    _table["mnist"] = _table["cifar"]


def gaussian_noise(x, severity, rng, family):
    """``x + N(0, sigma^2)`` independently per value."""
    out = rng.standard_normal(size=x.shape, dtype=np.float32)
    out *= np.float32(pick(GAUSSIAN, family, severity))
    out += x
    return out


def speckle_noise(x, severity, rng, family):
    """Multiplicative noise ``x * (1 + N(0, sigma^2))``."""
    out = rng.standard_normal(size=x.shape, dtype=np.float32)
    out *= np.float32(pick(SPECKLE, family, severity))
    out += np.float32(1)
    out *= x
    return out


def impulse_noise(x, severity, rng, family):
    """Each value independently: pepper (0) with probability amount/2, salt (1) with amount/2."""
    amount = pick(IMPULSE, family, severity)
    u = rng.random(size=x.shape, dtype=np.float32)
    out = x.copy()
    out[u < np.float32(amount)] = 255 if x.dtype == np.uint8 else 1.0
    out[u < np.float32(amount / 2)] = 0
    return out


# Salt and pepper only sets values to 0 or 1: on uint8 (0 or 255) it gives the very bytes of the float
# path and the caller's truncation, without the float round trip.
impulse_noise.native_uint8 = True


def shot_noise(x, severity, rng, family):
    """``Poisson(x * photons) / photons``."""
    photons = pick(SHOT, family, severity)
    levels = _levels_255(x)
    if levels is None:  # not on the 1/255 grid: the generic sampler
        return (rng.poisson(x.astype(np.float64) * photons) / photons).astype(np.float32)
    table = _poisson_tables(family)[photons]
    return table.sample(levels, rng).reshape(x.shape)


def _levels_255(x: np.ndarray) -> np.ndarray | None:
    """``x * 255`` as uint8 when every value of ``x`` is (to float32 precision) a multiple of 1/255."""
    scaled = x * np.float32(255)
    levels = np.rint(scaled)
    if x.size and (levels.min() < 0 or levels.max() > 255 or np.abs(scaled - levels).max() > 1e-3):
        return None
    return levels.astype(np.uint8)


class _PoissonLevels:
    """Inverse-CDF sampler of ``Poisson(k / 255 * photons) / photons`` for the levels k = 0..255.

    Row k of ``cdf`` holds P(X <= lo_k + j) for j = 0..width-1 (the last column forced to 1); ``guide``
    row k holds, for g = 0..m-1, the first j with cdf > g / m, so a uniform u starts its search at
    ``guide[k, floor(u m)]`` and moves right while cdf <= u (a quarter of the draws move once or more)."""

    def __init__(self, photons: float):
        from scipy.special import gammaln, pdtr

        lam = np.arange(256) / 255.0 * photons
        sd = np.sqrt(lam)
        lo = np.maximum(0, np.floor(lam - 12 * sd - 2)).astype(np.int64)
        width = int((np.ceil(lam + 14 * sd + 20) - lo).max())
        counts = lo[:, None] + np.arange(width)[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            logpmf = counts * np.log(lam)[:, None] - lam[:, None] - gammaln(counts + 1)
        pmf = np.exp(logpmf)
        pmf[0] = 0.0
        pmf[0, 0] = 1.0  # lam = 0: always 0
        below = np.where(lo > 0, pdtr(np.maximum(lo - 1, 0), lam), 0.0)  # P(X < lo_k), about 0
        cdf = below[:, None] + np.cumsum(pmf, axis=1)
        np.minimum(cdf, 1.0, out=cdf)  # rounding can push the cumulated tail past 1
        cdf[:, -1] = 1.0
        m = 1 << int(np.ceil(np.log2(4 * width)))
        # guide[k, g] = #{j : cdf[k, j] <= g / m} = #{j : ceil(cdf[k, j] m) <= g}  (m a power of 2: exact)
        bins = np.ceil(cdf * m).astype(np.int64) + (np.arange(256) * (m + 1))[:, None]
        per_bin = np.bincount(bins.ravel(), minlength=256 * (m + 1)).reshape(256, m + 1)
        guide = np.cumsum(per_bin, axis=1)[:, :m]
        self.width, self.m = width, m
        self.cdf = np.ascontiguousarray(cdf).ravel()
        self.guide = (guide + (np.arange(256) * width)[:, None]).astype(np.int64).ravel()
        self.value = (counts / photons).astype(np.float32).ravel()

    def sample(self, levels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        u = rng.random(size=levels.size)
        g = (u * self.m).astype(np.int64)
        g += levels.ravel().astype(np.int64) * self.m
        pos = self.guide[g]
        todo = np.flatnonzero(self.cdf[pos] <= u)
        while todo.size:
            pos[todo] += 1
            todo = todo[self.cdf[pos[todo]] <= u[todo]]
        return self.value[pos]


@cache
def _poisson_tables(family: str) -> dict[int, _PoissonLevels]:
    """The samplers of all five severities of a family, built together on first use (a few ms)."""
    return {photons: _PoissonLevels(photons) for photons in SHOT[family]}
