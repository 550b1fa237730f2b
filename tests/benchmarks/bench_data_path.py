"""The per-image cost of seeded augmentation in the data path (issue: 130 us of 187 us/image).

    RUN_BENCHMARKS=1 python -m pytest tests/benchmarks/bench_data_path.py -s

A training sample's randomness is seeded from ``(seed, epoch, row)`` for exact resume. Prints the
median over interleaved repeats (1 thread) of the time per image of: the transform alone, a
training item (load + seeded transform), and the former seeding (``fork_rng`` +
``torch.manual_seed``). Target: the seeding adds at most 10 us per image, within the repeats'
spread.
"""

from __future__ import annotations

import statistics
import time

import torch

from datamodules import ImageDataModule
from datamodules.epoch_sampler import sample_seed
from datamodules.sources import DigitsSource

TARGET_US = 10.0
N, REPEATS = 400, 7


def _per_image(fn) -> float:
    start = time.perf_counter()
    for row in range(N):
        fn(row)
    return (time.perf_counter() - start) / N * 1e6


def test_seeding_a_sample_costs_microseconds():
    torch.set_num_threads(1)
    dm = ImageDataModule(source=DigitsSource(image_size=32), image_size=32, augment=None)
    dm.setup()
    ds = dm.datasets["train"]
    images = [ds.pool.load(int(ds.indices[r])) for r in range(N)]

    def transform_only(row):
        ds.transform(images[row])

    def item(row):
        ds[(1, row)]

    def load_and_transform(row):
        ds.transform(ds.pool.load(int(ds.indices[row])))

    def former(row):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(ds.seed, 1, row))
            ds.transform(images[row])

    cases = {
        "transform": transform_only,
        "load+transform": load_and_transform,
        "item": item,
        "former seeding+transform": former,
    }
    times = {name: [] for name in cases}
    for _ in range(REPEATS):  # interleaved: load on the machine hits every case alike
        for name, fn in cases.items():
            times[name].append(_per_image(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: max(v) - min(v) for k, v in times.items()}
    print()
    for name in cases:
        print(f"{name:>26}: {med[name]:7.1f} us/image (spread {spread[name]:.1f})")
    overhead = med["item"] - med["load+transform"]
    print(
        f"{'seeding now':>26}: {overhead:7.1f} us/image; "
        f"formerly {med['former seeding+transform'] - med['transform']:.1f}"
    )
    assert overhead <= TARGET_US + spread["item"] + spread["load+transform"]
