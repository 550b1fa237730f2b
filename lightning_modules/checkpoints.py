"""A trained model back from its checkpoint alone: hyper-parameters + weights, no download.

Checkpoints load with ``torch.load(weights_only=True)`` (a file that would run code is refused);
the hyper-parameters hold plain python only, so the model class is rebuilt from them with
``pretrained=False``: every weight comes from the checkpoint.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from lightning_modules.errors import UserError


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
