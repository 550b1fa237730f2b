"""What every data source hands to the DataModule: labelled pools of images with stable ids."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# the kinds of label column a multi-task source can hold (and a task head can predict)
TASK_TYPES = ("classification", "binary", "regression")


@dataclass
class Pool:
    """The images of one split as a source provides them.

    Attributes:
        load: ``load(i)`` returns image ``i`` as an RGB PIL image or a uint8 tensor (3, H, W).
        targets: class index of every image, int64.
        ids: a stable, unique id per image (a relative path, ``"train/123"``, ...): predictions of
            different runs are matched by these ids.
        labels: multi-task sources only: ``(N, T)`` float32, one column per task, NaN = no
            label (``targets`` is then the class used to stratify the splits).
    """

    load: Callable[[int], object]
    targets: np.ndarray
    ids: Sequence[str]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class SourceData:
    """A data set: its class names and a training pool, plus validation/test pools if it has them.

    Missing validation or test pools are carved out of ``train`` by a stratified split.
    """

    class_names: list[str]
    train: Pool
    val: Pool | None = None
    test: Pool | None = None
