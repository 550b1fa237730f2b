"""Learning-rate schedules as pure functions of the optimizer step.

A schedule here is a picklable callable ``factor(step) -> float`` multiplying each parameter
group's base LR (``torch.optim.lr_scheduler.LambdaLR``). Being a pure function of the step, it is
restored exactly on resume and covers every parameter group from the first step.
"""

from __future__ import annotations

import math


class WarmupCosine:
    """Linear warm-up from 0 to 1 over ``warmup_steps``, then cosine decay to ``min_ratio``."""

    def __init__(self, *, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> None:
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, min(int(warmup_steps), self.total_steps - 1))
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer,
    *,
    total_steps: int,
    warmup_fraction: float = 0.0,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.0,
):
    """``LambdaLR`` with :class:`WarmupCosine` on every parameter group.

    ``warmup_steps`` (if given) wins over ``warmup_fraction`` of ``total_steps``.
    """
    from torch.optim.lr_scheduler import LambdaLR

    if warmup_steps is None:
        warmup_steps = round(warmup_fraction * total_steps)
    factor = WarmupCosine(
        total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=min_lr_ratio
    )
    return LambdaLR(optimizer, lr_lambda=[factor] * len(optimizer.param_groups))
