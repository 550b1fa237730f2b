"""How a finished job ends: the value a sweeper optimises, or a failure recorded in its run dir."""

from __future__ import annotations

import logging
import math
import traceback

from omegaconf import DictConfig

from tasks.instantiate import user_error

log = logging.getLogger("run")

# what a finished job's last log line shows, when the job has it
SUMMARY_KEYS = (
    "val/acc_best",
    "test/acc",
    "test/nll",
    "test/ece",
    "test_tta/acc",
    "val/score_best",
    "test/score",
)


def summary(metrics: dict) -> str:
    """``test/acc=0.9814, test/nll=0.0801, ...``: the :data:`SUMMARY_KEYS` that ``metrics`` has."""
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in SUMMARY_KEYS if k in metrics)


def objective(metrics: dict, metric: str | None) -> float | None:
    """The value returned to a sweeper: ``metrics[metric]``, or None when it is missing or not
    finite. Optuna records None as a failed trial and goes on; a NaN would end the search."""
    value = metrics.get(metric) if metric else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def record_failure(cfg: DictConfig, err: Exception) -> None:
    """A job of a multirun failed: log why, mark its run directory, let the sweep go on.

    The sweep's end (``tasks/hydra_callbacks/failed_jobs.py``) names the failed jobs and exits
    non-zero.
    """
    from lightning_modules.run_outputs import write_failure

    cause = user_error(err)
    if cause is not None:
        log.error("Job failed: %s", cause)
        write_failure(cfg.paths.output_dir, cause)
    else:
        log.exception("Job failed: %s: %s", type(err).__name__, err)
        write_failure(cfg.paths.output_dir, err, traceback_text=traceback.format_exc())
