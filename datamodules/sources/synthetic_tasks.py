"""A generated multi-task data set: three tasks, each readable from a different image property.

Every image is a grey background with a coloured disc and, on some, a small white marker:

============  ==============  ================================================================
task          type            what in the image tells it
============  ==============  ================================================================
brightness    regression      the background's grey level, in percent (25-75)
colour        classification  the disc's colour: red, green or blue
marker        binary          whether the white marker is there (``present``) or not
============  ==============  ================================================================

A share of the labels (``missing``, per task, independently) is left out, as in real multi-task
data where not every image is labelled for everything. Generated in memory from ``seed`` (no
download, no files), or written as PNG files + ``labels.csv`` with :func:`write_csv` to try
``data=csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from datamodules.sources.base import Pool, SourceData

COLOURS = ("red", "green", "blue")
MARKER = ("absent", "present")
TASKS = {
    "brightness": {"type": "regression", "class_names": None},
    "colour": {"type": "classification", "class_names": list(COLOURS)},
    "marker": {"type": "binary", "class_names": list(MARKER)},
}


def generate(
    n: int, *, image_size: int = 32, missing: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8, ``(n, 3, S, S)``) and labels (``(n, 3)`` float32, NaN = missing).

    Label columns: brightness (percent), colour (0 red, 1 green, 2 blue), marker (0 absent,
    1 present).
    """
    rng = np.random.default_rng(seed)
    s = int(image_size)
    brightness = rng.uniform(25.0, 75.0, n)
    colour = rng.integers(0, 3, n)
    marker = rng.integers(0, 2, n)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    images = np.empty((n, 3, s, s), dtype=np.float32)
    radius = s * 0.2
    half = max(1, round(s / 8))  # the marker is a (2·half)² square
    for i in range(n):
        img = np.full((3, s, s), brightness[i] / 100.0, dtype=np.float32)
        img += rng.normal(0.0, 0.03, size=img.shape).astype(np.float32)
        cy, cx = s / 2 + rng.uniform(-s / 10, s / 10, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        img[:, disc] = 0.0
        img[colour[i], disc] = 1.0
        if marker[i]:  # in a corner region (it may clip the edge of the disc)
            my, mx = rng.uniform(0.12, 0.25, 2) * s
            if rng.random() < 0.5:
                mx = s - mx
            if rng.random() < 0.5:
                my = s - my
            y0, x0 = int(round(my)) - half, int(round(mx)) - half
            img[:, max(0, y0) : y0 + 2 * half, max(0, x0) : x0 + 2 * half] = 1.0
        images[i] = img
    labels = np.stack([brightness, colour, marker], axis=1).astype(np.float32)
    labels[rng.random(labels.shape) < missing] = np.nan
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), labels


class SyntheticTasksSource:
    """The generated data set above, in memory: ids ``synthetic/<index>``.

    Args:
        n: number of images.
        image_size: side of the square images, pixels.
        missing: share of each task's labels left out.
        seed: generation seed (images and labels; not the split, that is ``data.split_seed``).

    After :meth:`load`, :attr:`tasks` holds ``{task: {"type", "class_names"}}``.
    """

    def __init__(
        self, *, n: int = 600, image_size: int = 32, missing: float = 0.2, seed: int = 0
    ) -> None:
        self.n, self.image_size, self.missing, self.seed = int(n), int(image_size), missing, seed
        self.tasks: dict[str, dict] | None = None

    def load(self) -> SourceData:
        import torch

        images, labels = generate(
            self.n, image_size=self.image_size, missing=self.missing, seed=self.seed
        )
        colour = labels[:, 1]
        strat = np.where(np.isnan(colour), 0, colour).astype(np.int64)  # stratify by colour
        self.tasks = {k: dict(v) for k, v in TASKS.items()}
        pool = Pool(
            load=torch.from_numpy(images).__getitem__,
            targets=strat,
            ids=[f"synthetic/{i}" for i in range(self.n)],
            labels=labels,
        )
        return SourceData(class_names=[f"colour={c}" for c in COLOURS], train=pool)


def write_csv(
    folder: str | Path, *, n: int = 600, image_size: int = 32, missing: float = 0.2, seed: int = 0
) -> Path:
    """Write the generated images as PNGs and their labels as ``<folder>/labels.csv``.

    Columns: ``image`` (relative path), ``brightness``, ``colour`` (red/green/blue), ``marker``
    (absent/present); missing labels are empty cells. Returns the CSV's path.
    """
    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, labels = generate(n, image_size=image_size, missing=missing, seed=seed)
    path = folder / "labels.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "brightness", "colour", "marker"])
        for i in range(n):
            name = f"images/{i:05d}.png"
            Image.fromarray(np.transpose(images[i], (1, 2, 0))).save(folder / name)
            b, c, m = labels[i]
            writer.writerow(
                [
                    name,
                    "" if np.isnan(b) else f"{b:.2f}",
                    "" if np.isnan(c) else COLOURS[int(c)],
                    "" if np.isnan(m) else MARKER[int(m)],
                ]
            )
    return path
