"""torchvision's classification data sets (CIFAR-10/100, Flowers-102, Oxford-IIIT Pets, ...).

They need internet the first time (``download=true``), then load from ``root``. Official splits
are used; ids are ``"<split>/<index>"`` in torchvision's order.
"""

from __future__ import annotations

import numpy as np

from datamodules.errors import UserError
from datamodules.sources.base import Pool, SourceData

# torchvision class name -> {our split: keyword arguments selecting the official split}
SPLITS = {
    "CIFAR10": {"train": {"train": True}, "test": {"train": False}},
    "CIFAR100": {"train": {"train": True}, "test": {"train": False}},
    "Flowers102": {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
    "OxfordIIITPet": {"train": {"split": "trainval"}, "test": {"split": "test"}},
    "Food101": {"train": {"split": "train"}, "test": {"split": "test"}},
    "DTD": {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
}


class DatasetLoader:
    """``loader(i)`` returns image ``i`` of a torchvision data set (picklable)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __call__(self, index: int):
        data = getattr(self.dataset, "data", None)
        if isinstance(data, np.ndarray) and data.ndim == 4:  # CIFAR: uint8 N,H,W,C in memory
            import torch

            return torch.from_numpy(data[index]).permute(2, 0, 1)
        return self.dataset[index][0].convert("RGB")


def _targets(dataset) -> np.ndarray:
    for attr in ("targets", "_labels"):
        if hasattr(dataset, attr):
            return np.asarray(getattr(dataset, attr), dtype=np.int64)
    return np.asarray([dataset[i][1] for i in range(len(dataset))], dtype=np.int64)


class TorchvisionSource:
    """A torchvision data set by class name, e.g. ``name=CIFAR10``."""

    def __init__(self, *, name: str, root: str, download: bool = True) -> None:
        if name not in SPLITS:
            raise UserError(
                f"Unknown torchvision data set '{name}': choose one of {sorted(SPLITS)}, "
                "or use data=folder for your own images."
            )
        self.name, self.root, self.download = name, root, download

    def prepare(self) -> None:
        """Download every split once (called on one process only)."""
        self._open(download=self.download)

    def _open(self, *, download: bool) -> dict:
        import torchvision.datasets as tvd

        cls = getattr(tvd, self.name)
        try:
            return {
                split: cls(root=self.root, download=download, **kwargs)
                for split, kwargs in SPLITS[self.name].items()
            }
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise UserError(
                f"{self.name} is not in '{self.root}' ({err}). Run once with internet and "
                "data.source.download=true, or point data.root at a folder that holds it."
            ) from err
        except OSError as err:  # no network
            raise UserError(
                f"Could not download {self.name} into '{self.root}' ({err}): this needs "
                "internet once; or use data=folder with images you already have."
            ) from err

    def load(self) -> SourceData:
        sets = self._open(download=False)
        train = sets["train"]
        names = list(getattr(train, "classes", []) or [])
        pools = {
            split: Pool(
                load=DatasetLoader(ds),
                targets=_targets(ds),
                ids=[f"{split}/{i}" for i in range(len(ds))],
            )
            for split, ds in sets.items()
        }
        if not names:
            names = [str(c) for c in range(int(pools["train"].targets.max()) + 1)]
        return SourceData(class_names=[str(n) for n in names], **pools)
