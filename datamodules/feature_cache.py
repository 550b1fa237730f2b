"""Frozen-feature cache: run a frozen backbone once, then train the head on its features.

While the backbone is frozen (``finetune=linear_probe``: the whole run; ``finetune=progressive``:
the head-only stage before the first group is unfrozen), every epoch would push the same images
through the same frozen backbone. Instead, each split's pooled features (``forward_features`` →
``forward_head(pre_logits=True)``, the input of the classifier) are computed once with the eval
transform and the head trains on them: the result of the uncached path without training
augmentation, at a fraction of the cost. Augmentation (if any) applies from the first unfrozen
stage on; ``finetune.cache_features=false`` augments the frozen phase too, at full cost.

Features are kept in memory for the process (a multirun computes them once) and in
``<cache dir>/<key>.pt``; the key hashes the backbone's actual weights, the data (source, split,
ids) and the transform, so any change computes them anew. Files load with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.atomic_file import atomic_file
from datamodules.epoch_sampler import EpochSampler

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_MEMORY: dict[str, dict[str, torch.Tensor]] = {}


def weights_fingerprint(module: torch.nn.Module, *, head: Sequence[str] = ()) -> str:
    """Hash of the backbone's weights and buffers, the head's parameters (``head``: their names,
    the new head that trains on the features) left out."""
    head = {n.rsplit(".", 1)[0] for n in head}
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        if name.rsplit(".", 1)[0] in head:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_key(net: torch.nn.Module, datamodule, *, head: Sequence[str] = ()) -> str:
    """Hash of the backbone weights, the data (ids of every split and, for image files, each
    file's size and times: a file replaced under the same name is a new key) and the eval
    transform."""
    desc = {
        "backbone": type(net).__name__,
        "weights": weights_fingerprint(net, head=head),
        "transform": repr(datamodule.eval_transform()),
        "classes": datamodule.class_names,
        "ids": {s: hashlib.sha1("\n".join(datamodule.ids(s)).encode()).hexdigest() for s in SPLITS},
    }
    files = {}
    for split in SPLITS:
        ds = datamodule.datasets.get(split)
        if ds is not None and hasattr(ds.pool.load, "stamp"):
            files[split] = ds.pool.load.stamp(ds.indices)
    if files:  # sources held in memory (digits, torchvision sets) are named by their ids alone
        desc["files"] = files
    return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:20]


@torch.no_grad()
def compute_features(
    net: torch.nn.Module, datamodule, split: str, *, batch_size: int = 256
) -> torch.Tensor:
    """Pooled pre-logit features of every image of ``split`` (eval transform, eval mode)."""
    ds = datamodule.datasets[split]
    plain = type(ds)(ds.pool, ds.indices, ds.targets, datamodule.eval_transform())
    loader = DataLoader(
        plain, batch_size=batch_size, shuffle=False, num_workers=datamodule.num_workers
    )
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    chunks = []
    for x, _, _ in loader:
        chunks.append(
            net.forward_head(net.forward_features(x.to(device)), pre_logits=True).float().cpu()
        )
    net.train(was_training)
    return torch.cat(chunks)


def cached_features(
    net: torch.nn.Module, datamodule, *, cache_dir: str | Path | None, head: Sequence[str] = ()
) -> dict:
    """``{split: features}`` from memory, the cache file, or computed (and stored) now; ``head``
    names the parameters the features do not depend on."""
    key = cache_key(net, datamodule, head=head)
    if key in _MEMORY:
        log.info("Frozen features: reusing the in-memory cache (%s)", key)
        return _MEMORY[key]
    path = Path(cache_dir) / f"{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        feats = torch.load(path, map_location="cpu", weights_only=True)
        log.info("Frozen features: loaded %s", path)
    else:
        feats = {split: compute_features(net, datamodule, split) for split in SPLITS}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as f:  # processes may compute the same features at once
                torch.save(feats, f)
            log.info("Frozen features: computed once and cached in %s", path)
    _MEMORY[key] = feats
    return feats


def feature_data(
    model, datamodule, *, head: Sequence[str], unfreeze, trainer, cache_dir
) -> pl.LightningDataModule:
    """The data module to fit on: cached features while the backbone is frozen, else images.

    ``head``: the names of ``model.net``'s head parameters (what trains on the features).
    ``unfreeze``: the run's ``ProgressiveUnfreeze`` (its plan says how long the head trains
    alone), or ``None`` (linear probe without one: frozen for the whole run).
    """
    until = None  # frozen for the whole run
    if unfreeze is not None:
        plan = unfreeze.make_plan(model.net, max_epochs=trainer.max_epochs)
        until = min((e for e in plan.unfreeze_epochs[:-1] if e is not None), default=None)
    if until == 0:
        log.info("Frozen features: not cached, the backbone trains from the first epoch.")
        return datamodule
    if until is not None and trainer.world_size > 1:
        log.info("Frozen features: not cached for the head-only stage under DDP; images instead.")
        return datamodule
    if datamodule.augments:
        stage = "the whole run" if until is None else f"epochs 0-{until - 1}"
        later = "" if until is None else f"; augmentation applies from epoch {until} on"
        log.info(
            "Frozen features: the head trains on un-augmented images for %s%s "
            "(finetune.cache_features=false augments every epoch, at full cost).",
            stage,
            later,
        )
    features = cached_features(model.net, datamodule, cache_dir=cache_dir, head=head)
    return FeatureDataModule(features, datamodule, until_epoch=until)


class FeatureDataset(Dataset):
    """``(feature, target, row)`` items, keyed like the image datasets (``(epoch, row)`` too)."""

    def __init__(self, features: torch.Tensor, targets) -> None:
        # class indices (int64), or multi-task label vectors (float32, NaN = no label)
        self.features, self.targets = features, torch.as_tensor(targets)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, key):
        row = key[1] if isinstance(key, tuple) else key
        return self.features[row], self.targets[row], row


class FeatureDataModule(pl.LightningDataModule):
    """Cached features in place of images, in the same splits, rows and training order.

    ``until_epoch=None`` (linear probe): features for the whole run, validation included.
    ``until_epoch=k`` (progressive): training batches are features before epoch ``k`` and images
    from it on; validation and test always see images (the image data module's hooks, such as
    on-device augmentation, apply to image batches).
    """

    def __init__(
        self,
        features: dict[str, torch.Tensor],
        image_datamodule,
        *,
        until_epoch: int | None = None,
    ) -> None:
        super().__init__()
        self.dm = image_datamodule
        self.until_epoch = until_epoch
        self.datasets = {
            s: FeatureDataset(features[s], _batch_targets(image_datamodule.datasets[s]))
            for s in SPLITS
        }

    def _feature_loader(self, split: str):
        ds = self.datasets[split]
        if split != "train":
            return DataLoader(ds, batch_size=self.dm.eval_batch_size)
        trainer = getattr(self, "trainer", None)
        batch_size = self.dm.batch_size
        # the image loader's rule (a last batch of one sample is dropped): same batches per epoch
        drop_last = len(ds) > batch_size and len(ds) % batch_size == 1
        sampler = EpochSampler(len(ds), seed=self.dm.seed, trainer=trainer)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last)

    def train_dataloader(self):
        features = self._feature_loader("train")
        if self.until_epoch is None:
            return features
        self.dm.trainer = self.trainer  # the image loader's sampler and hooks read the epoch
        return HeadStageLoader(
            features, self.dm.train_dataloader(), until_epoch=self.until_epoch, trainer=self.trainer
        )

    def val_dataloader(self) -> DataLoader:
        if self.until_epoch is None:
            return self._feature_loader("val")
        self.dm.trainer = self.trainer
        return self.dm.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        if self.until_epoch is None:
            return self._feature_loader("test")
        return self.dm.test_dataloader()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if batch[0].ndim == 2:  # features: nothing to augment
            return batch
        return self.dm.on_after_batch_transfer(batch, dataloader_idx)


class HeadStageLoader:
    """Training batches of cached features before ``until_epoch``, of images from it on.

    Both loaders draw rows in the same order (``EpochSampler``, same seed) and have the same
    number of batches, so the epoch's data is the same either way, only its form differs.
    """

    def __init__(self, features: DataLoader, images: DataLoader, *, until_epoch: int, trainer):
        if len(features) != len(images):  # guards the invariant above
            raise RuntimeError(f"{len(features)} feature batches vs {len(images)} image batches")
        self.features, self.images = features, images
        self.until_epoch, self.trainer = int(until_epoch), trainer

    def __len__(self) -> int:
        return len(self.features)

    def __iter__(self):
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return iter(self.features if epoch < self.until_epoch else self.images)


def _batch_targets(dataset):
    """What the image dataset puts in batches as targets: label vectors or class indices."""
    labels = getattr(dataset, "labels", None)
    return labels if labels is not None else dataset.targets
