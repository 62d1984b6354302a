"""Metrics on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tttlab.core import corruptions as C
from tttlab.core import metrics as M
from tttlab.core.errors import InvalidInputError, SeverityError, UnknownNameError


def test_accuracy_topk():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25]])
    y = np.array([1, 1, 2, 2])
    assert M.accuracy(scores, y) == 0.5 and M.error(scores, y) == 0.5
    assert M.accuracy(np.log(scores), y) == 0.5  # logits and probabilities give the same arg-max
    assert M.accuracy(np.array([1, 0, 2, 0]), y) == 0.5
    assert M.topk_accuracy(scores, y, k=1) == 0.5
    assert M.topk_accuracy(scores, y, k=2) == 0.75  # sample 4 has its label in 3rd place
    assert M.topk_accuracy(scores, y, k=3) == 1.0
    # ties: the lower class index wins, as in argmax
    assert M.topk_accuracy(np.array([[1.0, 1.0, 0.0]]), np.array([1]), k=1) == 0.0
    assert M.topk_accuracy(np.array([[1.0, 1.0, 0.0]]), np.array([1]), k=2) == 1.0


def test_ece_hand_values():
    # perfectly calibrated: confidence 0.8 on 10 samples of which 8 are right
    p = np.tile([[0.8, 0.2]], (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert M.expected_calibration_error(p, y, n_bins=10) == pytest.approx(0.0, abs=1e-12)
    # overconfident: confidence 0.9, accuracy 0.5 -> ECE 0.4
    p = np.tile([[0.9, 0.1]], (4, 1))
    y = np.array([0, 0, 1, 1])
    assert M.expected_calibration_error(p, y) == pytest.approx(0.4)
    # two bins: 0.6 (all right) and 0.95 (half right): (2/4) * 0.4 + (2/4) * 0.45
    p = np.array([[0.6, 0.4], [0.6, 0.4], [0.95, 0.05], [0.95, 0.05]])
    y = np.array([0, 0, 0, 1])
    assert M.ece(p, y) == pytest.approx(0.5 * 0.4 + 0.5 * 0.45)
    # with one bin, ECE is |mean confidence - accuracy| = |0.775 - 0.75|
    assert M.ece(p, y, n_bins=1) == pytest.approx(0.025)
    # from logits: log-probabilities give the same value
    assert M.ece(np.log(p), y, logits=True) == pytest.approx(0.5 * 0.4 + 0.5 * 0.45)
    r = M.reliability(p, y, n_bins=10)
    assert r["count"].tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]  # 0.6 falls in (0.5, 0.6]
    assert r["accuracy"][9] == 0.5 and r["confidence"][5] == pytest.approx(0.6)


def test_alexnet_table():
    assert len(M.ALEXNET_ERRORS_BY_SEVERITY) == 19 and len(M.ALEXNET_ERRORS) == 19
    # the "Average" column published upstream, to its 6 digits
    assert M.ALEXNET_ERRORS["gaussian_noise"] == 0.886428
    assert M.ALEXNET_ERRORS["jpeg_compression"] == 0.6065
    assert M.ALEXNET_ERRORS["saturate"] == 0.658248
    assert M.ALEXNET_ERRORS_BY_SEVERITY["fog"][4] == 0.945


def test_mce_of_alexnet_is_100_percent():
    assert 100 * M.mce(M.ALEXNET_ERRORS) == pytest.approx(100.0, abs=1e-9)
    assert 100 * M.mce(M.ALEXNET_ERRORS_BY_SEVERITY) == pytest.approx(100.0, abs=1e-9)
    sev5 = {c: {5: e[4]} for c, e in M.ALEXNET_ERRORS_BY_SEVERITY.items()}
    assert M.mce(sev5) == pytest.approx(1.0, abs=1e-12)
    assert M.relative_mce(M.ALEXNET_ERRORS, M.ALEXNET_CLEAN_ERROR) == pytest.approx(1.0, abs=1e-12)
    assert M.corruption_error({"gauss": 0.886428 / 2})["gaussian_noise"] == pytest.approx(0.5)  # alias


def test_ce_subset_of_severities_uses_matching_baseline():
    # fog at severities 1 and 5: (0.3 + 0.5) / (0.67474 + 0.945)
    ce = M.corruption_error({"fog": {1: 0.3, 5: 0.5}})["fog"]
    assert ce == pytest.approx(0.8 / (0.67474 + 0.945))


def test_relative_mce_hand_example():
    base = {"fog": 0.8, "snow": 0.6}
    errs = {"fog": [0.3, 0.5, 0.4, 0.4, 0.4], "snow": 0.35}  # fog mean 0.4
    # CE: 0.4/0.8 = 0.5, 0.35/0.6; relative: (0.4-0.2)/(0.8-0.4) = 0.5, (0.35-0.2)/(0.6-0.4) = 0.75
    assert M.mce(errs, base) == pytest.approx((0.5 + 0.35 / 0.6) / 2)
    assert M.relative_mce(errs, 0.2, base, 0.4) == pytest.approx(0.625)
    assert M.mean_error(errs) == pytest.approx(0.375)
    # with per-severity baselines: sum_s (E_s - E_clean) / sum_s (A_s - A_clean)
    base5 = {"fog": [0.5, 0.6, 0.7, 0.8, 0.9]}
    rel = M.relative_ce({"fog": {2: 0.3, 4: 0.5}}, 0.1, base5, 0.4)["fog"]
    assert rel == pytest.approx(((0.3 - 0.1) + (0.5 - 0.1)) / ((0.6 - 0.4) + (0.8 - 0.4)))


def test_errors_from_records():
    df = pd.DataFrame(
        {
            "method": ["a"] * 5,
            "metric": ["accuracy"] * 4 + ["loss"],
            "corruption": ["fog", "fog", "snow", None, "fog"],
            "severity": [5, 5, 5, None, 5],
            "value": [0.5, 0.8, 0.6, 0.9, 3.0],
            "n": [100, 300, 10, 50, 1],
        }
    )
    e = M.domain_errors(df, method="a")
    assert e == {"fog": {5: pytest.approx(1 - (50 + 240) / 400)}, "snow": {5: pytest.approx(0.4)}}
    assert M.clean_error(df) == pytest.approx(0.1)
    table = M.per_domain_error(df)
    assert table.to_dict("list")["corruption"] == ["fog", "snow"]


def test_bad_inputs():
    with pytest.raises(InvalidInputError, match="NaN"):
        M.accuracy(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(InvalidInputError, match="NaN"):
        M.ece(np.array([[np.inf, 0.0]]), np.array([0]), logits=True)
    with pytest.raises(InvalidInputError, match="NaN"):
        M.mce({"fog": float("nan")})
    with pytest.raises(InvalidInputError, match="predictions for"):
        M.accuracy(np.array([0, 1]), np.array([0]))
    with pytest.raises(InvalidInputError, match="integer"):
        M.accuracy(np.array([0, 1]), np.array([0.0, 1.0]))
    with pytest.raises(InvalidInputError, match="empty"):
        M.accuracy(np.zeros((0, 3)), np.zeros(0, int))
    with pytest.raises(InvalidInputError, match="k=4"):
        M.topk_accuracy(np.eye(3), np.arange(3), k=4)
    with pytest.raises(UnknownNameError, match="not_a_corruption"):
        M.mce({"not_a_corruption": 0.3})
    with pytest.raises(InvalidInputError, match="summing to 1"):
        M.ece(np.array([[2.0, 0.0]]), np.array([0]))
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        M.mce({"fog": 45.0})  # a percentage
    with pytest.raises(SeverityError, match="6"):
        M.mce({"fog": {6: 0.4}})
    with pytest.raises(InvalidInputError, match="3 values"):
        M.mce({"fog": [0.1, 0.2, 0.3]})
    with pytest.raises(InvalidInputError, match="n_bins"):
        M.ece(np.eye(2), np.arange(2), n_bins=0)


def test_error_metric_rows_and_clean_rows_named_clean():
    """Rows with ``metric="error"`` are errors already (not 1 - value), and clean rows may be named
    ``"clean"`` as well as left empty (mutation audit: both survived)."""
    df = pd.DataFrame(
        {
            "metric": ["error", "error", "error", "error"],
            "corruption": ["fog", "fog", "clean", None],
            "severity": [5, 5, None, None],
            "value": [0.2, 0.4, 0.1, 0.3],
            "n": [10, 30, 20, 20],
        }
    )
    assert M.domain_errors(df, metric="error") == {"fog": {5: pytest.approx((2 + 12) / 40)}}
    assert M.clean_error(df, metric="error") == pytest.approx((0.1 * 20 + 0.3 * 20) / 40)
    acc = df.assign(metric="accuracy")
    assert M.clean_error(acc) == pytest.approx(1 - 0.2)


def test_mce_averages_the_15_common_corruptions_not_the_held_out_ones():
    errors = {c: 0.5 * M.ALEXNET_ERRORS[c] for c in C.COMMON}  # CE 0.5 on each common corruption
    errors |= {c: 1.0 * M.ALEXNET_ERRORS[c] for c in C.HELDOUT}  # CE 1.0 on the held-out ones
    assert M.mce(errors) == pytest.approx(0.5)
    assert M.mce(errors, include_heldout=True) == pytest.approx((15 * 0.5 + 4 * 1.0) / 19)
    ce = M.corruption_error(errors)
    assert len(ce) == 19 and ce["spatter"] == pytest.approx(1.0), "CE is still reported per held-out one"


def test_relative_mce_leaves_the_held_out_corruptions_out_too():
    clean = 0.2
    base = M.ALEXNET_CLEAN_ERROR
    errors = {c: clean + 0.25 * (M.ALEXNET_ERRORS[c] - base) for c in C.COMMON}
    errors |= {c: clean + 1.5 * (M.ALEXNET_ERRORS[c] - base) for c in C.HELDOUT}
    assert M.relative_mce(errors, clean) == pytest.approx(0.25)
    assert M.relative_mce(errors, clean, include_heldout=True) == pytest.approx((15 * 0.25 + 4 * 1.5) / 19)


def test_mce_of_held_out_corruptions_only_is_an_error():
    with pytest.raises(InvalidInputError, match="15 common corruptions.*include_heldout"):
        M.mce({"spatter": 0.5})
    assert M.mce({"spatter": 0.5}, include_heldout=True) == pytest.approx(0.5 / M.ALEXNET_ERRORS["spatter"])
    with pytest.raises(InvalidInputError, match="include_heldout must be true or false"):
        M.mce({"fog": 0.5}, include_heldout="no")


def test_metrics_held_out_list_is_the_corruptions_one():
    assert M.HELDOUT == C.HELDOUT


def test_alexnet_severity_errors_reproduce_the_published_averages():
    """The "Average" column of the AlexNet ImageNet-C table in hendrycks/robustness's README (Oct 2019):
    a typo in any of the 95 per-severity errors moves its corruption's mean by at least 2e-6."""
    published = {
        "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
        "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
        "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204,
        "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
        "speckle_noise": 0.845388, "gaussian_blur": 0.787108, "spatter": 0.717512, "saturate": 0.658248,
    }  # fmt: skip
    assert list(M.ALEXNET_ERRORS_BY_SEVERITY) == list(published)
    for c, mean in published.items():
        assert np.mean(M.ALEXNET_ERRORS_BY_SEVERITY[c]) == pytest.approx(mean, abs=5e-7), c
    assert M.ALEXNET_CLEAN_ERROR == pytest.approx(1 - 0.56522)  # torchvision alexnet-owt-4df8aa71 top-1


def test_errors_from_an_evaluates_records_leave_its_mean_summary_out(tmp_path):
    """Every evaluate ends with ``write_domain_summary``'s ``corruption="mean"`` record; read back from the
    run directory it is no corruption: ``mce(domain_errors(...))`` failed on it with 'no baseline error for
    corruption 'mean'', and ``mean_error`` counted it as one more corruption."""
    from tttlab.core.benchmark import Domain
    from tttlab.core.records import RunDir, load_records, write_domain_summary

    run = RunDir(tmp_path / "run")
    with run.writer(method="m", seed=0) as w:  # fog 50 %, snow 80 %, frost 90 % correct: all at severity 5
        totals = {Domain("fog", 5): (50, 100, 1.0), Domain("snow", 5): (80, 100, 1.0)}
        write_domain_summary(w, {**totals, Domain("frost", 5): (90, 100, 1.0)})
    df = load_records(run.path)
    assert (df["corruption"] == "mean").sum() == 1  # the summary is there, with severity 5
    e = M.domain_errors(df)
    assert e == {
        "fog": {5: pytest.approx(0.5)},
        "frost": {5: pytest.approx(0.1)},
        "snow": {5: pytest.approx(0.2)},
    }
    # AlexNet's severity-5 errors: fog 0.94500, frost 0.93430, snow 0.94952
    assert M.mce(e) == pytest.approx((0.5 / 0.945 + 0.1 / 0.9343 + 0.2 / 0.94952) / 3)
    assert M.mean_error({**e, "gaussian_noise": {5: 0.9}}) == pytest.approx((0.5 + 0.1 + 0.2 + 0.9) / 4)
    assert list(M.per_domain_error(df)["corruption"]) == ["fog", "frost", "snow"]
