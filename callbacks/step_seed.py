"""Reseed the random number generators before every training step from (seed, step).

Lightning checkpoints do not hold the random number generators' states, so after a resume
dropout and any other randomness in the training step would differ from an uninterrupted run.
Seeding Python, NumPy and torch before each step with a value mixed from the run's seed and the
global step makes each step's randomness a pure function of (seed, step). (Data order and
augmentation are fixed per (seed, epoch, sample) by ``datamodules.epoch_sampler``.)
"""

from __future__ import annotations

import random

import numpy as np
import pytorch_lightning as pl
import torch

from datamodules.epoch_sampler import sample_seed


class StepSeed(pl.Callback):
    """Seed python, numpy and torch with ``mix(seed, global step)`` before each training batch."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        value = sample_seed(self.seed, trainer.global_step, -2)
        random.seed(value)
        np.random.seed(value % 2**32)
        if pl_module.device.type == "cpu":
            # only the generator a CPU step draws from: ``torch.manual_seed`` also queues a seed
            # for every accelerator not yet started, formatting the call stack each time (~2 ms
            # per step inside Lightning, a quarter of the project's per-step overhead)
            torch.default_generator.manual_seed(value)
        else:
            torch.manual_seed(value)  # the accelerator's generators too (started: cheap)
