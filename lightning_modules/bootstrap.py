"""Bootstrap intervals of the test metrics, in NumPy: seeded, vectorised and paired between models.

A test set is one sample of images: on another, accuracy, NLL, ECE and Brier score (as
``metrics`` computes them) would differ. The bootstrap draws the ``n`` test images again with
replacement, ``n_boot`` times, and recomputes every metric on every resample:

- ``resample_counts``: the resamples, drawn once as an ``(n_boot, n)`` matrix of how often each
  image appears in each. Use the SAME matrix for every model of a report: each model is then
  scored on the same resampled test sets, so a difference between two models is *paired* (which
  images happened to be drawn cancels out; only where the models differ counts) and its interval
  is much narrower than one from independent resamples when the models mostly agree.
- ``metric_samples``: the four metrics on every resample at once, from per-image values. Accuracy,
  NLL and Brier are weighted means, ``counts @ values / n``. ECE with the bins of ``metrics.ece``
  (the extra bin for a confidence of exactly 1 included) is ``sum_k |correct_k - confidence_k| / n``
  with per-bin sums ``counts @ (onehot(bin) * value)``. Each equals the ``metrics`` function on the
  materialised resample (up to float rounding).
- ``interval``: the percentile interval of such samples; ``summarize``: per metric the value on the
  full test set and its interval; ``difference``: the paired difference of two models, and whether
  its interval excludes 0; ``mean_samples``: the average over models per resample (the "mean
  member" of an ensemble), with ``summarize_samples`` for its intervals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lightning_modules.metrics import ECE_BINS, PROB_FLOOR, accuracy, brier, ece, nll

METRICS = ("acc", "nll", "ece", "brier")
DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95
# a difference this close to 0 is 0: means of the same counts in another order round differently
ROUNDING = 1e-12
MIN_RESAMPLES = 100  # fewer give percentile intervals too rough to report
_CHUNK = 512  # resamples per matrix product: bounds the float copy of counts on large test sets


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"the interval level must lie strictly between 0 and 1, not {level}")
    return float(level)


def _check_n_boot(n_boot: int) -> None:
    if n_boot < MIN_RESAMPLES:
        raise ValueError(f"{n_boot} resamples are too few for an interval: use {MIN_RESAMPLES}+")


def resample_counts(n: int, *, n_boot: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """``(n_boot, n)`` int: how often each of ``n`` images appears in each resample (rows sum to n).

    Row ``b`` is the bincount of ``n`` indices drawn with replacement, seeded by ``seed``.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"the number of test images must be a positive integer, not {n!r}")
    _check_n_boot(n_boot)
    drawn = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    drawn += np.arange(n_boot)[:, None] * n  # resample b counts into cells b*n .. b*n + n-1
    return np.bincount(drawn.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.int64)


def _per_image(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``(n, 3 + bins)``: correct, NLL, Brier, then ``correct - confidence`` in the image's bin."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    if probs.ndim != 2 or targets.shape != (probs.shape[0],) or probs.shape[0] == 0:
        raise ValueError(f"probs {probs.shape} and targets {targets.shape} do not match")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be class indices (integers), not {targets.dtype}")
    if targets.min() < 0 or targets.max() >= probs.shape[1]:
        raise ValueError(
            f"targets must lie in [0, {probs.shape[1]}), not in {targets.min()}..{targets.max()}"
        )
    rows = np.arange(len(targets))
    confidence = probs.max(1)
    correct = (probs.argmax(1) == targets).astype(np.float64)
    onehot = np.zeros_like(probs)
    onehot[rows, targets] = 1.0
    image_nll = -np.log(np.maximum(probs[rows, targets], PROB_FLOOR))
    image_brier = ((probs - onehot) ** 2).sum(1)
    # the binning of metrics.reliability, so a confidence of exactly 1 gets a bin of its own
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    index = np.searchsorted(edges, confidence, side="right") - 1
    gap = np.zeros((len(targets), max(ECE_BINS + 1, int(index.max()) + 1)))
    gap[rows, index] = correct - confidence
    return np.column_stack([correct, image_nll, image_brier, gap])


def metric_samples(
    probs: np.ndarray, targets: np.ndarray, counts: np.ndarray
) -> dict[str, np.ndarray]:
    """``acc``, ``nll``, ``ece``, ``brier`` on every resample of ``counts``: each ``(n_boot,)``."""
    values = _per_image(probs, targets)
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != len(values):
        raise ValueError(f"counts {counts.shape} do not resample {len(values)} test images")
    if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise ValueError("counts must be non-negative integers (see resample_counts)")
    total = counts.sum(1).astype(np.float64)
    if (total == 0).any():
        raise ValueError("every resample must hold at least one image")
    sums = np.concatenate(
        [
            counts[start : start + _CHUNK].astype(np.float64) @ values
            for start in range(0, len(counts), _CHUNK)
        ]
    )
    return {
        "acc": sums[:, 0] / total,
        "nll": sums[:, 1] / total,
        "ece": np.abs(sums[:, 3:]).sum(1) / total,
        "brier": sums[:, 2] / total,
    }


def interval(samples: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The percentile interval: the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles."""
    level = _check_level(level)
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 1:
        raise ValueError(f"bootstrap samples must be one-dimensional, not of shape {samples.shape}")
    _check_n_boot(len(samples))
    lo, hi = np.quantile(samples, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def _value(value: float | Mapping[str, float]) -> float:
    """A point estimate, given as a number or as an entry of ``summarize``'s result."""
    return float(value["value"]) if isinstance(value, Mapping) else float(value)


def _check_paired(samples_a: Mapping, samples_b: Mapping) -> None:
    if set(samples_a) != set(samples_b):
        raise ValueError(f"metrics {sorted(samples_a)} and {sorted(samples_b)} differ")
    for metric in samples_a:
        a, b = np.shape(samples_a[metric]), np.shape(samples_b[metric])
        if a != b:
            raise ValueError(f"{metric}: samples of shapes {a} and {b} cannot be paired")


def summarize_samples(
    samples: Mapping[str, np.ndarray],
    values: Mapping[str, float],
    *,
    level: float = DEFAULT_LEVEL,
) -> dict[str, dict[str, float]]:
    """Per metric of ``samples``: ``value`` (from ``values``) with its interval ``lo``, ``hi``."""
    level = _check_level(level)
    out = {}
    for metric, draws in samples.items():
        lo, hi = interval(draws, level)
        out[metric] = {"value": _value(values[metric]), "lo": lo, "hi": hi}
    return out


def summarize(
    probs: np.ndarray, targets: np.ndarray, counts: np.ndarray, *, level: float = DEFAULT_LEVEL
) -> dict[str, dict[str, float]]:
    """Per metric: ``value`` on the full test set, and ``lo``, ``hi`` of its bootstrap interval."""
    level = _check_level(level)
    samples = metric_samples(probs, targets, counts)
    values = {
        "acc": accuracy(probs, targets),
        "nll": nll(probs, targets),
        "ece": ece(probs, targets),
        "brier": brier(probs, targets),
    }
    return summarize_samples(samples, values, level=level)


def difference(
    samples_a: Mapping[str, np.ndarray],
    samples_b: Mapping[str, np.ndarray],
    value_a: Mapping[str, float],
    value_b: Mapping[str, float],
    *,
    level: float = DEFAULT_LEVEL,
) -> dict[str, dict[str, float | bool]]:
    """Per metric, the paired difference a - b: ``value``, ``lo``, ``hi``, ``distinguishable``.

    Both sample sets must come from the same ``counts``; nothing here can check that. The values
    are numbers or ``summarize`` entries. ``distinguishable``: the interval excludes 0 (two
    identical models give ``lo == hi == 0``, not distinguishable).
    """
    level = _check_level(level)
    _check_paired(samples_a, samples_b)
    out = {}
    for metric in samples_a:
        diff = np.asarray(samples_a[metric], np.float64) - np.asarray(samples_b[metric], np.float64)
        lo, hi = interval(diff, level)
        out[metric] = {
            "value": _value(value_a[metric]) - _value(value_b[metric]),
            "lo": lo,
            "hi": hi,
            "distinguishable": bool(lo > ROUNDING or hi < -ROUNDING),
        }
    return out


def mean_samples(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per metric and resample, the mean over models (all scored on the same ``counts``)."""
    if len(samples) == 0:
        raise ValueError("no sample sets to average")
    for other in samples[1:]:
        _check_paired(samples[0], other)
    return {
        metric: np.mean([np.asarray(s[metric], np.float64) for s in samples], axis=0)
        for metric in samples[0]
    }
