"""The files every run writes, which the ensemble report, eval and users rely on.

``<run dir>/metrics.json``: final metrics (``seed``, ``val/acc_best``, ``test/acc``, ...).
``<run dir>/predictions/test.npz``: test-set predictions of the best checkpoint:
``probs`` (N, C) float32, ``targets`` (N,) int64, ``ids`` (N,) str (stable sample ids) and
``class_names`` (C,) str. Rows follow the data module's test order, which depends only on the
data and ``data.split_seed``. ``predictions/test_tta.npz``: the same with test-time augmentation.
``predictions/val.npz`` (``val_tta.npz``): the same for the validation images (training runs),
on which temperatures are fitted (``checkpoints/best.calibration.json``) and soups chosen.
``<run dir>/failed.json``: written instead of the above by a job of a multirun that failed
(``error``, ``message``, ``traceback``), so the rest of the sweep can go on and be reported.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

METRICS_FILE = "metrics.json"
PREDICTIONS_DIR = "predictions"
FAILED_FILE = "failed.json"


def atomic_write(path: Path, write) -> None:
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


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (never half-written)."""
    path = Path(path)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def write_json(path: str | Path, data, *, sort_keys: bool = False) -> Path:
    """Write JSON atomically: tensors/NumPy scalars as numbers, NaN and inf as null."""
    return write_text(path, json.dumps(_plain(data), indent=2, sort_keys=sort_keys) + "\n")


def write_metrics(run_dir: str | Path, metrics: dict) -> Path:
    return write_json(Path(run_dir) / METRICS_FILE, metrics, sort_keys=True)


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

    atomic_write(path, write)
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

    atomic_write(path, write)
    return path


def load_predictions(run_dir: str | Path, split: str = "test") -> dict[str, np.ndarray]:
    """The arrays of ``predictions/<split>.npz`` (no pickled objects are ever loaded)."""
    path = Path(run_dir) / PREDICTIONS_DIR / f"{split}.npz"
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def save_test_outputs(
    run_dir: str | Path, split: str, outputs: dict, *, ids: list[str], class_names: list[str]
) -> Path:
    """Save a module's test outputs (``probs``, ``targets``, ``rows``: arrays or CPU tensors).

    ``ids`` are the split's sample ids in data order; ``rows`` index them.
    """
    rows = np.asarray(outputs["rows"]).tolist()
    return save_predictions(
        run_dir,
        split,
        probs=np.asarray(outputs["probs"]),
        targets=np.asarray(outputs["targets"]),
        ids=[ids[r] for r in rows],
        class_names=class_names,
    )


def has_predictions(run_dir: str | Path, split: str = "test") -> bool:
    return (Path(run_dir) / PREDICTIONS_DIR / f"{split}.npz").is_file()


def write_failure(run_dir: str | Path, error: BaseException, *, traceback_text: str = "") -> Path:
    """Mark a run as failed: ``failed.json`` with the error's type, message and traceback."""
    info = {"error": type(error).__name__, "message": str(error), "traceback": traceback_text}
    return write_json(Path(run_dir) / FAILED_FILE, info)


def read_failure(run_dir: str | Path) -> dict | None:
    """The failure recorded by :func:`write_failure`, or None when the run did not fail."""
    path = Path(run_dir) / FAILED_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def list_runs(path: str | Path) -> list[Path]:
    """The run directories at or directly below ``path`` (those with a ``.hydra/config.yaml``).

    A sweep directory gives its jobs in job order (``0``, ``1``, ..., ``10``); a run directory
    gives itself.
    """
    path = Path(path)
    if (path / ".hydra" / "config.yaml").is_file():
        return [path]
    if not path.is_dir():
        return []
    runs = [p for p in path.iterdir() if (p / ".hydra" / "config.yaml").is_file()]
    return sorted(
        runs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)
    )


def save_test_results(out_dir: Path, metrics: dict, *, datamodule, model, tta=None) -> None:
    """Write ``predictions/test.npz`` (and ``test_tta.npz`` from the TTA callback ``tta``); add
    ``test/brier`` (and ``tta``, its mode) to ``metrics``."""
    from lightning_modules.metrics import brier

    ids, names = datamodule.ids("test"), datamodule.class_names
    outputs = model.test_outputs
    save_test_outputs(out_dir, "test", outputs, ids=ids, class_names=names)
    metrics["test/brier"] = brier(outputs["probs"].numpy(), outputs["targets"].numpy())
    if tta is not None and tta.outputs is not None:
        save_test_outputs(out_dir, "test_tta", tta.outputs, ids=ids, class_names=names)
        metrics["tta"] = tta.tta.mode


def save_val_results(out_dir: Path, *, datamodule, model, tta=None, forward_context=None) -> None:
    """Write ``predictions/val.npz`` (and ``val_tta.npz`` with ``tta``, a
    :class:`~lightning_modules.tta.TestTimeAugmentation`): every validation image, predicted by
    ``model`` as it is now (the best checkpoint, after testing). Temperatures are fitted and
    soups chosen on these, never on test predictions."""
    from lightning_modules.predictions import predict_split

    ids, names = datamodule.ids("val"), datamodule.class_names
    views = {"val": None} if tta is None or not tta.enabled else {"val": None, "val_tta": tta}
    for split, views_tta in views.items():
        outputs = predict_split(
            model, datamodule, "val", tta=views_tta, forward_context=forward_context
        )
        save_test_outputs(out_dir, split, outputs, ids=ids, class_names=names)
