"""Tracking and launcher costs: wandb's start-up per run, the default job's time budget with wandb
on, and a 3-seed multirun's wall time sequential vs joblib.

Run with `make bench` (or `RUN_BENCHMARKS=1 python -m pytest tests/benchmarks/bench_tracking.py -s`).
Prints its figures; targets: a wandb run (offline, after the first) starts and finishes in
< 0.5 s with the project's settings; `python run.py -m seed=1,2,3` (csv + wandb) < 180 s.
Wall times depend on what else runs on the machine: the load average is printed with them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from lightning_modules.run_outputs import read_metrics
from tests.conftest import ROOT, run_cli

STARTUP = r"""
import json, sys, time
import pytorch_lightning  # paid by every run anyway
t0 = time.perf_counter()
import wandb
t_import = time.perf_counter() - t0
from omegaconf import OmegaConf
from tasks.tracking import wandb_logger
settings = dict(OmegaConf.load("conf/logger/wandb.yaml").wandb.settings) if sys.argv[1] == "project" else {}
times = []
for i in range(6):
    t = time.perf_counter()
    logger = wandb_logger(save_dir=f"{sys.argv[2]}/{i}", settings=settings, seed=i)
    logger.log_hyperparams({"a": 1, "nested": {"b": 2}})
    logger.log_metrics({"val/acc": 0.5}, step=1)
    wandb.finish()
    times.append(time.perf_counter() - t)
print(json.dumps({"import": t_import, "runs": times}))
"""


def _startup(settings: str, out_dir) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", STARTUP, settings, str(out_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bench_wandb_startup_per_run(tmp_path):
    results = {name: _startup(name, tmp_path / name) for name in ("wandb_defaults", "project")}
    print(f"\nwandb {__import__('wandb').__version__}, offline, 6 runs in one process")
    for name, r in results.items():
        later = r["runs"][1:]
        print(
            f"  {name:15s} import wandb {r['import']:.2f} s | first run {r['runs'][0]:.2f} s "
            f"(starts wandb's service) | later runs median {statistics.median(later):.2f} s, "
            f"max {max(later):.2f} s"
        )
    assert statistics.median(results["project"]["runs"][1:]) < 0.5


def _multirun(tmp_path, name, *extra) -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    proc = run_cli(
        "-m",
        "seed=1,2,3",
        *extra,
        f"paths.log_dir={tmp_path / name}",
        f"hydra.sweep.dir={tmp_path / name / 'sweep'}",
        timeout=3600,
    )
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [read_metrics(tmp_path / name / "sweep" / str(i)) for i in range(3)]
    return wall, runs


def test_bench_default_job_within_budget(tmp_path):
    """`make run`'s job, python run.py -m seed=1,2,3, with its default loggers (csv + wandb)."""
    load = os.getloadavg()[0]
    wall, runs = _multirun(tmp_path, "default")
    wandb_runs = list((tmp_path / "default" / "sweep").glob("*/wandb/offline-run-*"))
    print(f"\ndefault job (csv + wandb offline): {wall:.1f} s, load average {load:.1f} at start")
    print("  " + ", ".join(f"seed {r['seed']}: test/acc {r['test/acc']:.4f}" for r in runs))
    assert len(wandb_runs) == 3
    assert wall < 180  # the default job's budget, wandb included


def test_bench_multirun_sequential_vs_joblib(tmp_path):
    """Three seeds of a shorter job (2 epochs) one after the other in one process (the basic
    launcher), then as 2 joblib worker processes on this 2-core machine."""
    short = ["trainer.max_epochs=2"]
    load = os.getloadavg()[0]
    seq_wall, seq = _multirun(tmp_path, "sequential", *short)
    par_wall, par = _multirun(
        tmp_path, "joblib", *short, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"
    )
    print(f"\n3 seeds x 2 epochs, csv + wandb offline, load average {load:.1f} at start")
    print(f"  sequential (basic launcher): {seq_wall:.1f} s")
    print(f"  joblib, 2 processes:         {par_wall:.1f} s ({seq_wall / par_wall:.2f}x)")
    for s, p in zip(seq, par, strict=True):
        print(
            f"  seed {s['seed']}: test/acc {s['test/acc']:.4f} sequential, {p['test/acc']:.4f} joblib"
        )
    assert [r["seed"] for r in par] == [1, 2, 3]
