"""How the losses of several tasks are combined into one.

- ``fixed``: ``Σ_t w_t L_t`` with configured weights ``w_t`` (default 1 each).
- ``uncertainty``: Kendall, Gal & Cipolla 2018 ("Multi-task learning using uncertainty to weigh
  losses"): each task ``t`` has a learned ``s_t = log σ_t²`` and contributes the negative
  log-likelihood of its homoscedastic noise model,

      regression (Gaussian):             ½ exp(-s_t) L_t + ½ s_t
      classification/binary (softmax):     exp(-s_t) L_t + ½ s_t

  so a task with a large loss gets a large ``σ_t`` and a small weight, and ``½ s_t`` stops
  ``σ_t`` from growing without bound (for a given ``L_t`` the optimum is ``exp(s_t) = 2 c_t L_t``
  with ``c_t`` the factor in front: ``σ_t² = L_t`` for regression). The ``s_t`` start
  at 0 (weight 1, or ½ for regression), train with the heads and are not weight-decayed.

A task without a labelled sample in the batch contributes nothing (not even ``½ s_t``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from datamodules.errors import UserError
from lightning_modules.task_heads import TaskSpec

WEIGHTINGS = ("fixed", "uncertainty")


class FixedWeighting(nn.Module):
    """``Σ_t w_t L_t``."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        super().__init__()
        self.weights = {k: float(v) for k, v in weights.items()}

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum((self.weights[name] * loss for name, loss in losses.items()), torch.tensor(0.0))

    def effective_weights(self) -> dict[str, float]:
        """The factor each task's loss is multiplied by."""
        return dict(self.weights)


class UncertaintyWeighting(nn.Module):
    """Learned homoscedastic-uncertainty weights (Kendall et al. 2018); see the module docstring."""

    def __init__(self, specs: Mapping[str, TaskSpec]) -> None:
        super().__init__()
        self.names = list(specs)
        self.scale = {n: 0.5 if s.type == "regression" else 1.0 for n, s in specs.items()}
        self.log_vars = nn.Parameter(torch.zeros(len(self.names)))

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0 * self.log_vars.sum()  # every s_t in the graph, used or not (DDP)
        for name, loss in losses.items():
            s = self.log_vars[self.names.index(name)]
            total = total + self.scale[name] * torch.exp(-s) * loss + 0.5 * s
        return total

    def effective_weights(self) -> dict[str, float]:
        s = self.log_vars.detach().float().cpu()
        return {n: self.scale[n] * float(torch.exp(-s[i])) for i, n in enumerate(self.names)}


def build_loss_weighting(
    kind: str, specs: Mapping[str, TaskSpec], weights: Mapping[str, float] | None = None
) -> nn.Module:
    """The ``fixed`` or ``uncertainty`` weighting of ``specs``' losses.

    ``weights`` (task name → weight, default 1) apply to ``fixed``; unknown names and negative
    weights are errors.
    """
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(specs))
    if unknown:
        raise UserError(
            f"model.loss_weights names {unknown}, which are not tasks of the data "
            f"({', '.join(specs)}): use the task names."
        )
    bad = {k: v for k, v in weights.items() if not float(v) >= 0}
    if bad:
        raise UserError(f"model.loss_weights {bad}: weights must be >= 0.")
    if kind == "fixed":
        return FixedWeighting({name: float(weights.get(name, 1.0)) for name in specs})
    if kind == "uncertainty":
        return UncertaintyWeighting(specs)
    raise UserError(f"model.loss_weighting={kind}: use one of {', '.join(WEIGHTINGS)}.")
