"""Metrics on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from tttlab.core import metrics as M
from tttlab.core.errors import InvalidInputError


def test_accuracy_topk():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25]])
    y = np.array([1, 1, 2, 2])
    assert M.accuracy(scores, y) == 0.5 and M.error(scores, y) == 0.5
    assert M.accuracy(np.array([1, 0, 2, 0]), y) == 0.5
    assert M.topk_accuracy(scores, y, k=2) == 0.75  # sample 4 has label 2 in 3rd place
    assert M.topk_accuracy(scores, y, k=3) == 1.0


def test_ece_hand_values():
    # perfectly calibrated: confidence 0.8 on 10 samples of which 8 are right
    p = np.tile([[0.8, 0.2]], (10, 1))
    y = np.array([0] * 8 + [1] * 2)
    assert M.expected_calibration_error(p, y, n_bins=10) == pytest.approx(0.0, abs=1e-12)
    # overconfident: confidence 0.9, accuracy 0.5 -> ECE 0.4
    p = np.tile([[0.9, 0.1]], (4, 1))
    y = np.array([0, 0, 1, 1])
    assert M.expected_calibration_error(p, y) == pytest.approx(0.4)
    # two bins: 0.6 (all right) and 0.95 (half right): (2/4)*0.4 + (2/4)*0.45
    p = np.array([[0.6, 0.4], [0.6, 0.4], [0.95, 0.05], [0.95, 0.05]])
    y = np.array([0, 0, 0, 1])
    assert M.ece(p, y) == pytest.approx(0.5 * 0.4 + 0.5 * 0.45)


def test_mce_of_alexnet_is_100_percent():
    assert M.mce(M.ALEXNET_ERRORS) == pytest.approx(1.0)
    per_sev = {c: [e] * 5 for c, e in M.ALEXNET_ERRORS.items()}
    assert M.mce(per_sev) == pytest.approx(1.0)
    assert M.relative_mce(M.ALEXNET_ERRORS, M.ALEXNET_CLEAN_ERROR) == pytest.approx(1.0)


def test_relative_mce_hand_example():
    base = {"fog": 0.8, "snow": 0.6}
    errs = {"fog": [0.3, 0.5], "snow": 0.35}  # fog mean 0.4
    # CE: 0.4/0.8 = 0.5, 0.35/0.6; relative: (0.4-0.2)/(0.8-0.4)=0.5, (0.35-0.2)/(0.6-0.4)=0.75
    assert M.mce(errs, base) == pytest.approx((0.5 + 0.35 / 0.6) / 2)
    assert M.relative_mce(errs, 0.2, base, 0.4) == pytest.approx(0.625)
    assert M.mean_error(errs) == pytest.approx(0.375)


def test_bad_inputs():
    with pytest.raises(InvalidInputError, match="NaN"):
        M.accuracy(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(InvalidInputError, match="predictions for"):
        M.accuracy(np.array([0, 1]), np.array([0]))
    with pytest.raises(InvalidInputError, match="baseline"):
        M.mce({"not_a_corruption": 0.3})
    with pytest.raises(InvalidInputError, match="summing to 1"):
        M.ece(np.array([[2.0, 0.0]]), np.array([0]))
