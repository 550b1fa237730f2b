"""Hydra callback: every job of a run or multirun is one clean unit for Lightning DDP.

- **Only rank 0 writes logs.** A process started for another rank of the same job (by Lightning's
  DDP launcher, ``torchrun`` or SLURM) drops its ``run.log`` handler when the job starts; metrics,
  predictions and checkpoints are written by rank 0 only (``run.py``, Lightning).
- **Multiruns.** Lightning starts each extra rank of a job by running the command line again with
  ``hydra.run.dir=<run dir>``. In a multirun that command line would start the whole sweep again,
  and the run directory would be a new one. While a DDP job runs, the command line is this job's
  own overrides and the run directory this job's directory, so every rank joins this job.
- **Between jobs.** When a job ends, the process group is destroyed and the environment variables
  Lightning set (``LOCAL_RANK``, ``MASTER_PORT``, ``WORLD_SIZE``, ...) are restored, so the next
  job of a sequential multirun starts its own processes instead of waiting for ranks that have
  exited.

Imports nothing heavy: torch is only touched when the job imported it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

log = logging.getLogger(__name__)

# set by Lightning's DDP launcher in the process that starts the other ranks
DDP_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# strategies that start the other ranks by running the command line again
SCRIPT_LAUNCHED = ("ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")


class DistributedJob(Callback):
    def __init__(self) -> None:
        self._environ: dict[str, str | None] = {}
        self._argv: list[str] | None = None
        self._run_dir: Any = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from tasks.tracking import is_rank_zero

        self._environ = {key: os.environ.get(key) for key in DDP_ENVIRONMENT}
        if not is_rank_zero():
            drop_log_files()
        if _is_multirun() and _launches_script(config):
            self._join_this_job(config)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        torch = sys.modules.get("torch")
        dist = getattr(torch, "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in self._environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self._argv is not None:
            from hydra.core.hydra_config import HydraConfig

            sys.argv = self._argv
            with read_write(HydraConfig.get()):
                HydraConfig.get().run.dir = self._run_dir
            self._argv = None

    def _join_this_job(self, config: DictConfig) -> None:
        """The command line and run directory Lightning gives the other ranks: this job's."""
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
        self._argv = list(sys.argv)
        sys.argv = [sys.argv[0], *hydra.overrides.task]
        self._run_dir = OmegaConf.to_container(hydra.run, resolve=False)["dir"]
        with read_write(hydra):
            hydra.run.dir = hydra.runtime.output_dir


def drop_log_files() -> None:
    """Remove (and close) the file handlers of the root logger: this process writes no log file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _launches_script(config: DictConfig) -> bool:
    strategy = OmegaConf.select(config, "trainer.strategy", default=None)
    return isinstance(strategy, str) and strategy in SCRIPT_LAUNCHED
