"""What ``python run.py task=<name>`` runs: one module per task, each a pure ``f(cfg)``.

Every task takes the composed config and returns ``(metrics, objects)``; none exits the process
or needs Hydra state beyond ``cfg``, so tests and notebooks call them directly. ``run.py`` is the
only caller that turns their errors into exit codes.

Importing this package registers the config resolvers and sets ``PROJECT_ROOT`` (what
``conf/`` needs to compose) and imports nothing heavy: torch, Lightning and timm are imported by
the task that needs them, so ``--help`` and ``--cfg`` answer at once.
"""

from __future__ import annotations

import importlib
import os
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from datamodules.errors import UserError


def _hydra_subdir(output_dir: str, force=False) -> str:
    from tasks.run_dir import hydra_subdir

    return hydra_subdir(output_dir, bool(force))


ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

# A short random id in every run and sweep directory name: two runs started in the same second
# never share a directory. Cached per config, and Hydra copies the cache into every job of a
# sweep, so all jobs of one multirun agree on their sweep directory.
OmegaConf.register_new_resolver(
    "run_id", lambda: uuid.uuid4().hex[:6], use_cache=True, replace=True
)

# `hydra.output_subdir`: `.hydra`, or `.hydra/relaunch-<time>` for a directory that already holds
# a run, whose own record is never rewritten (tasks/run_dir.py)
OmegaConf.register_new_resolver("hydra_subdir", _hydra_subdir, use_cache=False, replace=True)

# task= value -> "module:function", imported only when chosen, so one task's dependencies
# never slow down another.
TASKS = {
    "train": "tasks.train:train",
    "eval": "tasks.evaluate:evaluate",
    "predict": "tasks.predict:predict",
    "ensemble": "tasks.ensemble:ensemble_task",
    "compare": "tasks.compare:compare_task",
    "preview_augment": "tasks.preview_augment:preview_augment",
    "visualize": "tasks.visualize:visualize",
    "lr_find": "tasks.lr_find:lr_find",
}


def standard_start_method() -> None:
    """Loader workers start the standard way, also in a joblib (loky) worker, whose own default
    start method cannot start a plain ``multiprocessing.Process`` (the data loader's workers)."""
    import multiprocessing
    import sys

    if multiprocessing.get_start_method(allow_none=True) not in (
        None,
        "fork",
        "spawn",
        "forkserver",
    ):
        multiprocessing.set_start_method("fork" if sys.platform == "linux" else "spawn", force=True)


def run_task(cfg: DictConfig) -> tuple[dict, dict]:
    """Run ``cfg.task``: ``(metrics, objects)``; a user mistake raises :class:`UserError`."""
    standard_start_method()
    target = TASKS.get(cfg.task)
    if target is None:
        raise UserError(f"Unknown task '{cfg.task}': choose one of {', '.join(TASKS)}.")
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(cfg)


__all__ = ["ROOT", "TASKS", "run_task"]
