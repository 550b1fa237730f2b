"""Hydra callback: a multirun with failed jobs names them at the end and exits non-zero.

A failed job of a multirun does not end the sweep (``run.py`` records it in the job's
``failed.json`` and the other jobs go on), so that the ensemble report can still be written from
the jobs that finished. This callback then makes the failure visible to scripts: exit status 2 when
every failure was a user error (a bad value, a missing file), 1 otherwise.

Listed first under ``hydra.callbacks``: Hydra runs ``on_multirun_end`` in reverse order, so it
runs after every other callback (and its ``SystemExit`` skips none of them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class FailedJobs(Callback):
    """Exit with status 1 (2: only user errors) after a multirun in which any job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from lightning_modules.run_outputs import list_runs, read_failure

        sweep_dir = Path(config.hydra.sweep.dir)
        failures = {run.name: read_failure(run) for run in list_runs(sweep_dir)}
        failures = {name: info for name, info in failures.items() if info is not None}
        if not failures:
            return
        for name, info in failures.items():
            log.error("Job %s failed: %s: %s", name, info["error"], info["message"])
        log.error(
            "%d job(s) of the multirun in %s failed; see run.log in their directories.",
            len(failures),
            sweep_dir,
        )
        only_user_errors = all(info["error"] == "UserError" for info in failures.values())
        raise SystemExit(2 if only_user_errors else 1)
