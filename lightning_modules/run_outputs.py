"""The files every run writes, which the ensemble report, eval and users rely on.

``<run dir>/metrics.json``: final metrics (``seed``, ``val/acc_best``, ``test/acc``, ...).
``<run dir>/predictions/test.npz``: test-set predictions of the best checkpoint:
``probs`` (N, C) float32, ``targets`` (N,) int64, ``ids`` (N,) str (stable sample ids) and
``class_names`` (C,) str. Rows follow the data module's test order, which depends only on the
data and ``data.split_seed``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

METRICS_FILE = "metrics.json"
PREDICTIONS_DIR = "predictions"


def _atomic_write(path: Path, write) -> None:
    """Write to ``path.tmp`` then rename: a crash never leaves a half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _plain(value):
    """JSON-safe python value (tensors and numpy scalars to floats/ints, NaN to None)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_metrics(run_dir: str | Path, metrics: dict) -> Path:
    path = Path(run_dir) / METRICS_FILE
    text = json.dumps(_plain(metrics), indent=2, sort_keys=True) + "\n"
    _atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def read_metrics(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())


def save_predictions(
    run_dir: str | Path,
    split: str,
    *,
    probs: np.ndarray,
    targets: np.ndarray,
    ids: list[str],
    class_names: list[str],
) -> Path:
    probs = np.asarray(probs, dtype=np.float32)
    if probs.shape != (len(targets), len(class_names)) or len(ids) != len(targets):
        raise ValueError(
            f"predictions of shape {probs.shape} do not match {len(targets)} targets, "
            f"{len(ids)} ids and {len(class_names)} classes"
        )
    path = Path(run_dir) / PREDICTIONS_DIR / f"{split}.npz"

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to the name
            np.savez_compressed(
                fh,
                probs=probs,
                targets=np.asarray(targets, dtype=np.int64),
                ids=np.asarray(ids, dtype=str),
                class_names=np.asarray(class_names, dtype=str),
            )

    _atomic_write(path, write)
    return path


def save_regression_predictions(
    run_dir: str | Path, split: str, *, preds: np.ndarray, targets: np.ndarray, ids: list[str]
) -> Path:
    """``predictions/<split>.npz`` of a regression task: ``preds``, ``targets`` (N) and ``ids``."""
    preds = np.asarray(preds, dtype=np.float32).reshape(-1)
    if len(preds) != len(targets) or len(ids) != len(targets):
        raise ValueError(
            f"{len(preds)} predictions do not match {len(targets)} targets and {len(ids)} ids"
        )
    path = Path(run_dir) / PREDICTIONS_DIR / f"{split}.npz"

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh,
                preds=preds,
                targets=np.asarray(targets, dtype=np.float32),
                ids=np.asarray(ids, dtype=str),
            )

    _atomic_write(path, write)
    return path


def load_predictions(run_dir: str | Path, split: str = "test") -> dict[str, np.ndarray]:
    """The arrays of ``predictions/<split>.npz`` (no pickled objects are ever loaded)."""
    path = Path(run_dir) / PREDICTIONS_DIR / f"{split}.npz"
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
