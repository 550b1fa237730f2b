"""``data.cache=true``: every image file decoded once, kept in memory, never decoded again.

At setup, each split's images are decoded (JPEG draft decoding included), brought to RGB and
shrunk so that their short side is what the split needs and no more
(``ImageDataModule.short_side``: the training crops' need, the eval resize's), and kept as uint8
tensors. The pass runs in the data module's loader workers; later loader
workers (forked) share the tensors. Every epoch after that starts from decoded pixels: the
transforms, their seeding and the order of the data are unchanged. The images are shrunk with
the data's interpolation and antialiasing, so what a crop sees differs from decoding the file
whole by resampling only.

A cache that would take more than half the memory free at setup (all splits together) is
refused with the figures. Under DDP every process keeps its own copy and checks only its own.
"""

from __future__ import annotations

import logging
import os

import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.errors import UserError

log = logging.getLogger(__name__)

# the cache may take at most this share of the memory available when it is filled
MEMORY_SHARE = 0.5
# images decoded before the cache's total size is projected and checked
PROBE_IMAGES = 32


def available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _Decoded(Dataset):
    """Row ``i`` of a split, decoded as that split decodes it, as a uint8 (3, H, W) tensor whose
    short side is at most ``short_side``."""

    def __init__(self, split, short_side: int, interpolation) -> None:
        self.split, self.short_side, self.interpolation = split, int(short_side), interpolation

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, row: int) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        from datamodules.transforms import ToRGB, ToTensor

        image = ToTensor()(ToRGB()(self.split._load(row)))
        if min(image.shape[-2:]) > self.short_side:
            image = TF.resize(image, self.short_side, self.interpolation, antialias=True)
        return image.contiguous()


def fill_cache(
    split, *, short_side: int, interpolation, num_workers: int, name: str, budget: float | None
) -> list:
    """Every image of ``split`` decoded and shrunk (see the module), in row order.

    Raises UserError when the split would take more than ``budget`` bytes: projected from the
    first :data:`PROBE_IMAGES` images, and checked again as every image arrives.
    """
    loader = DataLoader(
        _Decoded(split, short_side, interpolation), batch_size=None, num_workers=num_workers
    )
    images, total = [], 0
    for image in loader:
        # a copy in this process's own memory: a worker's tensor is a shared-memory file and a
        # memory map each, of which a process may hold only ~65,000
        images.append(image.clone() if num_workers else image)
        total += image.numel()
        n = len(images)
        projected = total / n * len(split) if n >= min(PROBE_IMAGES, len(split)) else 0.0
        if budget is not None and max(projected, total) > budget:
            raise UserError(
                f"data.cache=true would keep ~{max(projected, total) / 2**30:.1f} GiB of decoded "
                f"{name} images ({len(split)} images, short side {short_side} px), more than "
                f"the {budget / 2**30:.1f} GiB left of half the memory free: use "
                "data.cache=false, or a smaller data.image_size."
            )
    return images


def cache_splits(datamodule, *, num_workers: int | None = None) -> int:
    """Fill the cache of every split of ``datamodule`` whose images come from files; returns
    the bytes kept (0 when no split reads files: an in-memory source has nothing to cache)."""
    from datamodules.transforms import _interpolation

    interpolation = _interpolation(datamodule.interpolation)
    workers = datamodule.num_workers if num_workers is None else num_workers
    free = available_memory()  # once: what the splits may take together
    kept = 0
    for name, split in datamodule.datasets.items():
        if not getattr(split.pool.load, "sized", False):
            continue
        side = datamodule.short_side(name)
        budget = None if free is None else MEMORY_SHARE * free - kept
        split.cache = fill_cache(
            split,
            short_side=side,
            interpolation=interpolation,
            num_workers=workers,
            name=name,
            budget=budget,
        )
        kept += sum(t.numel() for t in split.cache)
    if kept:
        log.info("data.cache: %.2f GiB of decoded images kept (pid %d)", kept / 2**30, os.getpid())
    else:
        log.info("data.cache=true: nothing to cache (the source's images are already in memory)")
    return kept
