"""Checkpoints as models: one classifier, or an ensemble that averages its members' softmaxes.

A checkpoint of this framework rebuilds its classifier without the config that trained it: its
``hyper_parameters`` hold the backbone name, ``num_classes``, ``class_names`` and the backbone's
arguments, and it loads with ``torch.load(weights_only=True)`` (no pickled code is run).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from datamodules.errors import UserError
from lightning_modules.checkpoints import model_from_checkpoint
from lightning_modules.image_classifier import ImageClassifier

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- loading them
def load_classifier(path: str | Path) -> ImageClassifier:
    """Rebuild an :class:`ImageClassifier` from its checkpoint alone (no pretrained download)."""
    model = model_from_checkpoint(path)
    if not isinstance(model, ImageClassifier):
        raise UserError(
            f"'{path}' is a multi-task checkpoint: eval, predict and ensembles take classifiers; "
            "use task=visualize for multi-task models."
        )
    return model


def load_model(
    paths: Sequence[str | Path], *, with_contract: bool = False, same_test_set: bool = False
):
    """One checkpoint: its classifier. Several: their :class:`EnsembleClassifier`.

    Members trained with different data contracts (classes, input settings, mirror invariance;
    with ``same_test_set`` also data source, split seed and test split) are refused with a
    message naming the difference. With ``with_contract``, returns ``(model, the members'
    common contract or None)``.
    """
    from lightning_modules.data_contract import check_members_agree

    members = [load_classifier(p) for p in paths]
    contract = check_members_agree(
        [m.data_contract for m in members], list(paths), same_test_set=same_test_set
    )
    if len(members) == 1:
        model = members[0]
    else:
        log.info("Ensemble of %d checkpoints: %s", len(members), ", ".join(map(str, paths)))
        model = EnsembleClassifier(members=members)
    return (model, contract) if with_contract else model


# ---------------------------------------------------------------------------- the ensemble
class ProbabilityAverage(nn.Module):
    """Mean of the members' softmax outputs, returned as log-probabilities.

    Log-probabilities behave as logits downstream: their softmax is the averaged distribution
    itself, and their cross-entropy is the ensemble's NLL.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).float().softmax(-1) for m in self.members]).mean(0)
        return probs.clamp_min(torch.finfo(torch.float32).tiny).log()


class EnsembleClassifier(ImageClassifier):
    """Several trained classifiers as one: the average of their softmaxes.

    For ``trainer.test`` (``test/*`` metrics and :attr:`test_outputs`, as an
    :class:`ImageClassifier`) and prediction; it is not trained. Members must share their class
    names. Built on the first member's settings; its network is then replaced by the average.

    Args:
        members: the trained classifiers (e.g. :func:`load_classifier` of each checkpoint).
    """

    def __init__(self, *, members: Sequence[ImageClassifier]) -> None:
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        names = [list(m.hparams.get("class_names") or []) for m in members]
        counts = [int(m.hparams["num_classes"]) for m in members]
        for i in range(1, len(members)):
            if names[i] != names[0] or counts[i] != counts[0]:
                raise UserError(
                    f"Checkpoints 1 and {i + 1} predict different classes ({names[0] or counts[0]}"
                    f" vs {names[i] or counts[i]}): ensemble only checkpoints trained on the "
                    "same classes."
                )
        first = members[0].hparams
        super().__init__(
            backbone=first["backbone"],
            num_classes=counts[0],
            class_names=names[0],
            backbone_kwargs=first.get("backbone_kwargs"),
        )
        self.net = ProbabilityAverage([m.net for m in members])
        self.hparams["members"] = [str(m.hparams["backbone"]) for m in members]
        self.eval()
