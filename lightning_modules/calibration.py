"""Post-hoc temperature scaling (Guo et al. 2017) of saved probabilities, in NumPy.

Temperature scaling divides a model's logits by one scalar ``T`` fitted on held-out data to
minimise the NLL: ``T > 1`` softens over-confident predictions, ``T < 1`` sharpens
under-confident ones. The argmax, hence accuracy, never changes.

- Runs save softmax probabilities (float32), not logits. ``log p`` equals the logits up to a
  constant per row, which softmax ignores, so ``softmax(log(p) / T)`` is exactly temperature
  scaling the logits. Probabilities are floored at ``metrics.PROB_FLOOR`` (the smallest normal
  float32) before the log, as ``metrics.nll`` does, and everything is computed in float64.
- The fit is exact, not a grid: in ``beta = 1/T`` the mean NLL
  ``f(beta) = mean(logsumexp(beta * s) - beta * s_y)`` (``s = log p``, ``y`` the target) is
  convex, with ``f'(beta) = mean(E_beta[s] - s_y)`` and ``f''(beta) = mean(Var_beta[s]) >= 0``
  under ``p_beta = softmax(beta * s)``. So ``f'`` is monotone: Newton steps, kept inside a
  bisection bracket on the sign of ``f'``, find its root to a relative ``tol`` in ``beta``.
- ``T`` is searched within ``bounds``. When the minimum lies outside them the nearest bound is
  returned, silently (the caller reports it): e.g. every validation sample right with confidence
  ~1 makes the NLL keep falling as ``T -> 0``, so the lower bound comes back. When the NLL does
  not depend on ``T`` at all (``f' = 0`` throughout, e.g. uniform probabilities), ``T = 1``
  (clipped into ``bounds``) comes back.

A run's fitted temperatures are stored next to its best checkpoint
(``checkpoints/best.calibration.json``, :func:`calibrate_run`), for ``calibrate=true`` in
``task=eval`` and ``task=predict`` (:func:`stored_temperature`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lightning_modules import metrics

log = logging.getLogger(__name__)

MAX_STEPS = 200  # bisection alone halves a bracket of width 100 to 1e-8 relative in ~40


def _check(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"probs must be a non-empty (N, C) array, got shape {probs.shape}")
    if targets.shape != (probs.shape[0],):
        raise ValueError(f"probs {probs.shape} and targets {targets.shape} do not match")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if targets.min() < 0 or targets.max() >= probs.shape[1]:
        raise ValueError(f"targets must lie in [0, {probs.shape[1]}) for {probs.shape[1]} classes")
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or infinite values")
    return probs, targets.astype(np.int64)


def _log_probs(probs: np.ndarray) -> np.ndarray:
    """``log p`` (floored), shifted so each row's maximum is 0: logits up to a row constant."""
    s = np.log(np.maximum(probs, metrics.PROB_FLOOR))
    return s - s.max(axis=1, keepdims=True)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _derivatives(s: np.ndarray, s_y: np.ndarray, beta: float) -> tuple[float, float]:
    """``f'(beta)`` and ``f''(beta)`` of the mean NLL of ``softmax(beta * s)``."""
    q = _softmax(beta * s)
    mean = (q * s).sum(axis=1)
    var = (q * (s - mean[:, None]) ** 2).sum(axis=1)
    return float((mean - s_y).mean()), float(var.mean())


def fit_temperature(
    probs: np.ndarray,
    targets: np.ndarray,
    *,
    tol: float = 1e-8,
    bounds: tuple[float, float] = (0.01, 100.0),
) -> float:
    """The ``T`` in ``bounds`` minimising the mean NLL of ``softmax(log(probs) / T)``.

    Exact to a relative ``tol`` in ``1/T``; a bound when the minimum lies beyond it (see the
    module docstring). ``probs`` (N, C) are probabilities, ``targets`` (N,) class indices.
    """
    probs, targets = _check(probs, targets)
    t_lo, t_hi = (float(b) for b in bounds)
    if not 0.0 < t_lo < t_hi < np.inf:
        raise ValueError(f"bounds must satisfy 0 < low < high < inf, got {bounds}")
    if not tol > 0.0:
        raise ValueError(f"tol must be positive, got {tol}")
    s = _log_probs(probs)
    s_y = s[np.arange(len(targets)), targets]
    lo, hi = 1.0 / t_hi, 1.0 / t_lo  # the bracket, in beta = 1/T
    g_lo, _ = _derivatives(s, s_y, lo)
    g_hi, _ = _derivatives(s, s_y, hi)
    if g_lo >= 0.0 and g_hi <= 0.0:  # f' monotone, so f' = 0 throughout: the NLL ignores T
        return float(np.clip(1.0, t_lo, t_hi))
    if g_lo >= 0.0:  # NLL rises from the smallest beta on: the minimum lies at T >= t_hi
        return t_hi
    if g_hi <= 0.0:  # NLL still falls at the largest beta: the minimum lies at T <= t_lo
        return t_lo
    beta = float(np.clip(1.0, lo, hi))
    for _ in range(MAX_STEPS):
        grad, curv = _derivatives(s, s_y, beta)
        if grad == 0.0:
            break
        if grad < 0.0:
            lo = beta
        else:
            hi = beta
        step = beta - grad / curv if curv > 0.0 else np.nan
        new = step if lo < step < hi else 0.5 * (lo + hi)  # Newton, else bisect the bracket
        converged = abs(new - beta) < tol * new
        beta = new
        if converged or hi - lo < tol * beta:
            break
    return float(1.0 / beta)


BOUNDS = (0.01, 100.0)  # the temperatures searched; a fit that ends on one has no minimum inside


def usable_temperature(probs: np.ndarray, targets: np.ndarray) -> tuple[float | None, str | None]:
    """``(T, None)`` when the validation NLL has its minimum inside :data:`BOUNDS`, else
    ``(None, why)``: a temperature that ends on a bound is not a fit but a direction. Typically
    every validation image is right, the NLL keeps falling as ``T -> 0``, and that temperature
    would make every test error certain (an infinite NLL): refused, never applied."""
    temperature = fit_temperature(probs, targets, bounds=BOUNDS)
    if temperature <= BOUNDS[0] * (1 + 1e-9):
        errors = int((np.asarray(probs).argmax(1) != np.asarray(targets)).sum())
        return None, (
            f"no temperature: the validation NLL keeps falling as T -> 0 ({errors} of "
            f"{len(targets)} validation images wrong); use a larger validation set"
        )
    if temperature >= BOUNDS[1] * (1 - 1e-9):
        return (
            None,
            "no temperature: the validation NLL keeps falling as T grows (chance-level predictions)",
        )
    return temperature, None


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / temperature)`` in float64, rows summing to 1.

    ``temperature = 1`` gives back ``probs`` floored at ``metrics.PROB_FLOOR`` and renormalised.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise ValueError(f"probs must be an (N, C) array, got shape {probs.shape}")
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or infinite values")
    temperature = float(temperature)
    if not 0.0 < temperature < np.inf:
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return _softmax(_log_probs(probs) / temperature)


def calibration_summary(
    val_probs: np.ndarray,
    val_targets: np.ndarray,
    test_probs: np.ndarray,
    test_targets: np.ndarray,
) -> dict:
    """Fit ``T`` on validation, apply it to test: ``temperature``, the validation NLL before and
    after, and ``test`` ``{"before": ..., "after": ...}`` as ``metrics.summarize`` gives them."""
    val_probs, val_targets = _check(val_probs, val_targets)
    test_probs, test_targets = _check(test_probs, test_targets)
    if val_probs.shape[1] != test_probs.shape[1]:
        raise ValueError(
            f"validation has {val_probs.shape[1]} classes but test has {test_probs.shape[1]}"
        )
    temperature, reason = usable_temperature(val_probs, val_targets)
    before = metrics.summarize(test_probs, test_targets)
    if temperature is None:  # refused: no minimum inside the bounds
        val_nll = metrics.nll(val_probs, val_targets)
        return {
            "temperature": None,
            "reason": reason,
            "val_nll_before": val_nll,
            "val_nll_after": None,
            "test": {"before": before, "after": None},
        }
    return {
        "temperature": temperature,
        "val_nll_before": metrics.nll(val_probs, val_targets),
        "val_nll_after": metrics.nll(apply_temperature(val_probs, temperature), val_targets),
        "test": {
            "before": before,
            "after": metrics.summarize(apply_temperature(test_probs, temperature), test_targets),
        },
    }


# ---------------------------------------------------------------------------- stored temperatures
# A checkpoint's fitted temperatures live next to it: checkpoints/best.ckpt ->
# checkpoints/best.calibration.json, with the checkpoint's SHA-256 (a checkpoint rewritten
# since the fit is refused, never silently calibrated with another model's temperature).
CALIBRATION_SUFFIX = ".calibration.json"
# test split -> the validation split its temperature is fitted on
FITTED_ON = {"test": "val", "test_tta": "val_tta"}


def calibration_file(checkpoint) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + CALIBRATION_SUFFIX)


def file_sha256(path) -> str:
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def calibrate_run(
    run_dir, *, checkpoint=None, prefix: str = "", tta: dict | None = None
) -> dict[str, float]:
    """Fit a temperature per prediction kind of a run (``predictions/val.npz`` for ``test``,
    ``val_tta.npz`` for ``test_tta``); write them next to ``checkpoint`` (when given) and return
    the metrics: ``calibration/temperature`` (``_tta``), ``test_calibrated/{nll,ece,brier}``
    (``test_tta_calibrated/*``). ``prefix``: the predictions' file prefix (soups)."""
    from lightning_modules.run_outputs import has_predictions, load_predictions

    fitted, out = {}, {}
    for test, val in FITTED_ON.items():
        if not (has_predictions(run_dir, prefix + val) and has_predictions(run_dir, prefix + test)):
            continue
        v, t = load_predictions(run_dir, prefix + val), load_predictions(run_dir, prefix + test)
        summary = calibration_summary(v["probs"], v["targets"], t["probs"], t["targets"])
        fitted[test] = summary
        if summary["temperature"] is None:
            log.warning("Calibration (%s): %s.", test, summary["reason"])
            continue
        suffix = "" if test == "test" else "_tta"
        out[f"calibration/temperature{suffix}"] = summary["temperature"]
        for key in ("nll", "ece", "brier"):
            out[f"{test}_calibrated/{key}"] = summary["test"]["after"][key]
    if checkpoint is not None and fitted:
        write_calibration(checkpoint, fitted, tta=tta)
    return out


def write_calibration(checkpoint, fitted: dict[str, dict], *, tta: dict | None = None) -> Path:
    """``<checkpoint stem>.calibration.json``: per test split its temperature and the summary
    of the fit (:func:`calibration_summary`), with the checkpoint's SHA-256."""
    from lightning_modules.run_outputs import write_json

    checkpoint = Path(checkpoint)
    data = {
        "checkpoint": checkpoint.name,
        "sha256": file_sha256(checkpoint),
        "temperature": {split: s["temperature"] for split, s in fitted.items()},
        "fitted_on": {split: FITTED_ON[split] for split in fitted},
        "tta": tta if "test_tta" in fitted else None,  # the views the TTA temperature fits
        "fits": fitted,
    }
    return write_json(calibration_file(checkpoint), data)


def stored_temperature(checkpoint, *, tta: dict | None = None) -> float:
    """The temperature fitted for ``checkpoint``'s predictions with the views ``tta``
    (:func:`tta_setting`; None: single view), or a :class:`UserError` saying why there is
    none."""
    from datamodules.errors import UserError

    checkpoint = Path(checkpoint)
    path = calibration_file(checkpoint)
    if not path.is_file():
        raise UserError(
            f"calibrate=true: {checkpoint} has no fitted temperature ({path.name} is missing; "
            "training runs write it when they finish): give a checkpoint of a finished run, "
            "or calibrate=false."
        )
    found = _temperature_in(path, [file_sha256(checkpoint)], tta=tta)
    if found is None:
        raise UserError(
            f"calibrate=true: {path} was fitted for another version of {checkpoint.name} (the "
            "checkpoint changed since): re-run the training run's test, or calibrate=false."
        )
    return found


ENSEMBLE_CALIBRATION = "calibration.json"  # in an ensemble report's directory


def write_ensemble_calibration(out_dir, checkpoints, temperatures: dict[str, float], *, tta):
    """``<report dir>/calibration.json``: the pooled temperatures of an ensemble of
    ``checkpoints`` (with their SHA-256s), for ``calibrate=true`` on those checkpoints."""
    from lightning_modules.run_outputs import write_json

    data = {
        "members": [
            {"checkpoint": str(Path(c).resolve()), "sha256": file_sha256(c)} for c in checkpoints
        ],
        "temperature": dict(temperatures),
        "tta": tta,
        "fitted_on": "the members' pooled validation probabilities",
    }
    return write_json(Path(out_dir) / ENSEMBLE_CALIBRATION, data)


def temperature_for(checkpoints, *, tta: dict | None, file=None) -> float:
    """The temperature ``calibrate`` applies to the predictions of ``checkpoints`` made with
    the views ``tta`` (:func:`tta_setting`; None: single view). ``file``: a ``calibration.json`` given by
    the user (``calibrate=<path>``: an ensemble report's, or a checkpoint's); else one
    checkpoint's own (:func:`stored_temperature`), or the pooled temperature that an ensemble
    report fitted for exactly these checkpoints (looked for in ``<sweep dir>/ensemble/``).
    A :class:`UserError` says why there is none."""
    from datamodules.errors import UserError

    checkpoints = [Path(c) for c in checkpoints]
    if file is None and len(checkpoints) == 1:
        return stored_temperature(checkpoints[0], tta=tta)
    digests = sorted(file_sha256(c) for c in checkpoints)
    if file is not None:
        if not Path(file).is_file():
            raise UserError(f"calibrate={file}: no such file; give a calibration.json.")
        found = _temperature_in(Path(file), digests, tta=tta)
        if found is None:
            raise UserError(
                f"calibrate={file} was fitted for other checkpoints than these "
                f"{len(checkpoints)} (their SHA-256s differ): give the calibration.json of the "
                "report on these runs, or calibrate=false."
            )
        return found
    sweeps = {c.resolve().parent.parent.parent for c in checkpoints}  # <sweep>/<run>/checkpoints/x
    for sweep in sorted(sweeps):
        for path in sorted((sweep / "ensemble").glob(f"**/{ENSEMBLE_CALIBRATION}")):
            found = _temperature_in(path, digests, tta=tta)
            if found is not None:
                return found
    raise UserError(
        f"calibrate=true: no ensemble report fitted a temperature for these {len(checkpoints)} "
        "checkpoints in <sweep dir>/ensemble/ (written when their multirun ends): give the "
        "report's file (calibrate=<report dir>/calibration.json, e.g. of task=ensemble), or "
        "calibrate=false."
    )


def _temperature_in(path: Path, digests: list[str], *, tta: dict | None) -> float | None:
    """The temperature in ``path`` (a checkpoint's ``.calibration.json``, or an ensemble's
    ``calibration.json``) for predictions with the views ``tta``, when it was fitted for the
    checkpoints with these SHA-256s; None when it was fitted for others; a :class:`UserError`
    when it was fitted for them but holds no usable temperature for these views."""
    import json

    from datamodules.errors import UserError

    data = json.loads(path.read_text())
    fitted_for = [m["sha256"] for m in data.get("members", [])] or [data.get("sha256")]
    if sorted(fitted_for) != sorted(digests):
        return None
    split = "test_tta" if tta else "test"
    temperatures = data.get("temperature", {})
    if split not in temperatures:
        raise UserError(
            f"calibrate: {path} has no temperature for {'TTA' if tta else 'single-view'} "
            f"predictions (it has {', '.join(temperatures) or 'none'}): use the runs' tta "
            "setting, or calibrate=false."
        )
    _check_views(path, data.get("tta"), tta)
    if temperatures[split] is None:  # refused when it was fitted
        reason = data.get("fits", {}).get(split, {}).get("reason")
        raise UserError(
            f"calibrate: {path}: {reason or 'no temperature could be fitted'}; or calibrate=false."
        )
    return float(temperatures[split])


def calibration_source(value) -> Path | None:
    """The file that ``calibrate=<value>`` names: None for ``true`` (look it up next to the
    checkpoints), the path for ``calibrate=<calibration.json>``."""
    if isinstance(value, bool) or value is None:
        return None
    return Path(str(value)).expanduser()


def tta_setting(tta) -> dict | None:
    """What a TTA temperature depends on: the views of a
    :class:`~lightning_modules.tta.TestTimeAugmentation` (mode, crop, scales, flip,
    interpolation); None for a single view."""
    if tta is None or not tta.enabled:
        return None
    return {
        "mode": str(tta.mode),
        "crop_pct": float(tta.crop_pct),
        "scales": [float(v) for v in tta.scales],
        "flip": bool(tta.flip),
        "interpolation": str(tta.interpolation),
    }


def _check_views(path: Path, fitted: dict | None, wanted: dict | None) -> None:
    """A TTA temperature applies only to predictions with the views it was fitted on."""
    from datamodules.errors import UserError

    if wanted is None or fitted is None or fitted == wanted:
        return
    diff = ", ".join(
        f"{k}={fitted.get(k)} (now {wanted.get(k)})"
        for k in sorted(set(fitted) | set(wanted))
        if fitted.get(k) != wanted.get(k)
    )
    raise UserError(
        f"calibrate: the TTA temperature in {path} was fitted with other views: {diff}; use "
        "those tta settings, tta=none, or calibrate=false."
    )
