"""The learning-rate range test (Smith 2017; fastai's ``lr_find``), over layer groups.

The LR grows exponentially from ``min_lr`` to ``max_lr`` over ``steps`` optimizer steps, one batch
each; the loss is smoothed (bias-corrected exponential average) and the test stops once it exceeds
``diverge`` times its minimum. Every optimizer group keeps its ``lr_mult``: a group's LR is the
swept LR times its multiplier, so discriminative LRs are tested as they will train (Lightning's
``Tuner.lr_find`` sets every group to the same LR, losing them).

The suggestion is the LR at the smoothed loss's minimum divided by 10 (``minimum / 10``, fastai's
rule): well below divergence, in the steep part of the curve. The steepest descent is reported too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class LRFinding:
    """The curve of a range test and what it suggests."""

    lrs: list[float]
    losses: list[float]  # smoothed
    minimum: float  # the LR at the smoothed loss's minimum
    steepest: float  # the LR of the steepest descent (before the minimum)
    suggestion: float  # minimum / 10
    diverged: bool  # the test stopped on divergence (not at max_lr)

    def as_dict(self) -> dict:
        keys = ("suggestion", "minimum", "steepest", "diverged", "lrs", "losses")
        return {k: getattr(self, k) for k in keys}


def plot_findings(findings: dict[str, LRFinding], path: str | Path, *, title: str = "") -> Path:
    """One curve per strategy on a log-LR axis, each suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, f in findings.items():
        (line,) = ax.plot(f.lrs, f.losses, label=f"{name}: suggested {f.suggestion:.2g}")
        ax.axvline(f.suggestion, color=line.get_color(), ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (the head's; other groups x their multiplier)")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def lr_range_test(
    optimizer: torch.optim.Optimizer,
    loss_of: Callable[[object], torch.Tensor],
    batches: Iterable,
    *,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    steps: int = 100,
    beta: float = 0.9,
    diverge: float = 4.0,
) -> LRFinding:
    """Run the test with ``optimizer`` (its groups' ``lr_mult`` kept) on ``loss_of(batch)``.

    ``batches`` is cycled if it has fewer than ``steps`` batches. The caller restores the
    weights afterwards (the test trains them).
    """
    if not 0 < min_lr < max_lr:
        raise ValueError(f"lr_find needs 0 < min_lr < max_lr, got {min_lr}, {max_lr}")
    steps = max(int(steps), 5)
    ratio = (max_lr / min_lr) ** (1 / (steps - 1))
    lrs, losses, average, best, diverged = [], [], 0.0, math.inf, False
    for step, batch in zip(range(steps), _cycle(batches), strict=False):
        lr = min_lr * ratio**step
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            diverged = True
            break
        loss.backward()
        optimizer.step()
        average = beta * average + (1 - beta) * value
        smoothed = average / (1 - beta ** (step + 1))
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if step > 0 and smoothed > diverge * best:
            diverged = True
            break
    if len(losses) < 3:
        raise ValueError(
            f"the loss diverged within {len(losses)} steps from lr={min_lr:g}: lower min_lr"
        )
    at_min = min(range(len(losses)), key=losses.__getitem__)
    skip = max(1, len(losses) // 10)  # the first points are mostly the average warming up
    slopes = {
        i: (losses[i + 1] - losses[i - 1]) / math.log(lrs[i + 1] / lrs[i - 1])
        for i in range(skip, at_min)
    }
    steepest = lrs[min(slopes, key=slopes.__getitem__)] if slopes else lrs[at_min]
    return LRFinding(
        lrs=lrs,
        losses=losses,
        minimum=lrs[at_min],
        steepest=steepest,
        suggestion=lrs[at_min] / 10,
        diverged=diverged,
    )


def _cycle(batches: Iterable):
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            return
