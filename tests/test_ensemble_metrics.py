"""Metrics of probabilities and of their average, against hand computations and torchmetrics."""

import math

import numpy as np
import pytest

from lightning_modules import metrics as M
from tasks.ensemble import score_split

# Two members, four samples, three classes. Confidences are chosen away from the 15-bin edges
# (multiples of 1/15) so every bin below can be checked by hand.
A = np.array([[0.7, 0.2, 0.1], [0.15, 0.55, 0.3], [0.2, 0.15, 0.65], [0.5, 0.4, 0.1]])
B = np.array([[0.45, 0.3, 0.25], [0.2, 0.15, 0.65], [0.1, 0.05, 0.85], [0.3, 0.62, 0.08]])
T = np.array([0, 2, 2, 1])


def test_member_metrics_by_hand():
    # A predicts 0, 1, 2, 0: right on samples 0 and 2
    assert M.accuracy(A, T) == 0.5
    assert M.nll(A, T) == pytest.approx(-(math.log(0.7 * 0.3 * 0.65 * 0.4)) / 4)
    # Brier, per sample: .09+.04+.01, .0225+.3025+.49, .04+.0225+.1225, .25+.36+.01
    assert M.brier(A, T) == pytest.approx((0.14 + 0.815 + 0.185 + 0.62) / 4)
    # each confidence in a bin of its own (bins 10, 8, 9, 7): mean |correct - confidence|
    assert M.ece(A, T) == pytest.approx((0.3 + 0.55 + 0.35 + 0.5) / 4)
    # B is right everywhere; samples 1 and 3 (confidences .65, .62) share bin 9
    assert M.accuracy(B, T) == 1.0
    assert M.ece(B, T) == pytest.approx(0.25 * 0.55 + 0.5 * (1 - 0.635) + 0.25 * 0.15)
    assert M.brier(B, T) == pytest.approx((0.455 + 0.185 + 0.035 + 0.2408) / 4)
    assert M.disagreement(A, B) == 0.5  # predictions differ on samples 1 and 3


def test_ensemble_average_by_hand():
    s = score_split([A, B], T)
    # the average: [.575 .25 .175], [.175 .35 .475], [.15 .1 .75], [.4 .51 .09] -> all right
    ens = s["ensemble"]
    assert ens["acc"] == 1.0
    assert ens["nll"] == pytest.approx(-math.log(0.575 * 0.475 * 0.75 * 0.51) / 4)
    assert ens["brier"] == pytest.approx((0.27375 + 0.42875 + 0.095 + 0.4082) / 4)
    # bins: 8 (.575), 7 (.475 and .51), 11 (.75)
    assert ens["ece"] == pytest.approx(0.25 * 0.425 + 0.5 * (1 - 0.4925) + 0.25 * 0.25)
    assert s["mean"]["acc"] == 0.75
    assert s["std"]["acc"] == pytest.approx(0.5 / math.sqrt(2))  # ddof=1 over two members
    assert s["gain"]["acc"] == pytest.approx(0.25)
    assert s["gain"]["nll"] == pytest.approx(ens["nll"] - (M.nll(A, T) + M.nll(B, T)) / 2)
    assert s["disagreement"]["mean"] == 0.5
    assert s["disagreement"]["pairs"] == [[0.0, 0.5], [0.5, 0.0]]


def test_ece_and_accuracy_match_torchmetrics_exactly():
    import torch
    from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 7)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs[:20] = np.eye(7)[rng.integers(0, 7, 20)]  # confidence exactly 1: its own bin
    probs = probs.astype(np.float32)
    targets = rng.integers(0, 7, 500)
    p, t = torch.from_numpy(probs), torch.from_numpy(targets)
    expected = MulticlassCalibrationError(7, n_bins=15, norm="l1")(p, t).item()
    assert M.ece(probs, targets) == pytest.approx(expected, abs=1e-6)
    assert M.accuracy(probs, targets) == pytest.approx(
        MulticlassAccuracy(7, average="micro")(p, t).item()
    )
    # top-5 on the rows without ties (one-hot rows tie their zeros in any order)
    acc5 = MulticlassAccuracy(7, top_k=5, average="micro")(p[20:], t[20:]).item()
    assert M.top_k_accuracy(probs[20:], targets[20:], 5) == pytest.approx(acc5)


def test_nll_of_a_zero_probability_is_finite():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]], dtype=np.float32)
    value = M.nll(probs, np.array([1, 0]))
    assert math.isfinite(value) and value > 40  # floored at float32's smallest normal
