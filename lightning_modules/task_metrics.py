"""Per-task metrics of a multi-task model, and one combined score to rank checkpoints by.

Per task, over the samples labelled for it (``NaN`` labels are skipped):

- ``classification`` / ``binary``: ``acc`` (accuracy) and ``loss`` (mean cross-entropy, the NLL);
- ``regression``: ``mae`` and ``rmse`` (in the label's units), ``r2`` (coefficient of
  determination, 1 - SSE / SST) and ``loss`` (mean squared error on the standardised scale).

``score`` is the mean over tasks of ``acc`` (classification, binary) or ``r2`` (regression):
higher is better, 1 is perfect, and a task's units do not matter. Tasks without a labelled sample
are left out of it.

Everything is kept as sums (summed across processes under DDP), so the metrics are exact over the
whole epoch, whatever the batch sizes and however the labels are spread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torchmetrics import Metric

from lightning_modules.task_heads import TaskSpec, per_sample_loss

# sums kept per task
CLASS_SUMS = ("n", "correct", "loss")
REGRESSION_SUMS = ("n", "abs_err", "sq_err", "y", "y2", "loss")


def task_predictions(spec: TaskSpec, output: torch.Tensor) -> torch.Tensor:
    """Class index (classification, binary) or value (regression) from a head's output."""
    if spec.type == "classification":
        return output.argmax(dim=-1)
    if spec.type == "binary":
        return (output > 0).long()
    return output


class TaskMetrics(Metric):
    """Sums per task; :meth:`compute` gives ``{"<task>/<metric>": value, "score": value}``."""

    full_state_update = False

    def __init__(self, specs: Mapping[str, TaskSpec]) -> None:
        super().__init__()
        self.specs = dict(specs)
        for name, spec in self.specs.items():
            size = len(REGRESSION_SUMS if spec.type == "regression" else CLASS_SUMS)
            self.add_state(
                f"sums_{name}", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> None:
        for index, (name, spec) in enumerate(self.specs.items()):
            column = labels[:, index]
            labelled = ~torch.isnan(column)
            if not bool(labelled.any()):
                continue
            out = outputs[name].detach()[labelled]
            y = column[labelled]
            loss = per_sample_loss(spec, out, y).double().sum()
            n = float(labelled.sum())
            if spec.type == "regression":
                err = out.double() - y.double()
                y = y.double()
                row = torch.stack(
                    [
                        torch.tensor(n, dtype=torch.float64, device=err.device),
                        err.abs().sum(),
                        (err**2).sum(),
                        y.sum(),
                        (y**2).sum(),
                        loss,
                    ]
                )
            else:
                correct = (task_predictions(spec, out) == y.long()).sum().double()
                row = torch.stack(
                    [torch.tensor(n, dtype=torch.float64, device=correct.device), correct, loss]
                )
            sums = getattr(self, f"sums_{name}")
            setattr(self, f"sums_{name}", sums + row.to(sums.device))

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, float] = {}
        scores = []
        for name, spec in self.specs.items():
            sums = getattr(self, f"sums_{name}").double().cpu().tolist()
            if spec.type == "regression":
                n, abs_err, sq_err, sy, sy2, loss = sums
                if n == 0:
                    values = dict.fromkeys(("mae", "rmse", "r2", "loss"), math.nan)
                else:
                    sst = sy2 - sy * sy / n
                    r2 = 1.0 - sq_err / sst if n > 1 and sst > 0 else math.nan
                    values = {
                        "mae": abs_err / n,
                        "rmse": math.sqrt(sq_err / n),
                        "r2": r2,
                        "loss": loss / n,
                    }
                score = values["r2"]
            else:
                n, correct, loss = sums
                values = {
                    "acc": correct / n if n else math.nan,
                    "loss": loss / n if n else math.nan,
                }
                score = values["acc"]
            out.update({f"{name}/{k}": v for k, v in values.items()})
            if not math.isnan(score):
                scores.append(score)
        out["score"] = sum(scores) / len(scores) if scores else math.nan
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}


def metric_names(specs: Mapping[str, TaskSpec]) -> list[str]:
    """The keys :meth:`TaskMetrics.compute` returns (without the stage prefix)."""
    names = []
    for name, spec in specs.items():
        keys = ("mae", "rmse", "r2", "loss") if spec.type == "regression" else ("acc", "loss")
        names += [f"{name}/{k}" for k in keys]
    return [*names, "score"]
