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

``data.cache=disk`` keeps the same decoded images in one file per split under
``data.cache_dir`` instead, memory-mapped: pages are read as they are used and shared by every
process on the machine (loader workers, the members of a multirun, DDP ranks), and the next run
on the same images starts from them without decoding a file. A split's file is named by a
digest of everything its pixels depend on (each image file's path, size, modification and change
times, in row order; the decode and cache sizes; the interpolation; the Pillow, torch and
torchvision versions), so a changed
image, split or input size gets a file of its own and is never served stale pixels. The file
and its index are written to temporary names and renamed into place, the index last: a file
whose index is missing or does not match its size is decoded again. Processes that need the
same file take turns on a lock file beside it: the first decodes, the others (DDP ranks, jobs of
a parallel sweep) wait and map what it wrote. It is refused when it would
take more than half the free space of ``cache_dir``. Files are never changed in place (a running
process maps them); files of images that changed stay until ``cache_dir`` is emptied.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.atomic_file import atomic_file
from datamodules.errors import UserError

log = logging.getLogger(__name__)

# the cache may take at most this share of the memory available when it is filled
MEMORY_SHARE = 0.5
# images decoded before the cache's total size is projected and checked
PROBE_IMAGES = 32
# the layout of a data.cache=disk file and its index; a change makes every old file a miss
DISK_FORMAT = 1


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
    split,
    *,
    short_side: int,
    interpolation,
    num_workers: int,
    name: str,
    budget: float | None,
    sink: Callable[[torch.Tensor], None] | None = None,
    room: str = "half the memory free",
) -> list:
    """Every image of ``split`` decoded and shrunk (see the module), in row order: returned, or
    handed to ``sink`` one by one (then the list is empty).

    Raises UserError when the split would take more than ``budget`` bytes (``room`` says what
    the budget is): projected from the first :data:`PROBE_IMAGES` images, and checked again as
    every image arrives.
    """
    loader = DataLoader(
        _Decoded(split, short_side, interpolation), batch_size=None, num_workers=num_workers
    )
    images, total = [], 0
    for n, image in enumerate(loader, start=1):
        total += image.numel()
        projected = total / n * len(split) if n >= min(PROBE_IMAGES, len(split)) else 0.0
        if budget is not None and max(projected, total) > budget:
            mode = "true" if sink is None else "disk"
            raise UserError(
                f"data.cache={mode} would keep ~{max(projected, total) / 2**30:.1f} GiB of "
                f"decoded {name} images ({len(split)} images, short side {short_side} px), more "
                f"than the {budget / 2**30:.1f} GiB left of {room}: use data.cache=false, or a "
                "smaller data.image_size."
            )
        if sink is not None:
            sink(image)
        else:
            # a copy in this process's own memory: a worker's tensor is a shared-memory file
            # and a memory map each, of which a process may hold only ~65,000
            images.append(image.clone() if num_workers else image)
    return images


def cache_splits(
    datamodule, *, num_workers: int | None = None, where: str = "memory", cache_dir=None
) -> int:
    """Fill the cache of every split of ``datamodule`` whose images come from files, in memory
    or (``where="disk"``) in files under ``cache_dir``; returns the bytes kept (0 when no split
    reads files: an in-memory source has nothing to cache)."""
    from datamodules.transforms import _interpolation

    interpolation = _interpolation(datamodule.interpolation)
    workers = datamodule.num_workers if num_workers is None else num_workers
    if where == "disk":
        cache_dir = Path(cache_dir)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(
                f"data.cache_dir={cache_dir}: cannot make it ({err.strerror or err}); set "
                "data.cache_dir to a folder you can write on a local disk."
            ) from err
        free = shutil.disk_usage(cache_dir).free
    else:
        free = available_memory()  # once: what the splits may take together
    kept, found = 0, []
    for name, split in datamodule.datasets.items():
        if not getattr(split.pool.load, "sized", False):
            continue
        side = datamodule.short_side(name)
        budget = None if free is None else MEMORY_SHARE * free - kept
        fill = dict(short_side=side, interpolation=interpolation, num_workers=workers, name=name)
        if where == "disk":
            split.cache, written = disk_cache(split, cache_dir=cache_dir, budget=budget, **fill)
            kept += written
            found += [] if written else [name]
        else:
            split.cache = fill_cache(split, budget=budget, **fill)
            kept += sum(t.numel() for t in split.cache)
    if where == "disk" and (kept or found):
        reused = f"; {', '.join(found)} found there already" if found else ""
        log.info("data.cache=disk: %.2f GiB decoded into %s%s", kept / 2**30, cache_dir, reused)
    elif kept:
        log.info("data.cache: %.2f GiB of decoded images kept (pid %d)", kept / 2**30, os.getpid())
    else:
        log.info("data.cache: nothing to cache (the source's images are already in memory)")
    return kept


def disk_key(split, *, short_side: int, interpolation) -> str:
    """The digest that names a split's cache file: everything its pixels depend on. Bump
    :data:`DISK_FORMAT` when the decoding code (``load_rgb``, ``ToRGB``, ``_Decoded``) changes."""
    import PIL
    import torchvision

    versions = [PIL.__version__, torch.__version__, torchvision.__version__]
    head = [DISK_FORMAT, short_side, str(interpolation), split.min_short_side, *versions]
    head.append(split.pool.load.stamp(split.indices))  # every file: path, size, times
    return hashlib.sha256(json.dumps(head).encode()).hexdigest()[:32]


def disk_cache(
    split, *, cache_dir: Path, budget: float | None, short_side: int, interpolation, **fill
) -> tuple[MappedImages, int]:
    """``split``'s decoded images from its cache file, decoding and writing the file first when
    there is none that fits; returns ``(images, bytes written)``. Processes that need the same
    file take turns (a lock file beside it): one decodes, the others find its file."""
    import fcntl

    key = disk_key(split, short_side=short_side, interpolation=interpolation)
    data, index = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
    shapes = _read_index(index, data, len(split))
    if shapes is not None:  # written before: no lock needed (a read-only folder is fine)
        return MappedImages(data, shapes), 0
    try:
        lock = open(cache_dir / f"{key}.lock", "a")  # noqa: SIM115 (closed below)
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
    except OSError as err:
        raise UserError(
            f"data.cache=disk cannot lock its file in {cache_dir} ({err.strerror or err}): set "
            "data.cache_dir to a folder you can write on a local disk, or use data.cache=true."
        ) from err
    with lock:
        shapes = _read_index(index, data, len(split))
        if shapes is not None:
            return MappedImages(data, shapes), 0
        for stale in cache_dir.glob(f".{key}.*.tmp"):  # of a process killed while writing
            stale.unlink(missing_ok=True)
        shapes = _write(
            split,
            data,
            index,
            budget=budget,
            short_side=short_side,
            interpolation=interpolation,
            **fill,
        )
    return MappedImages(data, shapes), sum(_numel(s) for s in shapes)


def _write(split, data: Path, index: Path, *, budget, **fill) -> list:
    """Decode ``split`` into ``data``, then write its ``index``: each renamed into place whole
    (``atomic_file``), the index last (an index names a complete file). Returns the shapes."""
    cache_dir = data.parent
    shapes: list[list[int]] = []
    try:
        with atomic_file(data) as f:

            def write(image: torch.Tensor) -> None:
                shapes.append(list(image.shape))
                f.write(memoryview(image.numpy()))

            fill_cache(
                split, budget=budget, sink=write, room=f"half the free space in {cache_dir}", **fill
            )
        with atomic_file(index, "w") as f:
            json.dump({"format": DISK_FORMAT, "shapes": shapes}, f)
    except OSError as err:
        raise UserError(
            f"data.cache=disk could not write its file in {cache_dir} ({err.strerror or err}): "
            "free some space there, set data.cache_dir to a folder on another local disk, or use "
            "data.cache=true."
        ) from err
    return shapes


def _numel(shape) -> int:
    c, h, w = (int(n) for n in shape)
    return c * h * w


def _read_index(index: Path, data: Path, n: int) -> list | None:
    """The shapes in a cache file's index, or None when there is no complete, matching file."""
    try:
        meta = json.loads(index.read_text())
        shapes = meta["shapes"]
        expected = sum(_numel(s) for s in shapes)
        size = data.stat().st_size
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if meta.get("format") != DISK_FORMAT or len(shapes) != n or size != expected:
        return None
    return shapes


class MappedImages(Sequence):
    """A split's decoded images in its cache file: item ``row`` is a uint8 (C, H, W) view into
    the memory-mapped file. Pickled (a loader worker started by spawn or forkserver) it carries
    the path and shapes and maps the file again in the receiving process; a forked worker shares
    the parent's mapping."""

    def __init__(self, path: Path, shapes: list) -> None:
        self.path, self.shapes = str(path), [tuple(int(n) for n in s) for s in shapes]
        self.offsets = list(itertools.accumulate((_numel(s) for s in self.shapes), initial=0))
        self._flat: torch.Tensor | None = None
        self._map()

    def _map(self) -> torch.Tensor:
        if self._flat is None:
            total = self.offsets[-1]
            self._flat = (
                torch.from_file(self.path, shared=False, size=total, dtype=torch.uint8)
                if total
                else torch.empty(0, dtype=torch.uint8)
            )
        return self._flat

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, row: int) -> torch.Tensor:
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} of {len(self)} cached images")
        row %= len(self)
        start, end = self.offsets[row], self.offsets[row + 1]
        return self._map()[start:end].view(self.shapes[row])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_flat": None}
