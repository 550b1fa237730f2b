"""The verdict on one setting's members, beyond their average: calibration, soups, intervals.

Given the members' saved predictions (validation and test, single view and TTA), and the soups'
when the members are soupable (:mod:`tasks.soups`):

- **calibration**: one temperature per member fitted on its validation predictions, and one for
  the ensemble fitted on the pooled validation probabilities ("calibrate after pooling");
  test metrics raw and calibrated (:mod:`lightning_modules.calibration`);
- **best member**: the member with the highest *validation* accuracy (choosing on test would
  flatter it);
- **intervals**: a seeded bootstrap over the test images (:mod:`lightning_modules.bootstrap`),
  the same resamples for every model, so that gains are *paired*: ensemble − mean member,
  soup − best member, calibrated − raw ensemble, TTA − single view.

Everything here is NumPy on saved predictions: seconds, whatever the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_modules import bootstrap as B
from lightning_modules import metrics as M
from lightning_modules.calibration import apply_temperature, usable_temperature

SPLITS = {"test": "val", "test_tta": "val_tta"}  # test split -> the validation split it uses
METRICS = ("acc", "nll", "ece", "brier")


def calibration(val: list[np.ndarray], val_targets, test: list[np.ndarray], targets) -> dict:
    """Members and ensemble, raw and calibrated: ``{"members": [...], "ensemble": {...},
    "probs": {"members": [...], "ensemble": ...}}`` (probs: calibrated test probabilities).

    A temperature that cannot be fitted (:func:`usable_temperature`: no minimum inside the
    bounds) is refused: that model's entry has ``temperature`` None, its ``reason`` and its raw
    metrics, and its probabilities stay as they are (the ensemble's: None, no calibrated row).
    """
    members, member_probs = [], []
    for v, t in zip(val, test, strict=True):
        temperature, reason = usable_temperature(v, val_targets)
        probs = t if temperature is None else apply_temperature(t, temperature)
        member_probs.append(probs)
        entry = {"temperature": temperature, **_summary(probs, targets)}
        members.append(entry if reason is None else {**entry, "reason": reason})
    pooled_val = np.mean(np.stack([v.astype(np.float64) for v in val]), axis=0)
    pooled_test = np.mean(np.stack([t.astype(np.float64) for t in test]), axis=0)
    temperature, reason = usable_temperature(pooled_val, val_targets)
    raw = _summary(pooled_test, targets)
    out = {
        "members": members,
        "mean": {k: float(np.mean([m[k] for m in members])) for k in METRICS},
        "ensemble_val_nll": {"raw": M.nll(pooled_val, val_targets), "calibrated": None},
        "probs": {"members": member_probs, "ensemble": None},
    }
    if temperature is None:
        out.update(ensemble={"temperature": None, "reason": reason, **raw}, better="raw")
        return out
    ensemble = apply_temperature(pooled_test, temperature)
    calibrated = _summary(ensemble, targets)
    out["ensemble"] = {"temperature": temperature, **calibrated}
    out["ensemble_val_nll"]["calibrated"] = M.nll(
        apply_temperature(pooled_val, temperature), val_targets
    )
    out["better"] = "calibrated" if calibrated["nll"] < raw["nll"] else "raw"
    out["probs"]["ensemble"] = ensemble
    return out


def best_member(val: list[np.ndarray], val_targets) -> int:
    """Index of the member with the highest validation accuracy (the first on ties)."""
    return int(np.argmax([M.accuracy(v, val_targets) for v in val]))


def intervals(
    models: dict[str, np.ndarray | list[np.ndarray]],
    targets: np.ndarray,
    counts: np.ndarray,
    *,
    level: float,
) -> tuple[dict[str, dict], dict[str, dict[str, np.ndarray]]]:
    """Point value and interval per metric of each model (a list of probabilities = their
    mean member), and the bootstrap samples (for paired differences)."""
    samples, out = {}, {}
    for name, probs in models.items():
        if isinstance(probs, list):
            samples[name] = B.mean_samples([B.metric_samples(p, targets, counts) for p in probs])
            scores = [_summary(p, targets) for p in probs]
            values = {k: float(np.mean([s[k] for s in scores])) for k in METRICS}
        else:
            samples[name] = B.metric_samples(probs, targets, counts)
            values = _summary(probs, targets)
        out[name] = B.summarize_samples(samples[name], values, level=level)
    return out, samples


def paired(
    a: str, b: str, samples: dict, table: dict, *, level: float
) -> dict[str, dict[str, Any]]:
    """``a − b`` per metric with its paired interval (same resamples) and whether it excludes 0."""
    values_a = {k: table[a][k]["value"] for k in METRICS}
    values_b = {k: table[b][k]["value"] for k in METRICS}
    return B.difference(samples[a], samples[b], values_a, values_b, level=level)


def _summary(probs, targets) -> dict[str, float]:
    return {k: v for k, v in M.summarize(probs, targets).items() if k in METRICS}


GAINS = (  # (a, b): a − b, when both are in the report
    ("ensemble", "mean member"),
    ("greedy soup", "best member"),
    ("uniform soup", "best member"),
    ("greedy soup", "ensemble"),
    ("ensemble, calibrated", "ensemble"),
)
TTA_GAINS = ("ensemble", "mean member", "greedy soup")


def verdict(
    predictions: dict[str, list[dict[str, np.ndarray]]],
    *,
    labels: list[str],
    soups: dict[str, dict] | None = None,
    resamples: int = B.DEFAULT_RESAMPLES,
    level: float = B.DEFAULT_LEVEL,
    seed: int = 0,
) -> dict[str, Any]:
    """The report's ``calibration``, ``best_member``, ``intervals`` and ``gains`` sections.

    ``predictions``: per split (``test``, ``test_tta``, ``val``, ``val_tta``) every member's
    arrays; ``soups``: :func:`tasks.soups.build_soups`'s result, or None.
    """
    targets = predictions["test"][0]["targets"]
    counts = B.resample_counts(len(targets), n_boot=resamples, seed=seed)
    out: dict[str, Any] = {
        "bootstrap": {"resamples": resamples, "level": level, "seed": seed, "over": "test images"},
        "calibration": {},
        "intervals": {},
        "gains": {},
        "best_member": None,
    }
    best = None
    if "val" in predictions:
        best = best_member(
            [p["probs"] for p in predictions["val"]], predictions["val"][0]["targets"]
        )
        out["best_member"] = {
            "index": best,
            "label": labels[best],
            "chosen_on": "validation accuracy",
        }
    scored = {}
    for split, val_split in SPLITS.items():
        if split not in predictions:
            continue
        models, cal = _models(predictions, split, val_split, labels=labels, best=best, soups=soups)
        if cal is not None:
            out["calibration"][split] = cal
        table, samples = intervals(models, targets, counts, level=level)
        out["intervals"][split] = table
        out["gains"][split] = {
            f"{a} − {b}": paired(a, b, samples, table, level=level)
            for a, b in GAINS
            if a in table and b in table
        }
        scored[split] = (table, samples)
    if "test_tta" in scored:
        out["gains"]["tta"] = _tta_gains(scored["test"], scored["test_tta"], level=level)
    return out


def _models(predictions, split, val_split, *, labels, best, soups) -> tuple[dict, dict | None]:
    """The probabilities of every row of a split's table (members, mean member, ensemble, best
    member, calibrated ensemble, soups) and the calibration section (None without val)."""
    targets = predictions[split][0]["targets"]
    test = [p["probs"] for p in predictions[split]]
    models: dict[str, Any] = dict(zip(labels, test, strict=True))
    models["mean member"] = test
    models["ensemble"] = np.mean(np.stack([t.astype(np.float64) for t in test]), axis=0)
    if best is not None:
        models["best member"] = test[best]
    cal = None
    if val_split in predictions:
        val = [p["probs"] for p in predictions[val_split]]
        cal = calibration(val, predictions[val_split][0]["targets"], test, targets)
        calibrated = cal.pop("probs")["ensemble"]
        if calibrated is not None:
            models["ensemble, calibrated"] = calibrated
    for kind, soup in (soups or {}).items():
        if split in soup["predictions"]:
            models[f"{kind} soup"] = soup["predictions"][split]["probs"]
    return models, cal


def _tta_gains(single: tuple, tta: tuple, *, level: float) -> dict[str, dict]:
    """TTA − single view of the models in both tables, paired (same test images, resamples)."""
    (one, s_one), (many, s_many) = single, tta
    return {
        f"TTA − single view ({name})": B.difference(
            s_many[name],
            s_one[name],
            {k: many[name][k]["value"] for k in METRICS},
            {k: one[name][k]["value"] for k in METRICS},
            level=level,
        )
        for name in TTA_GAINS
        if name in one and name in many
    }
