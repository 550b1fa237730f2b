"""The tasks of a multi-task network: their heads on the shared features, and masked losses.

Three kinds of task, each with one linear head on the backbone's pooled features:

=================  ===================  ==========================================================
type               head output          loss (mean over the samples labelled for the task)
=================  ===================  ==========================================================
``classification``  logits ``(N, C)``    cross-entropy
``binary``          logit ``(N,)``       binary cross-entropy with logits (labels 0/1)
``regression``      value ``(N,)``       squared error on the standardised scale:
                                        ``((prediction - y) / std)²``
=================  ===================  ==========================================================

Labels of a batch are one float vector per image, one entry per task, ``NaN`` where the image has
no label for that task: such entries are left out of that task's loss (and so give its head no
gradient), not counted as zeros. A regression head predicts in the label's own units
(``mean + std × linear(features)``, with the training labels' mean and std), so its loss is
scale-free and tasks of different units contribute comparably before any weighting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from datamodules.errors import UserError
from datamodules.sources.base import TASK_TYPES

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class TaskSpec:
    """One task: its name, type, class names (classification/binary) and label statistics.

    ``mean`` and ``std`` (regression) are those of the training labels; the head predicts
    ``mean + std × z`` and the loss is computed on ``z``'s scale.
    """

    name: str
    type: str
    class_names: tuple[str, ...] | None = None
    mean: float = 0.0
    std: float = 1.0

    @property
    def out_features(self) -> int:
        return len(self.class_names) if self.type == "classification" else 1

    def as_dict(self) -> dict:
        """Plain python (hyper-parameters load with ``torch.load(weights_only=True)``)."""
        return {
            "type": self.type,
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "mean": float(self.mean),
            "std": float(self.std),
        }


def parse_tasks(tasks: Mapping) -> dict[str, TaskSpec]:
    """``{name: {type, class_names, mean, std}}`` (as the data gives it) to checked specs."""
    if not tasks:
        raise UserError("A multi-task model needs at least one task: check the data's `tasks`.")
    specs = {}
    for name, conf in tasks.items():
        name = str(name)
        if not _NAME.match(name):
            raise UserError(
                f"Task name '{name}' is not usable in metric names and file names: use letters, "
                "digits, '_' or '-' (e.g. age, hair_colour)."
            )
        conf = {"type": conf} if isinstance(conf, str) else dict(conf or {})
        kind = conf.get("type")
        if kind not in TASK_TYPES:
            raise UserError(f"Task '{name}' has type '{kind}': use one of {', '.join(TASK_TYPES)}.")
        names = conf.get("class_names")
        names = tuple(str(c) for c in names) if names is not None else None
        if kind == "classification" and (names is None or len(names) < 2):
            raise UserError(f"Classification task '{name}' needs at least two classes.")
        if kind == "binary" and names is not None and len(names) != 2:
            raise UserError(f"Binary task '{name}' has {len(names)} classes: it needs exactly 2.")
        std = float(conf.get("std", 1.0))
        if not std > 0:
            raise UserError(f"Regression task '{name}' has label std {std}: it must be positive.")
        specs[name] = TaskSpec(
            name,
            kind,
            names or (("0", "1") if kind == "binary" else None),
            float(conf.get("mean", 0.0)),
            std,
        )
    return specs


class RegressionHead(nn.Module):
    """A linear head predicting ``mean + std × linear(x)``: label units, standardised fitting."""

    def __init__(self, in_features: int, *, mean: float, std: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 1)
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean + self.std * self.linear(x).squeeze(-1)


class TaskHeads(nn.Module):
    """One head per task on the same pooled features; ``forward`` gives ``{task: output}``."""

    def __init__(self, in_features: int, specs: Mapping[str, TaskSpec]) -> None:
        super().__init__()
        heads = {}
        for name, spec in specs.items():
            if spec.type == "regression":
                heads[name] = RegressionHead(in_features, mean=spec.mean, std=spec.std)
            else:
                heads[name] = nn.Linear(in_features, spec.out_features)
        self.heads = nn.ModuleDict(heads)
        self.in_features = in_features

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, head in self.heads.items():
            y = head(x)
            out[name] = y.squeeze(-1) if isinstance(head, nn.Linear) and y.shape[-1] == 1 else y
        return out


def per_sample_loss(spec: TaskSpec, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The task's loss of every (labelled) sample: ``output`` and ``labels`` hold only those."""
    if spec.type == "classification":
        return F.cross_entropy(output.float(), labels.long(), reduction="none")
    if spec.type == "binary":
        return F.binary_cross_entropy_with_logits(output.float(), labels.float(), reduction="none")
    return ((output.float() - labels.float()) / spec.std) ** 2


def task_loss(
    spec: TaskSpec, output: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Mean loss over the samples labelled for the task, and how many there were.

    Samples whose label is ``NaN`` are left out (indexed away, so they give no gradient). With
    none labelled the loss is ``0 × output.sum()``: exactly zero, yet connected to the head, so
    every parameter still gets a (zero) gradient, as distributed training expects.
    """
    labelled = ~torch.isnan(labels)
    count = int(labelled.sum())
    if count == 0:
        return output.sum() * 0.0, 0
    return per_sample_loss(spec, output[labelled], labels[labelled]).mean(), count
