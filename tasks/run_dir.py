"""A directory that holds a run is continued or refused, never half-overwritten.

Hydra writes ``.hydra/`` into a job's directory before the job starts. For a directory that
already holds a run, :func:`hydra_subdir` (the ``hydra.output_subdir`` resolver) sends this
launch's Hydra files to ``.hydra/relaunch-<time>/`` instead, so the run's own record stays as it
was; :func:`check_run_dir` then decides, before any work, whether this launch may go on:

============================  ==========================================================
the directory holds           this launch
============================  ==========================================================
nothing                       runs
a run (single run)            is refused, unless it continues it (``resume=<run dir>``)
a finished member (multirun)  skips it when its saved config is this one, else is refused
an interrupted member         resumes it from ``last.ckpt`` when the config is this one,
                              else is refused
a failed member               runs it again (its ``failed.json`` removed, new ``.hydra/``)
``force=true``                trains it anew (old ``metrics.json``/``failed.json`` removed)
============================  ==========================================================

Configs are compared without the keys that cannot change a result: ``paths``, ``logger``,
``force``, ``ckpt_path`` and every ``_target_`` (an import path, not a setting).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.errors import UserError

log = logging.getLogger("run")

RELAUNCH = ".hydra/relaunch-"
IGNORED_KEYS = ("paths", "logger", "force", "ckpt_path")


def run_state(run_dir: str | Path) -> str | None:
    """``complete``, ``failed``, ``interrupted`` (a ``last.ckpt``, no metrics), ``started``
    (other run files) or None for a directory that holds no run."""
    run_dir = Path(run_dir)
    if (run_dir / "metrics.json").is_file():
        return "complete"
    if (run_dir / "failed.json").is_file():
        return "failed"
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        return "interrupted"
    if any((run_dir / name).exists() for name in ("checkpoints", "predictions", "contract.json")):
        return "started"
    return None


_RELAUNCHES: dict[str, str] = {}  # output dir -> its relaunch subdir, the same at every lookup


def hydra_subdir(output_dir: str, force: bool = False) -> str:
    """``.hydra``, or ``.hydra/relaunch-<time>`` when ``output_dir`` already holds a run that
    this launch does not replace (a failed member, or ``force=true``, is trained anew)."""
    if output_dir in _RELAUNCHES:
        return _RELAUNCHES[output_dir]
    if force or run_state(output_dir) in (None, "failed"):
        return ".hydra"
    _RELAUNCHES[output_dir] = RELAUNCH + time.strftime("%Y-%m-%d_%H-%M-%S")
    return _RELAUNCHES[output_dir]


def setting(config) -> dict:
    """A config as plain python without the keys that cannot change a result."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=False)

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "_target_"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return strip({k: v for k, v in (config or {}).items() if k not in IGNORED_KEYS})


def differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two settings."""
    keys = []
    for key in sorted(set(saved) | set(now), key=str):
        a, b = saved.get(key), now.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differences(a, b, f"{name}.")
        elif a != b:
            keys.append(f"{name}: {a!r} -> {b!r}")
    return keys


def saved_setting(run_dir: Path) -> dict | None:
    import yaml

    path = run_dir / ".hydra" / "config.yaml"
    return setting(yaml.safe_load(path.read_text())) if path.is_file() else None


def check_run_dir(cfg: DictConfig, *, multirun: bool, output_subdir: str | None) -> dict | None:
    """Decide what this launch does with its directory (see the module's table).

    Returns the finished member's metrics when it is to be skipped, else None (go on); a member
    to resume gets ``cfg.ckpt_path`` set. Raises :class:`UserError` to refuse, after removing
    this launch's ``.hydra/relaunch-*`` files, so the directory is as it was.
    """
    run_dir = Path(cfg.paths.output_dir)
    state = run_state(run_dir)
    if state is None:
        return None
    if cfg.get("force") or state == "failed":  # trained anew: no outcome of the last attempt stays
        for name in ("metrics.json", "failed.json"):
            (run_dir / name).unlink(missing_ok=True)
        return None
    resuming = bool(cfg.get("ckpt_path")) and _inside(cfg.ckpt_path, run_dir)
    if not multirun:
        if resuming:
            return None
        how = (
            f"continue it with resume={run_dir}, or choose another hydra.run.dir"
            if (run_dir / "checkpoints" / "last.ckpt").is_file()
            else "it has no last checkpoint to continue from: choose another hydra.run.dir"
        )
        _refuse(
            run_dir,
            output_subdir,
            f"'{run_dir}' already holds a run ({state}; a run directory is never overwritten): "
            f"{how}.",
        )
    changed = _changed(run_dir, cfg)
    if changed:
        _refuse(
            run_dir,
            output_subdir,
            f"Member '{run_dir}' is {state} with another config ({'; '.join(changed[:4])}"
            f"{'; ...' if len(changed) > 4 else ''}): use a new hydra.sweep.dir, or force=true "
            "to train it again with this config.",
        )
    if state == "complete":
        log.info("Skipping %s: already complete with this config (force=true re-runs it)", run_dir)
        return json.loads((run_dir / "metrics.json").read_text())
    if state == "interrupted" and not cfg.get("ckpt_path"):
        last = run_dir / "checkpoints" / "last.ckpt"
        log.info("Resuming the interrupted member %s from %s", run_dir, last)
        with open_dict(cfg):
            cfg.ckpt_path = str(last)
            if cfg.get("logger") and cfg.logger.get("csv"):  # keep the earlier metrics.csv
                cfg.logger.csv.version = time.strftime("resume-%Y-%m-%d_%H-%M-%S")
        return None
    if state == "started":
        _refuse(
            run_dir,
            output_subdir,
            f"Member '{run_dir}' holds files of a run that never saved a checkpoint to resume "
            "from: use a new hydra.sweep.dir, or force=true to train it again.",
        )
    return None


def _changed(run_dir: Path, cfg: DictConfig) -> list[str]:
    saved = saved_setting(run_dir)
    if saved is None:
        return ["no .hydra/config.yaml to compare with"]
    return differences(saved, setting(cfg))


def _inside(path, run_dir: Path) -> bool:
    return Path(str(path)).expanduser().resolve().is_relative_to(run_dir.resolve())


def _refuse(run_dir: Path, output_subdir: str | None, message: str):
    if output_subdir and output_subdir.startswith(RELAUNCH):
        shutil.rmtree(run_dir / output_subdir, ignore_errors=True)
    raise UserError(message)
