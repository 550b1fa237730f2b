"""Data for multi-task models: every image has one label per task (or none for some tasks).

The same splits, transforms, loaders and seeded augmentation as :class:`ImageDataModule`; only
the targets differ: a batch is ``(x, labels, row)`` with ``labels`` of shape ``(B, T)``, float32,
one column per task in the order of :attr:`MultiTaskDataModule.tasks`, ``NaN`` where an image
has no label for a task (class indices for classification and binary tasks, values for
regression). Splits are stratified by the source's ``stratify`` task.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from datamodules.errors import UserError
from datamodules.image_datamodule import ImageDataModule, SplitDataset

log = logging.getLogger(__name__)


class TaskDataset(SplitDataset):
    """A split whose target is each image's label vector (float32, ``NaN`` = no label)."""

    def __init__(self, pool, indices, targets, transform, **kwargs) -> None:
        super().__init__(pool, indices, targets, transform, **kwargs)
        if pool.labels is None:
            raise UserError(
                "This data source has one label per image: multi-task data needs a source with "
                "one column per task (data=csv)."
            )
        self.labels = np.ascontiguousarray(pool.labels[indices], dtype=np.float32)

    def __getitem__(self, key):
        image, _, row = super().__getitem__(key)
        return image, torch.from_numpy(self.labels[row]), row


class MultiTaskDataModule(ImageDataModule):
    """:class:`ImageDataModule` with a label vector per image (``data=csv``).

    After :meth:`setup`, :attr:`tasks` is ``{task: {"type", "class_names", "mean", "std"}}``
    (``mean``/``std`` of the training labels, for regression tasks): what a
    :class:`~lightning_modules.multitask.MultiTaskModel` is built for.
    """

    dataset_class = TaskDataset

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tasks: dict[str, dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        super().setup(stage)
        schema = getattr(self.source, "tasks", None)
        if not schema:
            raise UserError(
                f"{type(self.source).__name__} gives one label per image: multi-task data needs "
                "a source with one column per task (data=csv)."
            )
        train = self.datasets["train"].labels
        tasks = {}
        for index, (name, spec) in enumerate(schema.items()):
            column = train[:, index]
            known = column[~np.isnan(column)]
            if len(known) == 0:
                raise UserError(
                    f"No training image has a label for task '{name}': label some training "
                    "images or remove the task."
                )
            entry = {"type": spec["type"], "class_names": spec.get("class_names")}
            if spec["type"] == "regression":
                std = float(known.std()) if len(known) > 1 else 0.0
                entry.update(mean=float(known.mean()), std=std if std > 0 else 1.0)
            tasks[name] = entry
            counts = ", ".join(
                f"{s} {int((~np.isnan(d.labels[:, index])).sum())}/{len(d)}"
                for s, d in self.datasets.items()
            )
            log.info("Task %s (%s): labelled images %s", name, spec["type"], counts)
        self.tasks = tasks
