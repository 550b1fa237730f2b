"""Frozen-feature cache: run a frozen backbone once, then train the head on its features.

When the backbone stays frozen for the whole run (``finetune=linear_probe``) and the training
images are not augmented, every epoch would push the same images through the same frozen
backbone. Instead, each split's pooled features (``forward_features`` → ``forward_head(
pre_logits=True)``, the input of the classifier) are computed once with the eval transform and
the head trains on them: the same result as the uncached path, at a fraction of the cost.

Features are kept in memory for the process (a multirun computes them once) and in
``<cache dir>/<key>.pt``; the key hashes the backbone's actual weights, the data (source, split,
ids) and the transform, so any change computes them anew. Files load with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.epoch_sampler import EpochSampler

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_MEMORY: dict[str, dict[str, torch.Tensor]] = {}


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Hash of the backbone's weights and buffers, the classifier (the new head) left out."""
    from lightning_modules.layer_groups import layer_groups

    head = {n.rsplit(".", 1)[0] for n in layer_groups(module)[-1].param_names}
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        if name.rsplit(".", 1)[0] in head:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_key(net: torch.nn.Module, datamodule) -> str:
    """Hash of the backbone weights, the data (ids of every split) and the eval transform."""
    desc = {
        "backbone": type(net).__name__,
        "weights": weights_fingerprint(net),
        "transform": repr(datamodule.eval_transform()),
        "classes": datamodule.class_names,
        "ids": {s: hashlib.sha1("\n".join(datamodule.ids(s)).encode()).hexdigest() for s in SPLITS},
    }
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


def cached_features(net: torch.nn.Module, datamodule, *, cache_dir: str | Path | None) -> dict:
    """``{split: features}`` from memory, the cache file, or computed (and stored) now."""
    key = cache_key(net, datamodule)
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
            tmp = path.with_name(path.name + ".tmp")
            torch.save(feats, tmp)
            os.replace(tmp, path)  # never a half-written cache file
            log.info("Frozen features: computed once and cached in %s", path)
    _MEMORY[key] = feats
    return feats


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
    """Cached features in place of images, in the same splits, rows and training order."""

    def __init__(self, features: dict[str, torch.Tensor], image_datamodule) -> None:
        super().__init__()
        self.dm = image_datamodule
        self.datasets = {
            s: FeatureDataset(features[s], _batch_targets(image_datamodule.datasets[s]))
            for s in SPLITS
        }

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        sampler = EpochSampler(len(ds), seed=self.dm.seed, trainer=getattr(self, "trainer", None))
        return DataLoader(ds, batch_size=self.dm.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["val"], batch_size=self.dm.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["test"], batch_size=self.dm.eval_batch_size)


def _batch_targets(dataset):
    """What the image dataset puts in batches as targets: label vectors or class indices."""
    labels = getattr(dataset, "labels", None)
    return labels if labels is not None else dataset.targets
