"""Checkpoints: the one resolver every task uses, and a trained model back from its file alone.

:func:`find_checkpoints` turns ``ckpt_path`` (a file, a run directory, a sweep directory, a glob
or a list of them) into checkpoint files: a run's best checkpoint is the one its
``metrics.json`` records (else ``checkpoints/best.ckpt``); failed runs are skipped.

Checkpoints load with ``torch.load(weights_only=True)`` (a file that would run code is refused);
the hyper-parameters hold plain python only, so the model class is rebuilt from them with
``pretrained=False``: every weight comes from the checkpoint.
"""

from __future__ import annotations

import glob
import inspect
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from datamodules.errors import UserError
from lightning_modules.run_outputs import list_runs, read_failure, read_metrics

log = logging.getLogger(__name__)

BEST_CHECKPOINT = Path("checkpoints") / "best.ckpt"


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint's dict, loaded without unpickling code; refused with a clear message."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(
            f"Cannot load checkpoint '{path}' ({type(err).__name__}: {str(err)[:200]}): give a "
            "checkpoint written by this framework (checkpoints/best.ckpt of a run)."
        ) from err
    if (
        not isinstance(checkpoint, dict)
        or not {"state_dict", "hyper_parameters"} <= set(checkpoint)
        or "backbone" not in (checkpoint["hyper_parameters"] or {})
    ):
        raise UserError(
            f"'{path}' is not a checkpoint of this framework (no state_dict or no backbone in "
            "its hyper_parameters): give checkpoints/best.ckpt of a training run."
        )
    return checkpoint


def model_from_checkpoint(path: str | Path):
    """The :class:`ImageClassifier` or :class:`MultiTaskModel` a checkpoint holds, in eval mode.

    Its data contract (:mod:`lightning_modules.data_contract`) is the model's ``data_contract``
    attribute: None, after one warning, for a checkpoint written before contracts existed.
    """
    from lightning_modules.data_contract import contract_of
    from lightning_modules.image_classifier import ImageClassifier
    from lightning_modules.multitask import MultiTaskModel

    checkpoint = read_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    cls = MultiTaskModel if "tasks" in hparams else ImageClassifier
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    kwargs.update(pretrained=False, weights=None)  # the weights are in the checkpoint
    model = cls(**kwargs)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise UserError(
            f"Checkpoint '{path}' does not fit the model its hyper_parameters describe "
            f"({str(err).splitlines()[0]}): it was written by an incompatible version."
        ) from err
    model.data_contract = contract_of(checkpoint, path)
    return model.eval()


def find_checkpoints(spec: str | Path | Sequence) -> list[Path]:
    """The checkpoint files ``spec`` names (``ckpt_path`` of eval and predict).

    ``spec`` is one or a list of: a checkpoint file; a run directory (its best checkpoint, as
    recorded in ``metrics.json``); a sweep directory (the best checkpoint of each finished job);
    a glob of any of these.
    """
    if spec is None or spec == "" or (not isinstance(spec, (str, Path)) and not list(spec)):
        raise UserError(
            "No checkpoint given: set ckpt_path to a .ckpt file, a run or sweep directory, or a "
            "list of them, e.g. ckpt_path=outputs/train/multiruns/<date>_<id>."
        )
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    found: list[Path] = []
    for item in items:
        matches = sorted(glob.glob(os.path.expanduser(str(item))))
        if not matches:
            raise UserError(
                f"ckpt_path '{item}' does not exist: give a checkpoint file, a run or sweep "
                "directory, or a glob that matches some."
            )
        for match in map(Path, matches):
            for path in _checkpoints_at(match):
                if path not in found:
                    found.append(path)
    return found


def _checkpoints_at(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    is_run = (path / "metrics.json").is_file() or (path / BEST_CHECKPOINT).is_file()
    runs = [path] if is_run else list_runs(path)
    if not runs:
        raise UserError(
            f"'{path}' holds no run directories: give a .ckpt file, a run directory or a sweep "
            "directory of this framework."
        )
    found = []
    for run in runs:
        failure = read_failure(run)
        best = _best_checkpoint(run)
        if failure is not None or best is None:
            why = f"failed ({failure['error']})" if failure else "has no best checkpoint"
            if len(runs) == 1:
                raise UserError(f"Run '{run}' {why}: choose another run or a checkpoint file.")
            log.warning("Skipped %s: it %s.", run, why)
            continue
        found.append(best)
    return found


def _best_checkpoint(run: Path) -> Path | None:
    if (run / "metrics.json").is_file():
        recorded = read_metrics(run).get("best_ckpt")
        if recorded and (run / recorded).is_file():
            return run / recorded
    return run / BEST_CHECKPOINT if (run / BEST_CHECKPOINT).is_file() else None
