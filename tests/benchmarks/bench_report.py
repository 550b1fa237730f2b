"""The seed report's cost after the last member: calibration, intervals, figures (and soups).

    RUN_BENCHMARKS=1 python -m pytest tests/benchmarks/bench_report.py -s

Budget: the default job's report (3 members from scratch, 269 test and 269 validation images,
10 classes, single view and TTA, 2,000 bootstrap resamples, three figures) takes at most 15 s
on 2 cores. The first repeat is what a multirun pays (its imports of matplotlib and the report's
code are cold); it and the median of 3 repeats must both be within budget, the median up to the
repeats' spread. Members of the same shape as the default job's are written
here (their numbers do not matter for the time); ``BENCH_SWEEP=<a sweep dir>`` times the report
of a real sweep instead (with soups when its members are soupable).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

from lightning_modules.run_outputs import list_runs, save_predictions
from tasks.ensemble import ReportOptions, report_runs
from tests.test_ensemble_report import make_run

BUDGET_S = 15.0
N, C = 269, 10


def _default_like(root: Path) -> Path:
    classes = [str(i) for i in range(C)]
    for i in range(3):
        rng = np.random.default_rng(i)
        targets = np.arange(N) % C
        for split in ("test", "test_tta", "val", "val_tta"):
            logits = rng.normal(size=(N, C)) + 4 * np.eye(C)[targets]
            p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            if split == "test":
                make_run(
                    root / str(i),
                    seed=i + 1,
                    probs=p.astype(np.float32),
                    targets=targets,
                    classes=classes,
                    ids=[f"digits/{k}" for k in range(N)],
                )
            else:
                ids = [f"{'val' if split.startswith('val') else 'digits'}/{k}" for k in range(N)]
                save_predictions(
                    root / str(i), split, probs=p, targets=targets, ids=ids, class_names=classes
                )
    return root


def test_the_report_after_the_last_member_fits_its_budget(tmp_path):
    sweep = Path(os.environ["BENCH_SWEEP"]) if os.environ.get("BENCH_SWEEP") else None
    runs = list_runs(sweep) if sweep else list_runs(_default_like(tmp_path / "sweep"))
    times = []
    for repeat in range(3):
        start = time.perf_counter()
        written = report_runs(runs, tmp_path / f"report{repeat}", options=ReportOptions())
        times.append(time.perf_counter() - start)
        assert written
    median, spread = statistics.median(times), max(times) - min(times)
    print(
        f"\nreport after the last member ({'sweep ' + str(sweep) if sweep else 'default-like'}):"
        f" median {median:.2f} s, spread {spread:.2f} s over {len(times)} repeats"
        f" ({', '.join(f'{t:.2f}' for t in times)}); budget {BUDGET_S:.0f} s"
    )
    assert times[0] <= BUDGET_S, f"cold report {times[0]:.1f} s > {BUDGET_S} s"
    assert median <= BUDGET_S + spread
