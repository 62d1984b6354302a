"""Noise corruptions: gaussian, shot (Poisson), impulse (salt and pepper), speckle.

Constants per family (``x`` in [0, 1]):

==============  =============================  ===============================
corruption      imagenet (make_imagenet_c.py)  cifar / mnist (make_cifar_c.py)
==============  =============================  ===============================
gaussian sigma  .08 .12 .18 .26 .38            .04 .06 .08 .09 .10
shot photons    60 25 12 5 3                   500 250 100 75 50
impulse amount  .03 .06 .09 .17 .27            .01 .02 .03 .05 .07
speckle sigma   .15 .20 .35 .45 .60            .06 .10 .12 .16 .20
==============  =============================  ===============================

The ``mnist`` family uses the CIFAR constants unchanged: noise is per pixel, so the image size does not
enter.  Impulse noise follows scikit-image's ``random_noise(mode="s&p")`` semantics (each value is
replaced with probability ``amount``, half of them by 0 and half by 1), drawn from ``rng``.
"""

from __future__ import annotations

import numpy as np

from ._common import pick

GAUSSIAN = {"imagenet": (0.08, 0.12, 0.18, 0.26, 0.38), "cifar": (0.04, 0.06, 0.08, 0.09, 0.10)}
SHOT = {"imagenet": (60, 25, 12, 5, 3), "cifar": (500, 250, 100, 75, 50)}
IMPULSE = {"imagenet": (0.03, 0.06, 0.09, 0.17, 0.27), "cifar": (0.01, 0.02, 0.03, 0.05, 0.07)}
SPECKLE = {"imagenet": (0.15, 0.2, 0.35, 0.45, 0.6), "cifar": (0.06, 0.1, 0.12, 0.16, 0.2)}
for _table in (GAUSSIAN, SHOT, IMPULSE, SPECKLE):
    _table["mnist"] = _table["cifar"]


def _normal(rng: np.random.Generator, shape, scale: float) -> np.ndarray:
    return rng.standard_normal(size=shape, dtype=np.float32) * np.float32(scale)


def gaussian_noise(x, severity, rng, family):
    return x + _normal(rng, x.shape, pick(GAUSSIAN, family, severity))


def shot_noise(x, severity, rng, family):
    lam = np.float32(pick(SHOT, family, severity))
    return rng.poisson(x * lam).astype(np.float32) / lam


def impulse_noise(x, severity, rng, family):
    amount = pick(IMPULSE, family, severity)
    u = rng.random(size=x.shape, dtype=np.float32)
    out = x.copy()
    # u < amount/2 -> pepper (0); amount/2 <= u < amount -> salt (1): one draw decides both.
    out[u < amount] = 1.0
    out[u < amount / 2] = 0.0
    return out


def speckle_noise(x, severity, rng, family):
    return x + x * _normal(rng, x.shape, pick(SPECKLE, family, severity))
