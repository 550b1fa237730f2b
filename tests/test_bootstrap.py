"""Bootstrap intervals: equal to the metrics on materialised resamples, cover a known accuracy at
their level, and pair two models so that a small real difference is told from none."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_modules import bootstrap as B
from lightning_modules import metrics as M

FUNCTIONS = {"acc": M.accuracy, "nll": M.nll, "ece": M.ece, "brier": M.brier}


def _awkward_probs(n: int = 90, classes: int = 4, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 predictions with the awkward cases: a confidence of exactly 1 (right and
    wrong), a probability of 0 on the target, ties, and confidences of 0.95 in the last regular bin
    (merged with the confidences of 1 they would give another ECE)."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(classes, 0.5), size=n)
    targets = rng.integers(0, classes, size=n)
    probs[:10] = np.eye(classes)[targets[:10]]  # confidence 1, right
    probs[10:20] = np.eye(classes)[(targets[10:20] + 1) % classes]  # confidence 1, p[target] = 0
    probs[20:25] = 1.0 / classes  # a tie: argmax is class 0
    near = np.full((10, classes), 0.05 / (classes - 1))
    near[np.arange(10), targets[30:40]] = 0.95  # confidence 0.95, right
    probs[30:40] = near
    return probs.astype(np.float32), targets


def _materialised(counts_row: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(counts_row)), counts_row)


def _two_class(correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A two-class "model" right exactly where ``correct`` is true (target 0 everywhere)."""
    p0 = np.where(correct, 0.7, 0.3)
    return np.column_stack([p0, 1.0 - p0]), np.zeros(len(correct), dtype=np.int64)


def test_metric_samples_equal_the_metrics_on_the_materialised_resamples():
    probs, targets = _awkward_probs()
    counts = B.resample_counts(len(targets), n_boot=100, seed=3)
    samples = B.metric_samples(probs, targets, counts)
    assert set(samples) == set(B.METRICS)
    assert all(s.shape == (100,) for s in samples.values())
    for b in range(20):
        index = _materialised(counts[b])
        for metric, fn in FUNCTIONS.items():
            expected = fn(probs[index], targets[index])
            assert samples[metric][b] == pytest.approx(expected, abs=1e-10), (metric, b)
    # the confidence-1 bin matters on this data: merged into bin 14 it would give another ECE
    conf = probs.astype(np.float64).max(1)
    gap = (probs.argmax(1) == targets) - conf
    top, one = (conf >= 14 / 15) & (conf < 1), conf == 1
    merged = abs(gap[top | one].sum())
    assert abs(gap[top].sum()) + abs(gap[one].sum()) - merged > 0.5  # ECE off by > 0.5 / n


def test_summarize_gives_the_full_set_values_inside_their_intervals():
    probs, targets = _awkward_probs(n=200)
    summary = B.summarize(probs, targets, B.resample_counts(200, n_boot=500))
    full = M.summarize(probs, targets)
    for metric in B.METRICS:
        assert summary[metric]["value"] == full[metric]
        assert summary[metric]["lo"] < summary[metric]["value"] < summary[metric]["hi"]


def test_the_95_interval_of_a_known_accuracy_covers_it_about_95_percent_of_the_time():
    n, p, reps = 400, 0.8, 300
    rng = np.random.default_rng(0)
    counts = B.resample_counts(n, n_boot=1000)  # one seed for all test sets, as a report uses
    covered = np.zeros(2)
    for _ in range(reps):
        probs, targets = _two_class(rng.random(n) < p)  # an independent test set
        acc = B.metric_samples(probs, targets, counts)["acc"]
        covered += [lo <= p <= hi for lo, hi in (B.interval(acc), B.interval(acc, 0.8))]
    assert 0.91 <= covered[0] / reps <= 0.98
    assert 0.72 <= covered[1] / reps <= 0.88  # the level is honoured, not only the default


def test_a_paired_difference_is_far_narrower_than_an_unpaired_one():
    n = 400
    rng = np.random.default_rng(5)
    right_a = rng.random(n) < 0.8
    right_b = right_a.copy()
    right_b[np.flatnonzero(right_a)[:8]] = False  # B = A but wrong on 8 of A's right images
    (pa, t), (pb, _) = _two_class(right_a), _two_class(right_b)
    counts = B.resample_counts(n, seed=0)
    a, b = B.metric_samples(pa, t, counts), B.metric_samples(pb, t, counts)
    paired = B.difference(a, b, M.summarize(pa, t), M.summarize(pb, t))["acc"]
    assert paired["value"] == pytest.approx(8 / n)
    assert paired["lo"] <= 8 / n <= paired["hi"]
    assert paired["distinguishable"]  # B is never better, and worse on 2% of the images

    b_apart = B.metric_samples(pb, t, B.resample_counts(n, seed=1))  # resampled independently
    unpaired = B.interval(a["acc"] - b_apart["acc"])
    combined = np.hypot(np.ptp(B.interval(a["acc"])), np.ptp(B.interval(b["acc"])))
    width = paired["hi"] - paired["lo"]
    assert width < (unpaired[1] - unpaired[0]) / 3
    assert width < combined / 3
    assert unpaired[0] < 0 < unpaired[1]  # unpaired, the same two models cannot be told apart


def test_the_paired_interval_contains_a_known_true_difference():
    # A right with probability 0.8; B wrong on each of A's right images with probability 0.1:
    # the true accuracy difference is 0.8 * 0.1 = 0.08
    n = 1000
    rng = np.random.default_rng(11)
    right_a = rng.random(n) < 0.8
    right_b = right_a & (rng.random(n) >= 0.1)
    (pa, t), (pb, _) = _two_class(right_a), _two_class(right_b)
    counts = B.resample_counts(n, seed=2)
    a, b = B.summarize(pa, t, counts), B.summarize(pb, t, counts)
    diff = B.difference(B.metric_samples(pa, t, counts), B.metric_samples(pb, t, counts), a, b)
    assert diff["acc"]["lo"] < 0.08 < diff["acc"]["hi"]
    assert diff["acc"]["distinguishable"] and diff["acc"]["hi"] < 0.12
    assert diff["nll"]["hi"] < 0 and diff["nll"]["distinguishable"]  # B's NLL is higher


def test_identical_models_are_not_distinguishable():
    probs, targets = _awkward_probs()
    samples = B.metric_samples(probs, targets, B.resample_counts(len(targets)))
    values = M.summarize(probs, targets)
    for metric, diff in B.difference(samples, samples, values, values).items():
        assert (diff["value"], diff["lo"], diff["hi"]) == (0.0, 0.0, 0.0), metric
        assert diff["distinguishable"] is False


def test_mean_samples_average_the_members_per_resample():
    probs, targets = _awkward_probs()
    members = [probs, np.roll(probs, 1, axis=1), np.roll(probs, 2, axis=1)]
    counts = B.resample_counts(len(targets), n_boot=200, seed=4)
    mean = B.mean_samples([B.metric_samples(p, targets, counts) for p in members])
    for b in range(5):
        index = _materialised(counts[b])
        for metric, fn in FUNCTIONS.items():
            expected = np.mean([fn(p[index], targets[index]) for p in members])
            assert mean[metric][b] == pytest.approx(expected, abs=1e-10)
    values = {m: np.mean([FUNCTIONS[m](p, targets) for p in members]) for m in B.METRICS}
    summary = B.summarize_samples(mean, values)
    assert all(s["lo"] <= s["hi"] for s in summary.values())


def test_resample_counts_are_seeded_draws_with_replacement():
    n = 50
    counts = B.resample_counts(n, n_boot=2000, seed=7)
    assert counts.shape == (2000, n) and np.issubdtype(counts.dtype, np.integer)
    assert (counts.sum(1) == n).all() and counts.min() >= 0
    np.testing.assert_array_equal(counts, B.resample_counts(n, n_boot=2000, seed=7))
    assert not np.array_equal(counts, B.resample_counts(n, n_boot=2000, seed=8))
    # draws with replacement: each count is Binomial(n, 1/n), mean 1 and variance 1 - 1/n
    assert np.abs(counts.mean(0) - 1).max() < 0.12
    assert counts.var() == pytest.approx(1 - 1 / n, rel=0.05)
    assert B.DEFAULT_RESAMPLES == 2000 and B.DEFAULT_LEVEL == 0.95
    assert B.resample_counts(n).shape == (B.DEFAULT_RESAMPLES, n)


def _bad_calls():
    probs, targets = _awkward_probs(n=60)
    counts = B.resample_counts(60, n_boot=100)
    samples = B.metric_samples(probs, targets, counts)
    values = M.summarize(probs, targets)
    short = {m: s[:50] for m, s in samples.items()}
    return {
        "n_boot < 100": lambda: B.resample_counts(20, n_boot=99),
        "no images": lambda: B.resample_counts(0),
        "n not an integer": lambda: B.resample_counts(2.5),
        "probs not 2-d": lambda: B.metric_samples(probs[:, 0], targets, counts),
        "targets too short": lambda: B.metric_samples(probs, targets[:-1], counts),
        "targets out of range": lambda: B.metric_samples(probs, targets + 4, counts),
        "float targets": lambda: B.metric_samples(probs, targets.astype(float), counts),
        "counts of other images": lambda: B.metric_samples(probs, targets, counts[:, :-1]),
        "negative counts": lambda: B.metric_samples(probs, targets, -counts),
        "float counts": lambda: B.metric_samples(probs, targets, counts * 1.0),
        "counts 1-d": lambda: B.metric_samples(probs, targets, counts[0]),
        "level 0": lambda: B.interval(samples["acc"], 0.0),
        "level 1": lambda: B.interval(samples["acc"], 1.0),
        "level 95": lambda: B.summarize(probs, targets, counts, level=95),
        "too few samples": lambda: B.interval(samples["acc"][:99]),
        "2-d samples": lambda: B.interval(np.stack([samples["acc"]] * 2)),
        "unpaired lengths": lambda: B.difference(samples, short, values, values),
        "other metrics": lambda: B.difference(samples, {"acc": samples["acc"]}, values, values),
        "difference level": lambda: B.difference(samples, samples, values, values, level=-0.1),
        "no members": lambda: B.mean_samples([]),
        "members of other lengths": lambda: B.mean_samples([samples, short]),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_input_is_a_clear_value_error(case):
    with pytest.raises(ValueError):
        _bad_calls()[case]()


def test_a_difference_of_rounding_error_is_not_distinguishable():
    """0.1 + 0.2 - 0.3 is 5.6e-17, not a real gain (a mean of accuracies vs an accuracy)."""
    a = {k: np.full(200, 0.1 + 0.2) for k in ("acc",)}
    b = {k: np.full(200, 0.3) for k in ("acc",)}
    out = B.difference(a, b, {"acc": 0.1 + 0.2}, {"acc": 0.3})
    assert out["acc"]["lo"] > 0 and out["acc"]["distinguishable"] is False
