"""Classification metrics of predicted probabilities, in NumPy: for saved predictions and ensembles.

All functions take ``probs`` (N, C), rows summing to 1, and integer ``targets`` (N,):

- accuracy: share of samples whose most probable class (the first, on ties) is the target.
- NLL: mean over samples of ``-log p[target]``; probabilities are floored at the smallest normal
  float32 (NLL at most ~87.3 per sample) because saved probabilities are float32.
- ECE: expected calibration error with 15 equal-width confidence bins and the L1 norm (Guo et al.
  2017), binned exactly as ``torchmetrics`` does: bin ``k`` holds confidences in
  ``[k/15, (k+1)/15)`` and a confidence of exactly 1 gets a bin of its own. So an ECE computed
  here from a run's saved predictions equals the ``test/ece`` the run logged.
- Brier score: mean over samples of the sum over classes of ``(p_k - t_k)**2`` with ``t`` the
  one-hot target; 0 is perfect, 2 the worst possible.
- disagreement: share of samples on which two models predict different classes.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017
# float32 has nothing smaller (normal): saved probabilities of 0 would give an infinite NLL
PROB_FLOOR = float(np.finfo(np.float32).tiny)


def _check(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if probs.ndim != 2 or targets.shape != (probs.shape[0],):
        raise ValueError(f"probs {probs.shape} and targets {targets.shape} do not match")
    return probs, targets


def accuracy(probs: np.ndarray, targets: np.ndarray) -> float:
    probs, targets = _check(probs, targets)
    return float((probs.argmax(1) == targets).mean())


def top_k_accuracy(probs: np.ndarray, targets: np.ndarray, k: int = 5) -> float:
    """Share of samples whose target is among the ``k`` most probable classes."""
    probs, targets = _check(probs, targets)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == targets[:, None]).any(1).mean())


def nll(probs: np.ndarray, targets: np.ndarray) -> float:
    probs, targets = _check(probs, targets)
    p = probs[np.arange(len(targets)), targets]
    return float(-np.log(np.maximum(p, PROB_FLOOR)).mean())


def brier(probs: np.ndarray, targets: np.ndarray) -> float:
    probs, targets = _check(probs, targets)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(targets)), targets] = 1.0
    return float(((probs - onehot) ** 2).sum(1).mean())


def reliability(
    probs: np.ndarray, targets: np.ndarray, n_bins: int = ECE_BINS
) -> dict[str, np.ndarray]:
    """Per confidence bin: ``count``, mean ``confidence`` and ``accuracy`` (NaN when empty).

    ``n_bins + 1`` bins: ``n_bins`` equal-width ones and the last for confidences of exactly 1.
    """
    probs, targets = _check(probs, targets)
    confidence = probs.max(1)
    correct = (probs.argmax(1) == targets).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.searchsorted(edges, confidence, side="right") - 1
    count = np.bincount(index, minlength=n_bins + 1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=n_bins + 1) / count
        mean_acc = np.bincount(index, weights=correct, minlength=n_bins + 1) / count
    return {"count": count, "confidence": mean_conf, "accuracy": mean_acc, "edges": edges}


def ece(probs: np.ndarray, targets: np.ndarray, n_bins: int = ECE_BINS) -> float:
    bins = reliability(probs, targets, n_bins)
    filled = bins["count"] > 0
    weight = bins["count"][filled] / bins["count"].sum()
    gap = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((weight * gap).sum())


def disagreement(probs_a: np.ndarray, probs_b: np.ndarray) -> float:
    """Share of samples on which the two predictions (argmax) differ."""
    a, b = np.asarray(probs_a), np.asarray(probs_b)
    if a.shape != b.shape:
        raise ValueError(f"predictions of shapes {a.shape} and {b.shape} cannot be compared")
    return float((a.argmax(1) != b.argmax(1)).mean())


def pairwise_disagreement(probs: list[np.ndarray]) -> np.ndarray:
    """Symmetric (M, M) matrix of the disagreement of every pair of ``M`` predictions."""
    m = len(probs)
    out = np.zeros((m, m))
    for i in range(m):
        for j in range(i + 1, m):
            out[i, j] = out[j, i] = disagreement(probs[i], probs[j])
    return out


def summarize(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """``acc``, ``nll``, ``ece`` and ``brier`` (plus ``acc_top5`` with more than 5 classes)."""
    out = {
        "acc": accuracy(probs, targets),
        "nll": nll(probs, targets),
        "ece": ece(probs, targets),
        "brier": brier(probs, targets),
    }
    if np.asarray(probs).shape[1] > 5:
        out["acc_top5"] = top_k_accuracy(probs, targets, 5)
    return out
