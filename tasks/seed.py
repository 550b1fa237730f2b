"""One seed for python, numpy, torch and the loader workers of a run."""

from __future__ import annotations

from datamodules.errors import UserError

SEED_RANGE = (0, 2**32 - 1)  # what NumPy accepts


def seed_run(seed: int | None) -> int:
    """Seed python, numpy, torch and data-loader workers; ``None`` draws a seed (and logs it)."""
    import pytorch_lightning as pl

    if seed is not None and not (isinstance(seed, int) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise UserError(
            f"seed={seed} is not a valid seed: use an integer from {SEED_RANGE[0]} to "
            f"{SEED_RANGE[1]}, or seed=null for a random one."
        )
    return pl.seed_everything(seed, workers=True)
