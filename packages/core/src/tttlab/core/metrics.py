"""Classification metrics and the ImageNet-C corruption errors (Hendrycks & Dietterich, ICLR 2019).

* :func:`accuracy`, :func:`error`, :func:`topk_accuracy`: from (N,) integer predictions or (N, C)
  scores / logits / probabilities (the arg-max is the same for all three).
* :func:`expected_calibration_error` (:func:`ece`) and :func:`reliability`: equal-width bins of the top-1
  confidence (Guo et al. 2017), ``n_bins`` configurable; ``logits=True`` applies a softmax first.
* :func:`mean_error`: the per-domain errors averaged over domains; :func:`domain_errors` builds
  ``{corruption: {severity: error}}`` from a records table (``tttlab.core.records.load_records``).
* :func:`corruption_error` / :func:`mce`: ``CE_c = sum_s E_{s,c} / sum_s E^AlexNet_{s,c}``, mCE = mean_c CE_c.
* :func:`relative_ce` / :func:`relative_mce`:
  ``sum_s (E_{s,c} - E_clean) / sum_s (E^AlexNet_{s,c} - E^AlexNet_clean)``.

mCE and relative mCE average over the 15 common corruptions only, as the paper defines them: the four
held-out ones (speckle noise, Gaussian blur, spatter, saturate; :data:`HELDOUT`) are for validation and
are left out of the mean when given (``include_heldout=True`` averages over every corruption given);
:func:`corruption_error` / :func:`relative_ce` still report each of them.  A subset of the 15 gives the
mean over that subset, which is not the paper's mCE.  (hendrycks/robustness's ``ImageNet-C/test.py`` prints
an "mCE (unnormalized by AlexNet errors)" over all 19 corruptions: a plain mean error, neither the
paper's mCE nor this one; ``include_heldout=True`` over the 19 is the AlexNet-normalised analogue.)

Every error is a fraction in [0, 1]; CE and mCE are fractions too (1.0 = AlexNet; multiply by 100 for the
papers' percentages).  Corruption errors may be given per severity, as ``{corruption: {severity: error}}``
or ``{corruption: [e1, e2, e3, e4, e5]}``, or already averaged over the five severities,
``{corruption: error}``.  The sums over severities then run over exactly the severities given, so a
severity-5-only evaluation is normalised by AlexNet's severity-5 errors.

AlexNet baselines, :data:`ALEXNET_ERRORS_BY_SEVERITY` (and their means :data:`ALEXNET_ERRORS`): the top-1
errors of torchvision's AlexNet on ImageNet-C, 19 corruptions x severities 1-5, as published in the
README of github.com/hendrycks/robustness ("AlexNet ImageNet-C Error ... use these values to normalize raw
corruption error to calculate mCE", added October 2019, later replaced by a link to a spreadsheet).
:data:`ALEXNET_CLEAN_ERROR` = 0.43478: the clean ImageNet top-1 error of the same torchvision weights
(``alexnet-owt-4df8aa71``, 56.522% top-1), the value the relative mCE uses (the paper rounds it to 43.5%).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import InvalidInputError, SeverityError, UnknownNameError

SEVERITIES = (1, 2, 3, 4, 5)
#: The four held-out corruptions of ImageNet-C, outside the 15 that mCE averages.
HELDOUT = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

# fmt: off
ALEXNET_ERRORS_BY_SEVERITY: dict[str, tuple[float, float, float, float, float]] = {
    "gaussian_noise":    (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise":        (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise":     (0.78374, 0.89808, 0.94870, 0.98720, 0.99548),
    "defocus_blur":      (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur":        (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur":       (0.58430, 0.70048, 0.82108, 0.89750, 0.92638),
    "zoom_blur":         (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow":              (0.71726, 0.88392, 0.86468, 0.91870, 0.94952),
    "frost":             (0.61390, 0.79734, 0.88790, 0.89942, 0.93430),
    "fog":               (0.67474, 0.76050, 0.84378, 0.87260, 0.94500),
    "brightness":        (0.45140, 0.48502, 0.54048, 0.62166, 0.72440),
    "contrast":          (0.64548, 0.76150, 0.88874, 0.97760, 0.99270),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate":          (0.52218, 0.54620, 0.73728, 0.87092, 0.91262),
    "jpeg_compression":  (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
    # the four held-out corruptions
    "speckle_noise":     (0.66192, 0.74440, 0.90246, 0.94548, 0.97268),
    "gaussian_blur":     (0.54732, 0.70444, 0.82574, 0.89864, 0.95940),
    "spatter":           (0.47196, 0.62194, 0.75052, 0.84132, 0.90182),
    "saturate":          (0.59342, 0.65514, 0.51174, 0.70834, 0.82260),
}
# fmt: on
#: AlexNet's error per corruption averaged over severities 1-5 (the "Average" column upstream; 15 common
#: corruptions first, then the 4 held-out ones).
ALEXNET_ERRORS: dict[str, float] = {
    c: round(float(np.mean(v)), 6) for c, v in ALEXNET_ERRORS_BY_SEVERITY.items()
}
ALEXNET_CLEAN_ERROR = 0.43478

# ----------------------------------------------------------------------------------------------------------
# input checks


def _labels(y, name: str = "labels") -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise InvalidInputError(f"{name} must be a 1-D integer array, got dtype {y.dtype} shape {y.shape}")
    return y.astype(np.int64, copy=False)


def _scores(s, n: int | None = None, name: str = "scores") -> np.ndarray:
    s = np.asarray(s)
    if not (np.issubdtype(s.dtype, np.number) or s.dtype == bool):
        raise InvalidInputError(f"{name} must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    if s.ndim != 2 or s.shape[1] == 0:
        raise InvalidInputError(f"{name} must be (N, C) with C >= 1, got shape {s.shape}")
    if not np.isfinite(s).all():
        bad = int((~np.isfinite(s)).any(axis=1).sum())
        raise InvalidInputError(f"{name} contain NaN or inf in {bad} row(s); expected finite numbers")
    if n is not None and s.shape[0] != n:
        raise InvalidInputError(f"{name} have {s.shape[0]} rows for {n} labels; expected one row per label")
    return s


def _nonempty(y: np.ndarray, what: str) -> None:
    if y.size == 0:
        raise InvalidInputError(f"{what} of an empty set is undefined (got 0 labels)")


def predictions(scores_or_preds) -> np.ndarray:
    """(N,) predicted classes from (N, C) scores or from (N,) integer predictions (returned as is)."""
    a = np.asarray(scores_or_preds)
    if a.ndim == 2:
        return _scores(a).argmax(axis=1)
    return _labels(a, "predictions")


# ----------------------------------------------------------------------------------------------------------
# accuracy, top-k, calibration


def accuracy(scores_or_preds, labels) -> float:
    """Fraction correct; ``scores_or_preds`` is (N, C) scores/logits or (N,) integer predictions."""
    y = _labels(labels)
    p = predictions(scores_or_preds)
    if p.shape != y.shape:
        raise InvalidInputError(f"{p.shape[0]} predictions for {y.shape[0]} labels; expected equal counts")
    _nonempty(y, "accuracy")
    return float((p == y).mean())


def error(scores_or_preds, labels) -> float:
    """1 - :func:`accuracy`."""
    return 1.0 - accuracy(scores_or_preds, labels)


def topk_accuracy(scores, labels, k: int = 5) -> float:
    """Fraction of rows whose label is among the ``k`` highest scores (ties broken by class index)."""
    y = _labels(labels)
    s = _scores(scores, len(y))
    _nonempty(y, "top-k accuracy")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= s.shape[1]:
        raise InvalidInputError(f"k={k!r} must be an integer in 1..{s.shape[1]} (the number of classes)")
    if (y < 0).any() or (y >= s.shape[1]).any():
        raise InvalidInputError(f"labels must be in 0..{s.shape[1] - 1}, got range {y.min()}..{y.max()}")
    # rank of the true class = number of classes that beat it (higher score, or equal score and lower index)
    true = s[np.arange(len(y)), y][:, None]
    idx = np.arange(s.shape[1])[None, :]
    rank = ((s > true) | ((s == true) & (idx < y[:, None]))).sum(axis=1)
    return float((rank < k).mean())


def softmax(logits) -> np.ndarray:
    """Row-wise softmax in float64 (max-subtracted)."""
    z = _scores(logits, name="logits")
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def reliability(probs, labels, n_bins: int = 15, *, logits: bool = False) -> dict[str, np.ndarray]:
    """Reliability table over ``n_bins`` equal-width bins of the top-1 confidence.

    Returns ``edges`` (n_bins + 1), and per bin ``count``, mean ``confidence`` and ``accuracy`` (NaN for
    empty bins).  A confidence c falls in the bin (lo, hi]; c = 0 falls in the first bin.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise InvalidInputError(f"n_bins={n_bins!r} must be a positive integer")
    y = _labels(labels)
    p = softmax(probs) if logits else _scores(probs, len(y), name="probs")
    if len(p) != len(y):
        raise InvalidInputError(f"probs have {len(p)} rows for {len(y)} labels; expected one row per label")
    _nonempty(y, "calibration")
    if not logits and ((p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4)):
        raise InvalidInputError(
            "probs must be non-negative rows summing to 1; pass logits=True to apply a softmax to logits"
        )
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=(pred == y).astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "edges": edges,
            "count": count,
            "confidence": conf_sum / count,
            "accuracy": acc_sum / count,
        }


def expected_calibration_error(probs, labels, n_bins: int = 15, *, logits: bool = False) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| over equal-width bins of the top-1 confidence."""
    r = reliability(probs, labels, n_bins, logits=logits)
    mask = r["count"] > 0
    w = r["count"][mask] / r["count"].sum()
    return float((w * np.abs(r["accuracy"][mask] - r["confidence"][mask])).sum())


ece = expected_calibration_error

# ----------------------------------------------------------------------------------------------------------
# corruption errors


def _canonical(name) -> str:
    if name in ALEXNET_ERRORS_BY_SEVERITY:
        return name
    try:  # aliases such as "gauss", "jpeg", "elastic" (imported lazily: corruptions pulls in scipy)
        from .corruptions import canonical_name

        return canonical_name(name)
    except UnknownNameError:
        return str(name)


def _fraction(value, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{where}: {value!r} is not a number; expected an error in [0, 1]") from None
    if not np.isfinite(v) or not 0.0 <= v <= 1.0:
        raise InvalidInputError(f"{where}: {value!r} is not an error fraction in [0, 1] (NaN/inf/percent?)")
    return v


def _per_severity(errors: Mapping) -> dict[str, dict[int, float] | float]:
    """Normalise the accepted inputs to {corruption: {severity: error}} or {corruption: mean error}."""
    if not isinstance(errors, Mapping) or not errors:
        raise InvalidInputError(
            f"errors must be a non-empty mapping {{corruption: error}}, got {type(errors).__name__}"
        )
    out: dict[str, dict[int, float] | float] = {}
    for c, e in errors.items():
        name = _canonical(c)
        if isinstance(e, Mapping):
            if not e:
                raise InvalidInputError(f"errors[{c!r}] has no severities")
            sev = {}
            for s, v in e.items():
                if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or int(s) not in SEVERITIES:
                    raise SeverityError(f"errors[{c!r}]: severity {s!r} is not one of {SEVERITIES}")
                sev[int(s)] = _fraction(v, f"errors[{c!r}][{s}]")
            out[name] = sev
        elif np.ndim(e) == 1:
            if len(e) != len(SEVERITIES):
                raise InvalidInputError(
                    f"errors[{c!r}] has {len(e)} values; expected 5 (severities 1-5), or a "
                    "{severity: error} mapping for a subset of severities"
                )
            out[name] = {s: _fraction(v, f"errors[{c!r}][{s}]") for s, v in zip(SEVERITIES, e)}
        elif np.ndim(e) == 0:
            out[name] = _fraction(e, f"errors[{c!r}]")
        else:
            raise InvalidInputError(f"errors[{c!r}] has shape {np.shape(e)}; expected a number or 5 values")
    return out


def _severity_mean(e: dict[int, float] | float) -> float:
    return float(np.mean(list(e.values()))) if isinstance(e, dict) else float(e)


def _baseline_mean(c: str, e, baseline: Mapping) -> float:
    """The baseline's error for corruption ``c`` averaged over the severities that ``e`` covers."""
    if c not in baseline:
        raise UnknownNameError(
            f"no baseline error for corruption {c!r}; the baseline has {', '.join(baseline)}"
        )
    b = baseline[c]
    if np.ndim(b) == 0:
        if isinstance(e, dict) and len(e) != len(SEVERITIES):
            raise InvalidInputError(
                f"errors[{c!r}] covers severities {sorted(e)} but the baseline for {c!r} is one number "
                "(a mean over all five); give a per-severity baseline"
            )
        return float(b)
    b = {s: float(v) for s, v in (b.items() if isinstance(b, Mapping) else zip(SEVERITIES, b))}
    sev = sorted(e) if isinstance(e, dict) else list(SEVERITIES)
    missing = [s for s in sev if s not in b]
    if missing:
        raise InvalidInputError(f"the baseline for {c!r} lacks severities {missing}")
    return float(np.mean([b[s] for s in sev]))


def mean_error(errors: Mapping) -> float:
    """Mean over corruptions of the error, each averaged over its severities (the "mean error" column)."""
    e = _per_severity(errors)
    return float(np.mean([_severity_mean(v) for v in e.values()]))


def corruption_error(errors: Mapping, baseline: Mapping = ALEXNET_ERRORS_BY_SEVERITY) -> dict[str, float]:
    """CE_c = sum_s E_{s,c} / sum_s E^base_{s,c} over the severities given for c (fractions)."""
    e = _per_severity(errors)
    return {c: _severity_mean(v) / _baseline_mean(c, v, baseline) for c, v in e.items()}


def _mean_over_common(per_corruption: dict[str, float], include_heldout: bool, what: str) -> float:
    """Mean of per-corruption values over the 15 common corruptions given (all given with
    ``include_heldout``); an error if that leaves none."""
    if not isinstance(include_heldout, (bool, np.bool_)):
        raise InvalidInputError(f"include_heldout must be true or false, got {include_heldout!r}")
    kept = [v for c, v in per_corruption.items() if include_heldout or c not in HELDOUT]
    if not kept:
        raise InvalidInputError(
            f"{what} averages the 15 common corruptions, but only held-out ones were given "
            f"({', '.join(per_corruption)}); pass include_heldout=True to average them anyway"
        )
    return float(np.mean(kept))


def mce(
    errors: Mapping, baseline: Mapping = ALEXNET_ERRORS_BY_SEVERITY, *, include_heldout: bool = False
) -> float:
    """Mean corruption error over the common corruptions given (1.0 = AlexNet); x100 for the paper's %.

    Held-out corruptions in ``errors`` are left out of the mean unless ``include_heldout`` (module
    docstring)."""
    return _mean_over_common(corruption_error(errors, baseline), include_heldout, "mCE")


def relative_ce(
    errors: Mapping,
    clean_error: float,
    baseline: Mapping = ALEXNET_ERRORS_BY_SEVERITY,
    baseline_clean: float = ALEXNET_CLEAN_ERROR,
) -> dict[str, float]:
    """Relative CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean)."""
    e = _per_severity(errors)
    clean = _fraction(clean_error, "clean_error")
    base_clean = _fraction(baseline_clean, "baseline_clean")
    out = {}
    for c, v in e.items():
        denom = _baseline_mean(c, v, baseline) - base_clean
        if denom <= 0:
            raise InvalidInputError(f"baseline error for {c!r} does not exceed its clean error {base_clean}")
        out[c] = (_severity_mean(v) - clean) / denom
    return out


def relative_mce(
    errors: Mapping,
    clean_error: float,
    baseline: Mapping = ALEXNET_ERRORS_BY_SEVERITY,
    baseline_clean: float = ALEXNET_CLEAN_ERROR,
    *,
    include_heldout: bool = False,
) -> float:
    """Mean over the common corruptions given of :func:`relative_ce` (held-out ones as in :func:`mce`)."""
    rel = relative_ce(errors, clean_error, baseline, baseline_clean)
    return _mean_over_common(rel, include_heldout, "relative mCE")


# ----------------------------------------------------------------------------------------------------------
# from records


def domain_errors(df, metric: str = "accuracy", **filters) -> dict[str, dict[int, float]]:
    """``{corruption: {severity: error}}`` from a records table (one schema, see ``tttlab.core.records``).

    Rows with ``metric`` (``"accuracy"`` -> 1 - value, ``"error"`` -> value) are averaged per
    (corruption, severity), weighted by ``n`` where it is given; ``filters`` keep rows whose column equals
    the value (e.g. ``method="torch_ttt.tent"``, ``step=0``).  Clean rows (no corruption, or ``"clean"``)
    are left out, :func:`clean_error` gives them; so is every evaluate's summary record, the mean over
    corruptions (``corruption="mean"``, ``tttlab.core.records.write_domain_summary``), which is no domain.
    """
    from .records import SUMMARY_CORRUPTION

    rows = _metric_rows(df, metric, filters)
    rows = rows[rows["corruption"].notna() & ~rows["corruption"].isin([SUMMARY_CORRUPTION, "clean"])]
    out: dict[str, dict[int, float]] = {}
    for (c, s), g in rows.groupby(["corruption", "severity"], sort=True):
        out.setdefault(str(c), {})[int(s)] = _weighted_error(g, metric)
    if not out:
        raise InvalidInputError(f"no corrupted rows with metric {metric!r} and filters {filters}")
    return out


def clean_error(df, metric: str = "accuracy", **filters) -> float:
    """The error of the rows without a corruption (``corruption`` empty or ``"clean"``)."""
    rows = _metric_rows(df, metric, filters)
    rows = rows[rows["corruption"].isna() | (rows["corruption"] == "clean")]
    if len(rows) == 0:
        raise InvalidInputError(f"no clean rows with metric {metric!r} and filters {filters}")
    return _weighted_error(rows, metric)


def per_domain_error(df, metric: str = "accuracy", **filters):
    """A ``pandas.DataFrame`` (corruption, severity, error) of :func:`domain_errors`."""
    import pandas as pd

    e = domain_errors(df, metric, **filters)
    rows = [(c, s, v) for c, sev in e.items() for s, v in sev.items()]
    return pd.DataFrame(rows, columns=["corruption", "severity", "error"])


def _metric_rows(df, metric: str, filters: Mapping):
    if metric not in ("accuracy", "error"):
        raise InvalidInputError(f"metric {metric!r}: expected 'accuracy' or 'error'")
    for key in ("metric", "value", "corruption", "severity", *filters):
        if key not in df.columns:
            raise InvalidInputError(f"records table lacks column {key!r}; has {list(df.columns)}")
    rows = df[df["metric"] == metric]
    for key, value in filters.items():
        rows = rows[rows[key] == value]
    return rows


def _weighted_error(rows, metric: str) -> float:
    v = rows["value"].to_numpy(dtype=np.float64, na_value=np.nan)
    if not np.isfinite(v).all():
        raise InvalidInputError(f"records hold NaN/inf {metric} values: {v[~np.isfinite(v)][:3]}")
    w = rows["n"].to_numpy(dtype=np.float64, na_value=np.nan) if "n" in rows.columns else np.ones_like(v)
    if not (np.isfinite(w).all() and (w > 0).all()):  # weight by n only where every row has one
        w = np.ones_like(v)
    m = float((v * w).sum() / w.sum())
    return 1.0 - m if metric == "accuracy" else m
