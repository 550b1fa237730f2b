"""Hydra callback: after every multirun, the ensemble report of the jobs that finished.

Importing this module imports no torch, Lightning or timm (Hydra instantiates it for every run,
``--help`` and ``--cfg`` included); the report's code is loaded when a multirun ends.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

REPORT_DIR = "ensemble"


class EnsembleReport(Callback):
    """Writes ``<sweep dir>/ensemble/report.{json,md}`` and figures when a multirun ends.

    Options come from the job config's ``ensemble`` group: ``after_multirun`` (on/off) and
    ``plots``. Jobs that failed or wrote no predictions are left out with a warning; fewer than
    two members gives one message and no report. Never raises: a report problem is logged and the
    sweep's own result stands.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        options = config.get("ensemble") or {}
        if not options.get("after_multirun", True):
            return
        from datamodules.errors import UserError

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            from lightning_modules.run_outputs import list_runs
            from tasks.ensemble import ReportOptions, report_runs

            written = report_runs(
                list_runs(sweep_dir),
                sweep_dir / REPORT_DIR,
                options=ReportOptions.from_config(options),
            )
            _to_wandb(config, written, group=sweep_dir.name)
        except UserError as err:
            log.error("No ensemble report: %s", err)
        except Exception:
            log.exception("The ensemble report of %s failed", sweep_dir)


def _to_wandb(config: DictConfig, written: list[Path], *, group: str) -> None:
    """Each report's numbers and figures to wandb, when the jobs logged there (``logger.wandb``)."""
    import json

    wandb_config = (config.get("logger") or {}).get("wandb")
    if not wandb_config or not written:
        return
    from tasks.tracking import report_to_wandb

    for path in written:
        try:
            report = json.loads(path.with_name("report.json").read_text())
            report_to_wandb(path.parent, report, wandb_config=wandb_config, group=group)
        except Exception:  # the report on disk stands; the tracker's copy is a convenience
            log.exception("Could not log %s to wandb", path)
