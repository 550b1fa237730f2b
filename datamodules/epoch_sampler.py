"""Shuffling and augmentation that are pure functions of (seed, epoch, sample).

Lightning checkpoints do not hold random number generator states, and data-loader workers draw
their seeds from whatever state the main process is in. To make a resumed run see exactly the
same data order and the same augmented images as an uninterrupted one, whatever the number of
workers:

- :class:`EpochSampler` permutes the rows with a generator seeded by ``(seed, epoch)`` and yields
  ``(epoch, row)`` keys; Lightning calls ``set_epoch`` before every epoch;
- the dataset seeds each sample's augmentation with ``sample_seed(seed, epoch, row)`` in a forked
  RNG (see ``ImageDataModule``), so an image's augmentation does not depend on which worker loads
  it or on what ran before.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

_MASK = 2**63 - 1


def sample_seed(seed: int, epoch: int, row: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch (splitmix64 of the three numbers)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + row * 0x94D049BB133111EB) & (
        2**64 - 1
    )
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    return x & _MASK


class EpochSampler(Sampler):
    """Random order per epoch, fixed by ``(seed, epoch)``; yields ``(epoch, row)`` keys.

    ``trainer``: read the epoch from ``trainer.current_epoch`` when an epoch starts. Lightning's
    own ``set_epoch`` calls count the epochs of the current ``fit`` call, which after a resume
    is not the training epoch, so with a trainer they are ignored.
    """

    def __init__(
        self, n: int, *, seed: int, shuffle: bool = True, epoch: int = 0, trainer=None
    ) -> None:
        self.n, self.seed, self.shuffle, self.epoch = int(n), int(seed), shuffle, int(epoch)
        self.trainer = trainer

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.trainer.current_epoch if self.trainer is not None else self.epoch
        if self.shuffle:
            gen = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1))
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = range(self.n)
        for row in order:
            yield epoch, row
