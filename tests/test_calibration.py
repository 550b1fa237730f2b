"""Temperature scaling of saved probabilities: the fit is exact, recovers a known temperature,
never costs validation NLL and never changes a prediction."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from lightning_modules import metrics as M
from lightning_modules.calibration import (
    apply_temperature,
    calibration_summary,
    fit_temperature,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _case(seed: int, n: int, c: int, true_t: float, scale: float = 3.0):
    """float32 probabilities ``softmax(z)`` and labels drawn from ``softmax(z / true_t)``:
    the calibrating temperature is ``true_t`` (> 1: over-confident, < 1: under-confident)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, (n, c))
    truth = _softmax(z / true_t)
    labels = (truth.cumsum(1) > rng.random((n, 1))).argmax(1)
    return _softmax(z).astype(np.float32), labels


def _nll_at(probs, targets, t):
    return M.nll(apply_temperature(probs, t), targets)


@pytest.mark.parametrize("true_t", [0.5, 2.0])
def test_recovers_a_known_temperature(true_t):
    probs, labels = _case(0, 20000, 10, true_t)
    assert fit_temperature(probs, labels) == pytest.approx(true_t, rel=0.03)


def test_agrees_with_scipy():
    probs, labels = _case(1, 3000, 7, 1.6, scale=2.0)
    ref = minimize_scalar(
        lambda t: _nll_at(probs, labels, t),
        bounds=(0.05, 20.0),
        method="bounded",
        options={"xatol": 1e-12, "maxiter": 500},
    )
    assert ref.success
    fitted = fit_temperature(probs, labels)
    assert fitted == pytest.approx(ref.x, rel=1e-5)
    assert _nll_at(probs, labels, fitted) <= ref.fun + 1e-12


@pytest.mark.parametrize("t", [0.05, 0.3, 1.0, 2.5, 40.0])
def test_never_changes_a_prediction(t):
    probs, labels = _case(2, 2000, 10, 1.0)
    scaled = apply_temperature(probs, t)
    # no ties in continuous random probabilities, so argmax is unambiguous
    np.testing.assert_array_equal(scaled.argmax(1), probs.argmax(1))
    assert M.accuracy(scaled, labels) == M.accuracy(probs, labels)


@pytest.mark.parametrize(
    ("seed", "true_t", "classes"),
    [(3, 0.4, 5), (4, 0.8, 10), (5, 1.0, 3), (6, 1.5, 10), (7, 3.0, 20)],
)
def test_fit_never_loses_to_another_temperature(seed, true_t, classes):
    probs, labels = _case(seed, 1500, classes, true_t)
    fitted = fit_temperature(probs, labels)
    best = _nll_at(probs, labels, fitted)
    for t in [1.0, *np.geomspace(0.02, 50.0, 41), fitted * 0.99, fitted * 1.01]:
        assert best <= _nll_at(probs, labels, t) + 1e-12, t
    # over-confident (true_t > 1) softens, under-confident sharpens
    assert (fitted > 1.0) == (true_t > 1.0) or true_t == 1.0
    s = calibration_summary(probs, labels, probs, labels)
    assert s["temperature"] == fitted
    assert s["val_nll_after"] <= s["val_nll_before"] + 1e-12
    assert s["test"]["after"]["acc"] == s["test"]["before"]["acc"]
    assert s["test"]["after"]["nll"] == pytest.approx(s["val_nll_after"])
    assert s["test"]["before"] == M.summarize(probs, labels)


def test_temperature_one_is_the_identity():
    probs, _ = _case(8, 500, 6, 1.0)
    out = apply_temperature(probs, 1.0)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, probs, rtol=1e-6, atol=1e-12)
    for t in (0.1, 1.0, 7.0):
        np.testing.assert_allclose(apply_temperature(probs, t).sum(1), 1.0, rtol=1e-12)
    # zeros are floored, not turned into NaN, and rows stay normalised
    out = apply_temperature(np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]), 0.5)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out.sum(1), 1.0)


@pytest.mark.parametrize("confidence", [1.0, 1.0 - 1e-6])
def test_all_right_and_confident_gives_the_lower_bound(confidence):
    probs = np.full((50, 4), (1.0 - confidence) / 3, dtype=np.float32)
    labels = np.arange(50) % 4
    probs[np.arange(50), labels] = confidence
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        assert fit_temperature(probs, labels) == 0.01
        assert fit_temperature(probs, labels, bounds=(0.2, 5.0)) == 0.2


def test_all_wrong_gives_the_upper_bound_and_flat_gives_one():
    probs = np.tile(np.array([[0.9, 0.05, 0.05]]), (30, 1))
    assert fit_temperature(probs, np.full(30, 1)) == 100.0  # worse the sharper: uniform is best
    uniform = np.full((30, 3), 1 / 3)
    assert fit_temperature(uniform, np.arange(30) % 3) == 1.0  # NLL does not depend on T


@pytest.mark.parametrize(
    ("probs", "targets"),
    [
        (np.full(5, 0.2), np.zeros(5, dtype=int)),  # 1-D probabilities
        (np.full((5, 3), 1 / 3), np.zeros(4, dtype=int)),  # one target short
        (np.full((5, 3), 1 / 3), np.zeros((5, 1), dtype=int)),  # targets 2-D
        (np.full((5, 3), 1 / 3), np.full(5, 3)),  # class index out of range
        (np.full((5, 3), 1 / 3), np.zeros(5)),  # float targets
        (np.zeros((0, 3)), np.zeros(0, dtype=int)),  # no samples
    ],
)
def test_bad_shapes_raise(probs, targets):
    with pytest.raises(ValueError):
        fit_temperature(probs, targets)
    with pytest.raises(ValueError):
        calibration_summary(probs, targets, np.full((2, 3), 1 / 3), np.zeros(2, dtype=int))


def test_bad_arguments_raise():
    probs, labels = np.full((4, 3), 1 / 3), np.zeros(4, dtype=int)
    with pytest.raises(ValueError, match="classes"):
        calibration_summary(probs, labels, np.full((4, 2), 0.5), labels)
    with pytest.raises(ValueError):
        apply_temperature(probs[0], 1.0)
    for t in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError):
            apply_temperature(probs, t)
    with pytest.raises(ValueError):
        fit_temperature(probs, labels, bounds=(2.0, 1.0))
    with pytest.raises(ValueError):
        fit_temperature(np.full((4, 3), np.nan), labels)
