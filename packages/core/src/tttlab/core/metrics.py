"""Classification metrics and the ImageNet-C corruption errors (Hendrycks & Dietterich, ICLR 2019).

* :func:`accuracy`, :func:`error`, :func:`topk_accuracy`: from integer predictions or (N, C) scores.
* :func:`expected_calibration_error`: equal-width confidence bins (Guo et al. 2017), plus the
  reliability table.
* :func:`corruption_error` / :func:`mce`: CE_c = sum_s E_{s,c} / sum_s E^AlexNet_{s,c}; mCE = mean_c CE_c.
  With per-corruption errors averaged over severities (what :data:`ALEXNET_ERRORS` holds) the ratio is
  the same, since both sums run over the same 5 severities.
* :func:`relative_ce` / :func:`relative_mce`: (sum_s E_{s,c} - E_clean) / (sum_s E^AlexNet_{s,c} - E^AlexNet_clean).

:data:`ALEXNET_ERRORS`: AlexNet's top-1 error on each ImageNet-C corruption averaged over severities 1-5
(fractions; the values released with the benchmark and used by AugMix and RobustBench), and
:data:`ALEXNET_CLEAN_ERROR`: its clean top-1 error (torchvision AlexNet, 56.522% top-1 -> 0.43478).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import InvalidInputError

ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324,
    "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}  # fmt: skip
ALEXNET_CLEAN_ERROR = 0.43478


def _labels(y, name="labels") -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise InvalidInputError(f"{name} must be a 1-D integer array, got {y.dtype} {y.shape}")
    return y


def _scores(s, n: int | None = None) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 2:
        raise InvalidInputError(f"scores must be (N, C), got shape {s.shape}")
    if not np.isfinite(s).all():
        raise InvalidInputError("scores contain NaN or inf; expected finite numbers")
    if n is not None and s.shape[0] != n:
        raise InvalidInputError(f"{s.shape[0]} score rows for {n} labels")
    return s


def predictions(scores_or_preds) -> np.ndarray:
    a = np.asarray(scores_or_preds)
    if a.ndim == 2:
        return _scores(a).argmax(axis=1)
    return _labels(a, "predictions")


def accuracy(scores_or_preds, labels) -> float:
    """Fraction correct; ``scores_or_preds`` is (N, C) scores/logits or (N,) integer predictions."""
    y = _labels(labels)
    p = predictions(scores_or_preds)
    if p.shape != y.shape:
        raise InvalidInputError(f"{p.shape[0]} predictions for {y.shape[0]} labels")
    if y.size == 0:
        raise InvalidInputError("accuracy of an empty set is undefined")
    return float((p == y).mean())


def error(scores_or_preds, labels) -> float:
    return 1.0 - accuracy(scores_or_preds, labels)


def topk_accuracy(scores, labels, k: int = 5) -> float:
    y = _labels(labels)
    s = _scores(scores, len(y))
    if not 1 <= k <= s.shape[1]:
        raise InvalidInputError(f"k={k} must be in 1..{s.shape[1]}")
    topk = np.argpartition(-s, k - 1, axis=1)[:, :k]
    return float((topk == y[:, None]).any(axis=1).mean())


def softmax(logits) -> np.ndarray:
    z = _scores(logits)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def reliability(probs, labels, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: count, mean confidence, accuracy."""
    y = _labels(labels)
    p = _scores(probs, len(y))
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise InvalidInputError(
            "probs must be non-negative rows summing to 1 (apply softmax to logits first)"
        )
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=(pred == y).astype(float), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"edges": edges, "count": count, "confidence": conf_sum / count, "accuracy": acc_sum / count}


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| over equal-width bins of the top-1 confidence."""
    r = reliability(probs, labels, n_bins)
    n = r["count"].sum()
    mask = r["count"] > 0
    return float((r["count"][mask] / n * np.abs(r["accuracy"][mask] - r["confidence"][mask])).sum())


ece = expected_calibration_error


def _errors_by_corruption(errors: Mapping) -> dict[str, float]:
    """Accept {corruption: error} or {corruption: [error per severity]} (mean taken)."""
    out = {}
    for c, e in errors.items():
        v = np.asarray(e, dtype=np.float64)
        if not np.isfinite(v).all() or (v < 0).any() or (v > 1).any():
            raise InvalidInputError(f"errors for {c!r} must be fractions in [0, 1], got {e!r}")
        out[c] = float(v.mean())
    return out


def mean_error(errors: Mapping) -> float:
    """Mean over domains (corruptions) of the error, each averaged over its severities."""
    e = _errors_by_corruption(errors)
    return float(np.mean(list(e.values())))


def corruption_error(errors: Mapping, baseline: Mapping = ALEXNET_ERRORS) -> dict[str, float]:
    e = _errors_by_corruption(errors)
    missing = [c for c in e if c not in baseline]
    if missing:
        raise InvalidInputError(f"no baseline error for {missing}; baseline has {sorted(baseline)}")
    return {c: v / baseline[c] for c, v in e.items()}


def mce(errors: Mapping, baseline: Mapping = ALEXNET_ERRORS) -> float:
    """Mean corruption error (a fraction: 1.0 = AlexNet); multiply by 100 for the paper's %."""
    return float(np.mean(list(corruption_error(errors, baseline).values())))


def relative_ce(errors: Mapping, clean_error: float, baseline: Mapping = ALEXNET_ERRORS,
                baseline_clean: float = ALEXNET_CLEAN_ERROR) -> dict[str, float]:  # fmt: skip
    e = _errors_by_corruption(errors)
    return {c: (v - clean_error) / (baseline[c] - baseline_clean) for c, v in e.items()}


def relative_mce(errors: Mapping, clean_error: float, baseline: Mapping = ALEXNET_ERRORS,
                 baseline_clean: float = ALEXNET_CLEAN_ERROR) -> float:  # fmt: skip
    return float(np.mean(list(relative_ce(errors, clean_error, baseline, baseline_clean).values())))
