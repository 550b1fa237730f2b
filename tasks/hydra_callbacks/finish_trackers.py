"""Hydra callback: when a job ends, its wandb run gets the final metrics and is finished.

Lightning never finishes a wandb run, and a new ``WandbLogger`` reuses the run still in progress,
so without this the jobs of a multirun would all log into the first job's run. At the end of every
job (before the next one starts) the numbers and strings of ``<run dir>/metrics.json`` go into the
run's summary and the run is finished, marked failed when the job failed.

Imports nothing heavy: wandb is only touched when the job imported it.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"  # lightning_modules.run_outputs.METRICS_FILE
FAILED_FILE = "failed.json"  # written by a job of a multirun that failed


class FinishTrackers(Callback):
    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        wandb = sys.modules.get("wandb")
        run = getattr(wandb, "run", None)
        if run is None:
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        failed = job_return.status == JobStatus.FAILED or (run_dir / FAILED_FILE).is_file()
        try:
            run.summary.update(final_metrics(run_dir))
        except Exception:  # the summary is a convenience: never let it hide the job's result
            log.exception("Could not add %s to the wandb summary", run_dir / METRICS_FILE)
        wandb.finish(exit_code=1 if failed else 0)


def final_metrics(run_dir: Path) -> dict[str, Any]:
    """The finite numbers and the strings of ``metrics.json`` ({} when there is none)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text())
    return {
        key: value
        for key, value in metrics.items()
        if isinstance(value, str)
        or (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    }
