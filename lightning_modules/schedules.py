"""Learning-rate schedules as pure functions of the optimizer step.

A schedule here is a picklable callable ``factor(step) -> float`` multiplying a parameter
group's initial LR (``torch.optim.lr_scheduler.LambdaLR``). Being a pure function of the step, it
is restored exactly on resume, and every parameter group has one from the first step: groups that
start frozen are gated to 0 until their start step, then warmed up (no ``add_param_group``).
Attributes are plain numbers, so scheduler states load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

NEVER = 2**62  # start step of a group that is never trained


class WarmupCosine:
    """Linear warm-up from 0 to 1 over ``warmup_steps``, then cosine decay to ``min_ratio``.

    Gated per group: 0 before ``start_step``, then a linear ramp over ``start_warmup_steps`` (a
    group unfrozen mid-training warms up before reaching the common schedule).
    """

    def __init__(
        self,
        *,
        total_steps: int,
        warmup_steps: int = 0,
        min_ratio: float = 0.0,
        start_step: int = 0,
        start_warmup_steps: int = 0,
    ) -> None:
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, min(int(warmup_steps), self.total_steps - 1))
        self.min_ratio = float(min_ratio)
        self.start_step = int(start_step)
        self.start_warmup_steps = max(0, int(start_warmup_steps))

    def __call__(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        if step < self.warmup_steps:
            factor = (step + 1) / (self.warmup_steps + 1)
        else:
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            factor = self.min_ratio + (1 - self.min_ratio) * 0.5 * (
                1 + math.cos(math.pi * progress)
            )
        since = step - self.start_step
        if since < self.start_warmup_steps:
            factor *= (since + 1) / (self.start_warmup_steps + 1)
        return factor


def warmup_cosine(
    optimizer,
    *,
    total_steps: int,
    warmup_fraction: float = 0.0,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.0,
    group_starts: Sequence[tuple[int, int]] | None = None,
):
    """``LambdaLR`` with a :class:`WarmupCosine` factor per parameter group.

    Args:
        total_steps: optimizer steps of the whole run.
        warmup_fraction: share of ``total_steps`` warming up (``warmup_steps`` wins if given).
        min_lr_ratio: final LR as a fraction of the peak.
        group_starts: per parameter group ``(start_step, warm-up steps after start)``; groups
            start at step 0 when not given. Use :data:`NEVER` for a group that never trains.
    """
    from torch.optim.lr_scheduler import LambdaLR

    if warmup_steps is None:
        warmup_steps = round(warmup_fraction * total_steps)
    n = len(optimizer.param_groups)
    starts = list(group_starts) if group_starts is not None else [(0, 0)] * n
    if len(starts) != n:
        raise ValueError(f"group_starts has {len(starts)} entries for {n} parameter groups")
    factors = [
        WarmupCosine(
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            min_ratio=min_lr_ratio,
            start_step=start,
            start_warmup_steps=ramp,
        )
        for start, ramp in starts
    ]
    return LambdaLR(optimizer, lr_lambda=factors)
