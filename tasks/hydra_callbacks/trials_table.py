"""Hydra callback: ``<sweep dir>/trials.csv``, one row per job of the multirun, when it ends.

Each row: the job number, its state (``complete`` or ``failed``), the value of
``optimized_metric``, the swept parameters (the keys of ``hydra.sweeper.params`` and every
override that differs between jobs), the reason a job failed, and its run directory. A job failed
when it wrote ``failed.json``, never wrote ``metrics.json``, or has no finite value of the metric:
exactly the trials Optuna records as failed. The summary (counts, the best job) is logged.

Imports nothing heavy; never raises (a table problem is logged, the sweep's result stands).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

TABLE_FILE = "trials.csv"


class TrialsTable(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            metric = config.get("optimized_metric")
            maximize = "max" in str(OmegaConf.select(config, "hydra.sweeper.direction") or "max")
            searched = list(OmegaConf.select(config, "hydra.sweeper.params", default=None) or {})
            rows = trials(sweep_dir, metric=metric, searched=searched)
            if rows:
                write_table(rows, sweep_dir / TABLE_FILE)
                log_summary(rows, metric=metric, maximize=maximize, path=sweep_dir / TABLE_FILE)
        except Exception:
            log.exception("Could not write the trials table of %s", sweep_dir)


def trials(sweep_dir: Path, *, metric: str | None, searched: list[str] = ()) -> list[dict]:
    """One dict per job directory of ``sweep_dir`` (in job order)."""
    jobs = sorted(
        (p for p in sweep_dir.iterdir() if p.name.isdigit() and (p / ".hydra").is_dir()),
        key=lambda p: int(p.name),
    )
    overrides = {job: _overrides(job) for job in jobs}
    varying = {
        key
        for values in overrides.values()
        for key in values
        if len({json.dumps(o.get(key)) for o in overrides.values()}) > 1
    }
    params = [*searched, *sorted(varying - set(searched))]
    rows = []
    for job in jobs:
        state, value, error = _outcome(job, metric)
        row = {"job": int(job.name), "state": state, metric or "value": value}
        row.update({key: overrides[job].get(key) for key in params})
        row.update({"error": error, "run_dir": str(job)})
        rows.append(row)
    return rows


def _overrides(job: Path) -> dict[str, str]:
    items = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    out = {}
    for item in items:
        key, _, value = str(item).lstrip("+~").partition("=")
        out[key] = value
    return out


def _outcome(job: Path, metric: str | None) -> tuple[str, float | None, str]:
    failed = job / "failed.json"
    if failed.is_file():
        info = json.loads(failed.read_text())
        return "failed", None, f"{info.get('error', 'error')}: {info.get('message', '')}"
    metrics_file = job / "metrics.json"
    if not metrics_file.is_file():
        return "failed", None, f"no metrics.json: the job stopped early (see {job / 'run.log'})"
    if not metric:
        return "complete", None, ""
    value = json.loads(metrics_file.read_text()).get(metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "failed", None, f"{metric} is {value} in metrics.json"
    return "complete", float(value), ""


def write_table(rows: list[dict], path: Path) -> None:
    columns = list(rows[0])
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def log_summary(rows: list[dict], *, metric: str | None, maximize: bool, path: Path) -> None:
    key = metric or "value"
    done = [r for r in rows if r["state"] == "complete"]
    failed = [r for r in rows if r["state"] == "failed"]
    log.info(
        "%d trials: %d complete, %d failed; table: %s", len(rows), len(done), len(failed), path
    )
    for row in failed:
        log.warning("Trial %d failed: %s", row["job"], row["error"])
    scored = [r for r in done if r[key] is not None]
    if scored:
        best = (max if maximize else min)(scored, key=lambda r: r[key])
        log.info("Best trial: job %d, %s=%.6g (%s)", best["job"], key, best[key], best["run_dir"])
