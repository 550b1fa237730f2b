"""The command line: Hydra around the pure task functions of ``tasks/``; nothing imports it.

    python run.py                          # train one model with conf/config.yaml
    python run.py -m seed=1,2,3            # three seeds, then the seed ensemble's report
    python run.py task=eval ckpt_path=<run or sweep dir, checkpoint(s)>   # test (an ensemble)
    python run.py task=predict predict.input=<image folder> ckpt_path=...  # -> predictions.csv
    python run.py task=ensemble ensemble.runs=<sweep dir or run dirs>      # report on old runs
    python run.py resume=<run dir>         # continue a stopped run where it stopped
    python run.py --help                   # config groups and options
    python run.py --cfg job                # the composed config, without running

What happens here and nowhere else: ``resume=`` becomes overrides, a directory that already
holds a run is continued, skipped or refused (``tasks/run_dir.py``), a job's value goes back to the sweeper, and errors become exit codes (a
user's mistake: one line on stderr and exit 2; in a multirun the job is marked failed and the
sweep goes on). Only Hydra and OmegaConf are imported at start-up.
"""

from __future__ import annotations

import gc
import os
import sys

import hydra
from omegaconf import DictConfig

from datamodules.errors import UserError
from tasks import run_task
from tasks.instantiate import user_error
from tasks.outcome import objective, record_failure
from tasks.resume import resume_argv
from tasks.run_dir import check_run_dir


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from tasks.tracking import is_rank_zero

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:  # a directory that holds a run: continue it, skip it or refuse (rank 0 decides)
        done = (
            check_run_dir(cfg, multirun=multirun, output_subdir=HydraConfig.get().output_subdir)
            if is_rank_zero()
            else None
        )
    except UserError as err:  # never a failed.json in another run's directory
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if done is not None:
        return objective(done, cfg.get("optimized_metric"))
    try:
        metrics, _ = run_task(cfg)
    except Exception as err:
        if multirun:
            record_failure(cfg, err)
            return None  # a failed trial for a sweeper, not the end of the sweep
        cause = user_error(err)
        if cause is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        import logging

        logging.getLogger("run").error("%s", cause)
        print(f"Error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
    return objective(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    try:
        sys.argv = resume_argv(sys.argv)
    except UserError as err:
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    main()
    # The interpreter's last collections walk every object that torch, Lightning and timm made
    # (~0.7 s here): nothing is left to collect that matters at exit, so they are skipped.
    # atexit handlers (loggers, workers) still run.
    gc.freeze()
