"""The seed ensemble's verdict: its members against the average of their probabilities.

From finished runs (a sweep directory, run directories, or globs of them):

1. every run's configuration is read from ``.hydra/config.yaml`` and runs are grouped by their
   configuration without ``seed``, ``paths`` and ``logger`` (:data:`IGNORED_KEYS`), so a sweep
   over other keys (``-m model.optimizer.lr=1e-3,3e-4 seed=1,2,3``) gives one ensemble per setting;
2. runs that failed (``failed.json``) or never wrote test predictions are left out, with the
   reason; a group needs at least two members;
3. members must have predicted the same test samples (ids), in the same order, with the same
   targets, classes and ``split_seed``; anything else is refused with a :class:`UserError`;
4. each member's test (and TTA) probabilities are scored, then their average: accuracy, NLL,
   ECE (15 bins), Brier (see :mod:`lightning_modules.metrics`), members' mean and standard
   deviation (ddof=1), the ensemble's gain over the mean member, and the members' pairwise
   disagreement;
5. ``report.json``, ``report.md``, ``reliability.png`` and ``confusion.png`` are written to the
   report directory (one sub-directory per setting when the runs hold several), and the table is
   printed.

Used after every multirun by ``tasks/hydra_callbacks/ensemble_report.py`` and, for existing runs, by
``python run.py task=ensemble ensemble.runs=<sweep dir>`` (:func:`ensemble_task`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.errors import UserError
from lightning_modules import metrics as M
from lightning_modules.run_outputs import (
    has_predictions,
    list_runs,
    load_predictions,
    read_failure,
    read_metrics,
    write_json,
    write_text,
)

log = logging.getLogger(__name__)

# Config keys that may differ between members of one ensemble: the seed, where files go, where
# metrics are logged (loggers often name runs after the seed).
IGNORED_KEYS = ("seed", "paths", "logger")
# Tasks whose runs write test predictions, and so can be members.
MEMBER_TASKS = ("train", "eval")
SPLITS = {"test": "single view", "test_tta": "TTA"}
MIN_MEMBERS = 2
METRICS = ("acc", "nll", "ece", "brier")
METRIC_NOTES = (
    "acc: accuracy; NLL: mean negative log-likelihood; ECE: expected calibration error, "
    "15 equal-width bins, L1; Brier: sum over classes of squared errors, mean over samples "
    "(0 best, 2 worst). Ensemble = mean of the members' probabilities. std over members, ddof=1."
)


@dataclass(frozen=True)
class ReportOptions:
    """What a report computes (the ``ensemble`` config group)."""

    plots: bool = True  # reliability, confusion and learning-curve PNGs
    soups: bool = True  # uniform and greedy soups of soupable members
    resamples: int = 2000  # bootstrap resamples of the test images
    level: float = 0.95  # interval level
    seed: int = 0  # bootstrap seed

    @classmethod
    def from_config(cls, options) -> ReportOptions:
        options = options or {}
        return cls(
            plots=bool(options.get("plots", True)),
            soups=bool(options.get("soups", True)),
            resamples=int(options.get("bootstrap", 2000)),
            level=float(options.get("level", 0.95)),
            seed=int(options.get("bootstrap_seed", 0)),
        )


# ---------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One run directory as the report sees it."""

    path: Path
    name: str
    task: str | None
    seed: Any
    setting: dict[str, Any]
    failure: dict | None = None
    overrides: dict[str, str] = field(default_factory=dict)  # command line, without IGNORED_KEYS

    @property
    def complete(self) -> bool:
        return self.failure is None and has_predictions(self.path, "test")

    @property
    def label(self) -> str:
        return f"seed {self.seed}"

    @property
    def reason(self) -> str:
        if self.failure is not None:
            return f"failed: {self.failure['error']}: {self.failure['message']}"
        return "no test predictions (stopped before testing)"


@dataclass
class Group:
    """Runs whose configurations differ only in :data:`IGNORED_KEYS`."""

    setting: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    label: dict[str, Any] = field(default_factory=dict)  # config keys that set it apart
    name: dict[str, str] = field(default_factory=dict)  # the overrides that set it apart
    predictions: dict | None = None  # its members' checked predictions, once reported

    @property
    def members(self) -> list[Run]:
        return [r for r in self.runs if r.complete]

    @property
    def left_out(self) -> list[Run]:
        return [r for r in self.runs if not r.complete]

    @property
    def title(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in (self.name or self.label).items()) or "all runs"


def find_runs(spec: str | Path | list | tuple, *, option: str = "ensemble.runs") -> list[Path]:
    """Run directories named by ``spec`` (the value of ``option``): sweep or run directories,
    or globs of them."""
    patterns = [spec] if isinstance(spec, (str, Path)) else list(spec or [])
    runs: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(str(pattern)))) or []
        found = [run for match in matches for run in list_runs(match)]
        if not found:
            raise UserError(
                f"{option}='{pattern}' names no run directory: give a sweep directory "
                "(outputs/train/multiruns/<date>_<id>), run directories, or a glob of them "
                "(each run has a .hydra/config.yaml)."
            )
        runs += [run for run in found if run not in runs]
    return runs


def read_run(path: Path) -> Run:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path / ".hydra" / "config.yaml")
    setting = flat_setting(cfg)
    seed = cfg.get("seed")
    if (path / "metrics.json").is_file():
        seed = read_metrics(path).get("seed", seed)  # the seed drawn for seed=null
    return Run(
        path=path,
        name=path.name,
        task=cfg.get("task"),
        seed=seed,
        setting=setting,
        failure=read_failure(path),
        overrides=read_overrides(path),
    )


def read_overrides(path: Path) -> dict[str, str]:
    """The run's command-line overrides (``augment=none``), :data:`IGNORED_KEYS` left out."""
    from omegaconf import OmegaConf

    file = path / ".hydra" / "overrides.yaml"
    if not file.is_file():
        return {}
    out = {}
    for item in OmegaConf.load(file):
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if key.split(".")[0] not in (*IGNORED_KEYS, "hydra"):
            out[key] = value
    return out


def flat_setting(cfg) -> dict[str, Any]:
    """``{"dotted.key": value}`` of a run's config without :data:`IGNORED_KEYS`, resolved.

    Values that come from an ignored key (``${paths.output_dir}/checkpoints``), or that cannot be
    resolved outside their run, keep their interpolation text: the same for every run.
    """
    from omegaconf import OmegaConf, open_dict

    raw = OmegaConf.to_container(cfg, resolve=False)
    masked = OmegaConf.create(raw)
    with open_dict(masked):
        for key in (*IGNORED_KEYS, "hydra"):
            if key in masked:
                masked[key] = "<ignored>"  # interpolations into it no longer resolve
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if dotted in (*IGNORED_KEYS, "hydra"):
                continue
            if isinstance(value, dict):
                walk(value, dotted + ".")
                continue
            if "${" in json.dumps(value):
                try:
                    resolved = OmegaConf.select(masked, dotted, throw_on_resolution_failure=True)
                    if OmegaConf.is_config(resolved):
                        resolved = OmegaConf.to_container(resolved, resolve=True)
                    value = resolved
                except Exception:
                    pass  # keep the interpolation's text
            out[dotted] = value

    walk(raw, "")
    return out


def group_runs(runs: list[Run]) -> list[Group]:
    """Group runs by setting, in order of first appearance; label each by what differs."""
    groups: dict[str, Group] = {}
    for run in runs:
        key = json.dumps(run.setting, sort_keys=True, default=str)
        groups.setdefault(key, Group(setting=run.setting)).runs.append(run)
    result = list(groups.values())
    differing = differing_keys([g.setting for g in result])
    for group in result:
        group.label = {k: group.setting.get(k) for k in differing}
    # name each group by the overrides that tell them apart (augment=none rather than the
    # dozen config keys a preset changes), when those tell every group apart
    named = differing_keys([g.runs[0].overrides for g in result])
    names = [{k: g.runs[0].overrides.get(k) for k in named} for g in result]
    if named and len({json.dumps(n, sort_keys=True) for n in names}) == len(result):
        for group, name in zip(result, names, strict=True):
            group.name = name
    return result


def differing_keys(settings: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for s in settings for k in s})
    return [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]


# ---------------------------------------------------------------------------- checks
def load_members(members: list[Run]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Every member's predictions per split: ``test``; ``test_tta``, ``val`` and ``val_tta``
    when all members have them (validation predictions: runs of this version's ``task=train``)."""
    out = {"test": [load_predictions(r.path, "test") for r in members]}
    why = {"test_tta": "the report leaves TTA out", "val": "no calibration, no best member"}
    for split in ("test_tta", "val", "val_tta"):
        present = [has_predictions(r.path, split) for r in members]
        if all(present):
            out[split] = [load_predictions(r.path, split) for r in members]
        elif any(present) and split in why:
            log.warning(
                "%s predictions missing for %s: %s.",
                "TTA" if split == "test_tta" else "Validation",
                ", ".join(r.label for r, ok in zip(members, present, strict=True) if not ok),
                why[split],
            )
    if "val_tta" in out and "test_tta" not in out:
        del out["val_tta"]
    return out


def check_members(members: list[Run], predictions: list[dict[str, np.ndarray]]) -> None:
    """Refuse to average predictions that are not of the same samples, order and classes."""
    first, ref = members[0], predictions[0]
    split_seeds = {}
    for run in members:
        if (run.path / "metrics.json").is_file():
            split_seeds[run.label] = read_metrics(run.path).get("split_seed")
    if len(set(map(str, split_seeds.values()))) > 1:
        raise UserError(
            f"Members were tested on different data splits ({_pairs(split_seeds)}): an ensemble "
            "averages predictions on one test set; give runs with the same data.split_seed."
        )
    _check_contracts(members)
    for run, pred in zip(members[1:], predictions[1:], strict=True):
        pair = f"{first.label} ({first.path}) and {run.label} ({run.path})"
        if pred["class_names"].tolist() != ref["class_names"].tolist():
            raise UserError(
                f"{pair} predict different classes ({ref['class_names'].tolist()} vs "
                f"{pred['class_names'].tolist()}): ensemble only runs trained on the same classes."
            )
        ids, ref_ids = pred["ids"].tolist(), ref["ids"].tolist()
        if ids != ref_ids:
            if sorted(ids) == sorted(ref_ids):
                raise UserError(
                    f"{pair} list the same test samples in a different order: their "
                    "predictions cannot be averaged row by row; re-test one of them with the "
                    "other's data settings (task=eval)."
                )
            raise UserError(
                f"{pair} were tested on different samples ({len(ref_ids)} vs {len(ids)}, "
                f"{len(set(ref_ids) ^ set(ids))} not shared): a different data split or data "
                "set; ensemble only runs with the same data and data.split_seed."
            )
        if not np.array_equal(pred["targets"], ref["targets"]):
            raise UserError(
                f"{pair} give the same samples different labels: the data changed between the "
                "runs; re-test them on the same data (task=eval)."
            )


def _check_contracts(members: list[Run]) -> None:
    """Members' data contracts (``contract.json``, absent in older runs) must agree."""
    from lightning_modules.data_contract import MEMBER_KEYS, describe_difference, read_run_contract

    known = [(run, c) for run in members if (c := read_run_contract(run.path)) is not None]
    for run, contract in known[1:]:
        diff = describe_difference(known[0][1], contract, (*MEMBER_KEYS, "splits"))
        if diff:
            first = known[0][0]
            raise UserError(
                f"{first.label} ({first.path}) and {run.label} ({run.path}) were trained with "
                f"different data contracts ({diff}): ensemble only runs trained on the same "
                "classes, input settings and split."
            )


def _pairs(mapping: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in mapping.items())


# ---------------------------------------------------------------------------- scores
def score_split(probs: list[np.ndarray], targets: np.ndarray) -> dict[str, Any]:
    """Members' metrics, their mean/std, the ensemble's, its gain, and pairwise disagreement."""
    members = [M.summarize(p, targets) for p in probs]
    keys = list(members[0])
    ensemble_probs = np.mean(np.stack([p.astype(np.float64) for p in probs]), axis=0)
    ensemble = M.summarize(ensemble_probs, targets)
    mean = {k: float(np.mean([m[k] for m in members])) for k in keys}
    std = {k: float(np.std([m[k] for m in members], ddof=1)) for k in keys}
    pairs = M.pairwise_disagreement(probs)
    upper = pairs[np.triu_indices(len(probs), k=1)]
    return {
        "members": members,
        "mean": mean,
        "std": std,
        "ensemble": ensemble,
        "gain": {k: ensemble[k] - mean[k] for k in keys},
        "disagreement": {"mean": float(upper.mean()), "pairs": pairs.tolist()},
    }


def build_report(
    group: Group,
    predictions: dict[str, list[dict]],
    *,
    soups: dict | None = None,
    options: ReportOptions | None = None,
) -> dict[str, Any]:
    """The report of one setting: its members' scores, the ensemble's, and the verdict
    (:func:`tasks.verdict.verdict`: calibration, best member, soups, intervals, paired gains).
    ``soups``: ``{"soupable", "reason", "soups": build_soups' result or None}``."""
    from tasks.verdict import verdict

    options = options or ReportOptions()
    members = group.members
    ref = predictions["test"][0]
    metrics = {}
    for run in members:
        if (run.path / "metrics.json").is_file():
            metrics[run.name] = read_metrics(run.path)
    split_seed = next((m.get("split_seed") for m in metrics.values()), None)
    tta = _tta_setting(group)
    report: dict[str, Any] = {
        "setting": group.label,
        "name": group.title,
        "members": [{"run": r.name, "path": str(r.path), "seed": r.seed} for r in members],
        "seeds": [r.seed for r in members],
        "left_out": [
            {"run": r.name, "path": str(r.path), "seed": r.seed, "reason": r.reason}
            for r in group.left_out
        ],
        "test_set": {
            "samples": len(ref["targets"]),
            "classes": len(ref["class_names"]),
            "class_names": ref["class_names"].tolist(),
            "split_seed": split_seed,
        },
        "tta": tta if "test_tta" in predictions else None,
        "notes": METRIC_NOTES,
    }
    for split in SPLITS:
        if split in predictions:
            probs = [p["probs"] for p in predictions[split]]
            report[split] = score_split(probs, ref["targets"])
    soups = soups or {"soupable": False, "reason": "soups not computed", "soups": None}
    made = soups.get("soups") or {}
    report["soups"] = _soup_section(soups)
    report.update(
        verdict(
            predictions,
            labels=[r.label for r in members],
            soups=made,
            resamples=options.resamples,
            level=options.level,
            seed=options.seed,
        )
    )
    return report


def _tta_setting(group: Group) -> dict[str, Any]:
    """The members' ``tta`` settings (mode, crop_pct, ...)."""
    return {
        k[4:]: v for k, v in group.setting.items() if k.startswith("tta.") and k != "tta._target_"
    }


def _soup_section(soups: dict) -> dict[str, Any]:
    """The report's ``soups``: soupable, why, and each soup without its predictions."""
    made = soups.get("soups") or {}
    return {
        "soupable": soups["soupable"],
        "reason": soups["reason"],
        **{
            kind: {k: v for k, v in soup.items() if k != "predictions"}
            for kind, soup in made.items()
        },
    }


# ---------------------------------------------------------------------------- output
def write_report(
    report: dict,
    predictions: dict[str, list[dict]],
    out_dir: Path,
    *,
    plots: bool = True,
    runs: list[Run] | None = None,
) -> Path:
    """``report.json``, ``report.md`` and (``plots``) ``reliability.png`` (raw and calibrated),
    ``confusion.png`` and ``learning_curves.png`` (from the members' ``runs``)."""
    from tasks.report_text import markdown

    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", markdown(report))
    if plots:
        _write_figures(report, predictions, out_dir, runs or [])
    return out_dir / "report.md"


def _write_figures(report: dict, predictions: dict, out_dir: Path, runs: list[Run]) -> None:
    from lightning_modules.calibration import apply_temperature
    from lightning_modules.figures.learning_curves import learning_curves_figure, read_curves
    from lightning_modules.figures.model_figures import confusion_matrix, plot_confusion
    from lightning_modules.figures.report_figures import reliability_figure

    targets = predictions["test"][0]["targets"]
    names = predictions["test"][0]["class_names"].tolist()
    panels = {}
    for split, name in SPLITS.items():
        if split in predictions:
            probs = [p["probs"] for p in predictions[split]]
            title = f"TTA {report['tta']['mode']}" if split == "test_tta" else name
            panels[title] = (probs, np.mean(np.stack(probs), axis=0))
    cal = report.get("calibration", {}).get("test")
    if cal is not None and cal["ensemble"]["temperature"] is not None:  # after scaling
        probs = [p["probs"] for p in predictions["test"]]
        calibrated = [
            p if m["temperature"] is None else apply_temperature(p, m["temperature"])
            for p, m in zip(probs, cal["members"], strict=True)
        ]
        pooled = np.mean(np.stack([p.astype(np.float64) for p in probs]), axis=0)
        panels["single view, calibrated"] = (
            calibrated,
            apply_temperature(pooled, cal["ensemble"]["temperature"]),
        )
    labels = [f"seed {s}" for s in report["seeds"]]
    reliability_figure(out_dir / "reliability.png", panels, targets, member_labels=labels)
    ensemble = next(iter(panels.values()))[1]
    plot_confusion(
        out_dir / "confusion.png",
        confusion_matrix(targets, ensemble.argmax(1), len(names)),
        names,
        title="Ensemble, single view",
    )
    curves = {r.label: c for r in runs if (c := read_curves(r.path)) is not None}
    if curves:
        unfreeze = None
        if runs and (runs[0].path / "metrics.json").is_file():
            unfreeze = read_metrics(runs[0].path).get("unfreeze_epochs")
        learning_curves_figure(
            out_dir / "learning_curves.png",
            curves,
            unfreeze_epochs=unfreeze,
            title=report.get("name") or None,
        )


def _slug(label: dict[str, Any]) -> str:
    text = ",".join(f"{k}={v}" for k, v in label.items()) or "all"
    text = re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", text)
    if len(text) <= 80:
        return text
    return text[:70] + "_" + hashlib.sha1(text.encode()).hexdigest()[:8]


# ---------------------------------------------------------------------------- entry points
def report_runs(
    paths: list[Path],
    out_dir: Path,
    *,
    plots: bool = True,
    strict: bool = False,
    options: ReportOptions | None = None,
) -> list[Path]:
    """Write one report per setting found among ``paths``; returns the ``report.md`` paths.

    ``strict`` (the ``ensemble`` task): mismatched members and "nothing to report" raise
    :class:`UserError`. Otherwise (after a multirun) they are logged and the others go on.
    ``options`` (else the defaults with ``plots``): what the reports compute.
    """
    options = options or ReportOptions(plots=plots)
    runs = _member_runs(paths, strict=strict)
    if not runs:
        if strict:
            raise UserError(
                "None of the runs is a train or eval run: give runs that wrote test predictions."
            )
        return []
    groups = group_runs(runs)
    several = len(groups) > 1
    if several:
        keys = ", ".join(differing_keys([g.setting for g in groups]))
        log.info("Runs differ in %s: %d ensembles, one per setting.", keys, len(groups))
    written = []
    for group in groups:
        target = out_dir / _slug(group.name or group.label) if several else out_dir
        path = _report_group(group, target, several=several, options=options, strict=strict)
        if path is not None:
            written.append(path)
    if strict and not written:
        raise _no_ensemble_error(groups, n_runs=len(runs))
    reported = [g for g in groups if g.predictions is not None]
    if len(reported) > 1:  # a grid: the settings against each other
        _compare(reported, out_dir, options, strict=strict)
    return written


def _compare(groups: list[Group], out_dir: Path, options: ReportOptions, *, strict: bool) -> None:
    """``compare.md`` of a grid's settings; after a multirun a failure is logged, the reports
    stand."""
    from tasks.compare import compare

    try:
        compare(
            [(g.title, g.predictions) for g in groups],
            out_dir,
            resamples=options.resamples,
            level=options.level,
            seed=options.seed,
            plots=options.plots,
        )
    except Exception:
        if strict:
            raise
        log.exception("The comparison of the settings failed; their reports stand")


def setting_predictions(paths: list[Path]) -> list[tuple[str, dict]]:
    """``(title, members' predictions)`` of every setting among ``paths`` with enough finished,
    matching members (the others are logged and left out; mismatched members raise)."""
    groups = group_runs(_member_runs(paths, strict=True))
    found = [(g, _checked_predictions(g, several=True, strict=True)) for g in groups]
    return [(g.title, predictions) for g, predictions in found if predictions is not None]


def _checked_predictions(group: Group, *, several: bool, strict: bool) -> dict | None:
    """The members' predictions of a setting, checked to match (:func:`check_members`); None,
    logged, when it has too few finished members or (without ``strict``) they do not match."""
    members = group.members
    where = f" for {group.title}" if several else ""
    for run in group.left_out:
        log.warning("Left out of the ensemble: %s (%s): %s", run.label, run.path, run.reason)
    if len(members) < MIN_MEMBERS:
        log.warning(
            "No ensemble report%s: %d member(s) finished (%s); it needs at least %d.",
            where,
            len(members),
            ", ".join(r.label for r in members) or "none",
            MIN_MEMBERS,
        )
        return None
    try:
        predictions = load_members(members)
        for preds in predictions.values():
            check_members(members, preds)
    except UserError as err:
        if strict:
            raise
        log.error("No ensemble report%s: %s", where, err)
        return None
    return predictions


def _member_runs(paths: list[Path], *, strict: bool) -> list[Run]:
    """The runs of ``paths`` that can be members (train and eval runs); with ``strict``, a
    warning names each one that cannot."""
    runs = []
    for path in paths:
        run = read_run(path)
        if run.task in MEMBER_TASKS:
            runs.append(run)
        elif strict:
            log.warning("%s is a task=%s run, not a member: skipped.", path, run.task)
    return runs


def _report_group(
    group: Group, out_dir: Path, *, several: bool, options: ReportOptions, strict: bool
) -> Path | None:
    """One setting's report in ``out_dir``: its ``report.md``, or ``None`` (logged) when the
    group has too few members or they do not match (with ``strict``, that raises)."""
    members = group.members
    predictions = _checked_predictions(group, several=several, strict=strict)
    if predictions is None:
        return None
    soups = _soups(group, predictions, out_dir) if options.soups else None
    report = build_report(group, predictions, soups=soups, options=options)
    group.predictions = predictions
    path = write_report(report, predictions, out_dir, plots=options.plots, runs=members)
    _store_temperatures(report, members, out_dir)
    from tasks.report_text import print_table

    print_table(report)
    log.info("Ensemble report: %s", path)
    return path


def _store_temperatures(report: dict, members: list[Run], out_dir: Path) -> None:
    """The ensemble's pooled temperatures with its members' checkpoints (``calibration.json``,
    for ``calibrate=true`` in eval/predict), and the TTA views they fit (the members' own
    record); members without a checkpoint: nothing stored. A refused temperature is stored as
    None, so that ``calibrate=true`` says why."""
    from lightning_modules.calibration import calibration_file, write_ensemble_calibration
    from lightning_modules.checkpoints import find_checkpoints

    fitted = {s: c["ensemble"]["temperature"] for s, c in report.get("calibration", {}).items()}
    if not fitted:
        return
    try:
        checkpoints = [find_checkpoints(r.path)[0] for r in members]
    except UserError:
        return
    sidecar = calibration_file(checkpoints[0])
    views = json.loads(sidecar.read_text()).get("tta") if sidecar.is_file() else None
    write_ensemble_calibration(out_dir, checkpoints, fitted, tta=views)


def _soups(group: Group, predictions: dict[str, list[dict]], out_dir: Path) -> dict:
    """``{"soupable", "reason", "soups"}`` of a setting's members (:mod:`tasks.soups`): nothing
    is loaded unless every member recorded the same initial weights. A failure while making
    them is logged; the rest of the report stands."""
    from lightning_modules.checkpoints import find_checkpoints
    from lightning_modules.data_contract import read_run_contract
    from tasks.soups import build_soups, soupable

    members = group.members
    contracts = [read_run_contract(r.path) for r in members]
    ok, reason = soupable(contracts)
    if ok and "val" not in predictions:
        ok, reason = False, "not soupable: no validation predictions to choose the greedy soup"
    if ok:
        try:
            checkpoints = [find_checkpoints(r.path)[0] for r in members]
        except UserError:
            ok, reason = False, "not soupable: a member has no checkpoint"
    if not ok:
        log.info("Soups: %s.", reason)
        return {"soupable": False, "reason": reason, "soups": None}
    try:
        targets = predictions["val"][0]["targets"]
        soups = build_soups(
            members,
            checkpoints,
            out_dir,
            contract=contracts[0],
            tta_config=_tta_setting(group) or None,
            val_accuracy=[M.accuracy(p["probs"], targets) for p in predictions["val"]],
            ids={s: predictions[s][0]["ids"].tolist() for s in ("val", "test")},
        )
        for kind, soup in soups.items():  # scored on exactly the members' images
            for split, preds in soup["predictions"].items():
                if preds["ids"].tolist() != predictions[split][0]["ids"].tolist():
                    raise ValueError(f"the {kind} soup's {split} images are not the members'")
    except Exception as err:  # the members' report must not depend on the soups
        log.exception("Soups of %s failed", group.title)
        return {"soupable": True, "reason": f"failed: {type(err).__name__}: {err}", "soups": None}
    return {"soupable": True, "reason": reason, "soups": soups}


def _no_ensemble_error(groups: list[Group], *, n_runs: int) -> UserError:
    """Why no setting gave a report: too few finished runs, or runs differing in more than
    the seed (the keys they differ in)."""
    keys = differing_keys([g.setting for g in groups])
    detail = (
        f" The runs differ in more than the seed: {', '.join(keys[:8])}"
        f"{' ...' if len(keys) > 8 else ''}; members of an ensemble share everything else."
        if keys
        else ""
    )
    return UserError(
        f"No ensemble: no setting has {MIN_MEMBERS} finished runs among the "
        f"{n_runs} given.{detail} Give runs of one multirun over seeds."
    )


def runs_option(cfg, task: str) -> list[Path]:
    """The run directories that ``<task>.runs`` names (``task=ensemble``, ``task=compare``);
    unset is a :class:`UserError` saying what to give."""
    from omegaconf import OmegaConf

    spec = cfg[task].get("runs")
    if not spec:
        raise UserError(
            f"task={task} needs {task}.runs: a sweep directory, run directories, or a glob, "
            f"e.g. {task}.runs=outputs/train/multiruns/<date>_<id>."
        )
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec)
    return find_runs(spec, option=f"{task}.runs")


def ensemble_task(cfg) -> tuple[dict, dict]:
    """``task=ensemble``: the report for existing runs (``ensemble.runs``), in the run directory."""
    out_dir = Path(cfg.paths.output_dir)
    paths = runs_option(cfg, "ensemble")
    options = ReportOptions.from_config(cfg.ensemble)
    written = report_runs(paths, out_dir, strict=True, options=options)
    reports = [json.loads(p.with_name("report.json").read_text()) for p in written]
    return {"reports": [str(p) for p in written]}, {"reports": reports}
