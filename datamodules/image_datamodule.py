"""One DataModule for every image-classification source: split, transform, load in workers."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.data_config import resolve_data_config
from datamodules.epoch_sampler import EpochSampler, sample_seed
from datamodules.errors import UserError
from datamodules.pca_jitter import (
    BatchPCAJitter,
    ColorPCA,
    batch_seed,
    describe_fit,
    load_or_fit_training_pca,
)
from datamodules.sources.base import Pool, SourceData
from datamodules.split import cap_per_class, stratified_split
from datamodules.transforms import (
    augment_options,
    build_eval_transform,
    build_train_transform,
    describe_augment,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# a JPEG decoded at a reduced scale keeps this many times the pixels its resize or crop needs:
# the resize after the decoder's own (DCT) scaling still does most of the shrinking, as Pillow's
# reducing_gap=2 does. Measured (bench_photos, 80 phone photos, EfficientNet-Lite1 with ImageNet
# weights): at 1.25 the eval views decoded at 1/8 scale and 2 of 80 predicted classes changed
# (probabilities by up to 0.076); at 2 they decode at 1/4, every class is unchanged (up to 0.040)
# and eval is still 6.7x faster than decoding whole
DECODE_MARGIN = 2.0


class SplitDataset(Dataset):
    """Rows ``indices`` of a pool, transformed: item ``i`` is ``(image, target, i)``.

    The row number ``i`` travels with the batch, so predictions can always be matched back to
    their sample ids (``ImageDataModule.ids(split)[i]``), whatever the sampler did. A key
    ``(epoch, i)`` (from :class:`EpochSampler`) seeds that sample's random augmentation with
    ``(seed, epoch, i)``, so it is the same in every worker and after a resume.
    """

    def __init__(
        self,
        pool: Pool,
        indices: np.ndarray,
        targets: np.ndarray,
        transform,
        *,
        seed: int = 0,
        min_short_side: int | None = None,
    ) -> None:
        self.pool, self.indices, self.targets, self.transform = pool, indices, targets, transform
        self.seed = seed
        # image files are decoded only as large as what is cut from them needs (JPEG draft)
        self.min_short_side = min_short_side if getattr(pool.load, "sized", False) else None
        self.cache: list | None = None  # data.cache: the decoded images, by row (image_cache.py)

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, row: int):
        if self.cache is not None:
            return self.cache[row]
        index = int(self.indices[row])
        if self.min_short_side:
            return self.pool.load(index, min_short_side=self.min_short_side)
        return self.pool.load(index)

    def __getitem__(self, key):
        epoch, row = key if isinstance(key, tuple) else (None, key)
        image = self._load(row)
        if epoch is None:
            return self.transform(image), int(self.targets[row]), row
        # the CPU generator alone, seeded then restored: what fork_rng + manual_seed did, without
        # their ~130 us per image (torch.manual_seed also seeds every accelerator backend)
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(sample_seed(self.seed, epoch, row))
        try:
            return self.transform(image), int(self.targets[row]), row
        finally:
            generator.set_state(state)


class ImageDataModule(pl.LightningDataModule):
    """Train/val/test loaders over any data source.

    Splits missing from the source are carved out of its training pool, stratified by class, with
    ``split_seed`` (independent of the training seed). ``num_classes`` and ``class_names`` come from
    the data and are available after :meth:`setup`.

    ``image_size``, ``mean``, ``std``, ``interpolation`` and ``eval_crop_pct`` left at ``None`` come
    from what the ``weights`` file records, else the timm data config of ``backbone`` (see
    :mod:`datamodules.data_config`), so a pretrained backbone sees the normalisation it was
    trained with.

    PCA colour jitter (``augment.pca``) is fitted on the training split in :meth:`setup` (cached
    under ``augment.pca.cache_dir``) and runs either per image in the workers or, with
    ``where=device``, on whole training batches in :meth:`on_after_batch_transfer`.
    """

    dataset_class = SplitDataset  # what each split is made of (subclasses change the targets)

    def __init__(
        self,
        *,
        source,
        root: str | None = None,
        classes: Sequence | None = None,
        max_per_class: int | None = None,
        split_seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        backbone: str | None = None,
        weights: str | None = None,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        eval_crop_pct: float | None = None,
        mirror_invariant: bool = True,
        augment: Mapping | None = None,
        seed: int = 0,
        draft_decode: bool = True,
        cache: bool | str = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise UserError(f"data.batch_size={batch_size}: use a positive batch size.")
        self.source, self.root = source, root
        self.classes = list(classes) if classes is not None else None
        self.max_per_class, self.split_seed = max_per_class, int(split_seed)
        self.fractions = {"val": float(val_fraction), "test": float(test_fraction)}
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size or batch_size)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.data_config = resolve_data_config(
            **dict(backbone=backbone, weights=weights, image_size=image_size),
            **dict(mean=mean, std=std, interpolation=interpolation, crop_pct=eval_crop_pct),
        )
        self.image_size = self.data_config.image_size
        self.mean, self.std = list(self.data_config.mean), list(self.data_config.std)
        self.interpolation = self.data_config.interpolation
        self.eval_crop_pct = self.data_config.crop_pct
        self.augment, self.mirror_invariant = dict(augment or {}), bool(mirror_invariant)
        self.seed = int(seed)  # the training seed: data order and augmentation
        self.draft_decode = bool(draft_decode)  # JPEGs decoded at a reduced scale when enough
        # image files decoded once, at setup, and kept in memory or on disk (image_cache.py)
        self.cache, self.cache_dir = _cache_mode(cache, cache_dir), cache_dir
        self.augment_options = augment_options(self.augment)
        self.color_pca: ColorPCA | None = None  # set in setup() when PCA jitter is on
        self.batch_augment: BatchPCAJitter | None = None  # the on-device part, training only
        self._batch_position = (-1, 0)  # (epoch, batches seen in it): seeds the device jitter
        self.class_names: list[str] | None = None
        self.source_fingerprint: str | None = None  # digest of the source's ids and labels
        self.datasets: dict[str, SplitDataset] = {}
        self._ids: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ data
    @property
    def num_classes(self) -> int:
        if self.class_names is None:
            raise RuntimeError("call setup() before asking for num_classes")
        return len(self.class_names)

    def ids(self, split: str) -> list[str]:
        """Stable sample ids of a split, in loader order (for val/test)."""
        return self._ids[split]

    def input_settings(self) -> dict:
        """What the network sees: size, normalisation, interpolation and eval crop (resolved)."""
        return {
            "image_size": int(self.image_size),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "interpolation": str(self.interpolation),
            "crop_pct": float(self.eval_crop_pct),
        }

    def prepare_data(self) -> None:
        if hasattr(self.source, "prepare"):
            self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return  # idempotent: Lightning calls setup once per stage
        data: SourceData = self.source.load()
        self.source_fingerprint = source_fingerprint(data)
        pools, indices, targets, names = self._split_rows(data)
        self.class_names = names
        self._setup_color_pca(pools["train"], indices["train"])
        self._make_datasets(pools, indices, targets)
        if self.cache:
            from datamodules.image_cache import cache_splits

            cache_splits(self, where=self.cache, cache_dir=self.cache_dir)
        sizes = ", ".join(f"{s} {len(d)}" for s, d in self.datasets.items())
        log.info("Data: %d classes; %s images (split_seed=%d)", len(names), sizes, self.split_seed)
        log.info("Input: %s", self.data_config.describe())
        log.info(
            "Augmentation: %s",
            describe_augment(self.augment_options, mirror_invariant=self.mirror_invariant),
        )

    def _split_rows(self, data: SourceData) -> tuple[dict, dict, dict, list[str]]:
        """``(pools, indices, targets, class names)`` of every split, ``classes`` applied.

        ``pools[split]`` holds the images, ``indices[split]`` the split's rows of that pool and
        ``targets[split]`` their (renumbered) classes. Splits the source lacks are carved out of
        its training pool; ``max_per_class`` caps the training split last.
        """
        names = list(data.class_names)
        pools = {"train": data.train, "val": data.val, "test": data.test}
        keep_map = self._class_map(names)
        indices: dict[str, np.ndarray] = {}
        targets: dict[str, np.ndarray] = {}
        for split, pool in pools.items():
            if pool is not None:
                rows = np.flatnonzero(keep_map[pool.targets] >= 0)
                indices[split], targets[split] = rows, keep_map[pool.targets[rows]]
        names = [n for i, n in enumerate(names) if keep_map[i] >= 0]
        self._carve_missing_splits(data.train, pools, indices, targets, names)
        if self.max_per_class:
            keep = cap_per_class(
                targets["train"],
                ids=[pools["train"].ids[i] for i in indices["train"]],
                max_per_class=int(self.max_per_class),
                seed=self.split_seed,
            )
            indices["train"], targets["train"] = indices["train"][keep], targets["train"][keep]
        return pools, indices, targets, names

    def _carve_missing_splits(
        self, train: Pool, pools: dict, indices: dict, targets: dict, names: list[str]
    ) -> None:
        """Val/test splits the source lacks, stratified out of its training pool (in place).

        A UserError when a split is still missing (its fraction is 0).
        """
        missing = {s: self.fractions[s] for s in ("val", "test") if s not in indices}
        if missing:
            base_idx, base_t = indices["train"], targets["train"]
            parts = stratified_split(
                base_t,
                ids=[train.ids[i] for i in base_idx],
                fractions=missing,
                seed=self.split_seed,
                class_names=names,
            )
            for split, rows in parts.items():
                indices[split], targets[split] = base_idx[rows], base_t[rows]
                pools[split] = train
        for split in ("val", "test"):
            if split not in indices:
                raise UserError(
                    f"No {split} set: give data.{split}_fraction > 0 or a separate {split} "
                    f"folder (data.source.{split}_root)."
                )

    def _make_datasets(self, pools: dict, indices: dict, targets: dict) -> None:
        """One :attr:`dataset_class` per split (training transform for train, eval for the
        others) and the sample ids of each."""
        transforms = {"train": self.train_transform(), "eval": self.eval_transform()}
        for split in SPLITS:
            if split not in indices:
                continue
            pool = pools[split]
            tf = transforms["train" if split == "train" else "eval"]
            self.datasets[split] = self.dataset_class(
                pool,
                indices[split],
                targets[split],
                tf,
                seed=self.seed,
                min_short_side=self.short_side(split) if self.draft_decode else None,
            )
            self._ids[split] = [pool.ids[i] for i in indices[split]]

    def _class_map(self, names: list[str]) -> np.ndarray:
        """Old class index -> new index (or -1 when the class is dropped by ``classes``)."""
        mapping = np.arange(len(names))
        if self.classes is None:
            return mapping
        wanted = []
        for c in self.classes:
            if str(c) in names:
                wanted.append(names.index(str(c)))
            elif isinstance(c, int) and 0 <= c < len(names):
                wanted.append(c)
            else:
                raise UserError(
                    f"data.classes names '{c}', which is not a class of this data set "
                    f"(classes: {names[:20]}{' ...' if len(names) > 20 else ''})."
                )
        mapping = np.full(len(names), -1)
        for new, old in enumerate(sorted(set(wanted))):
            mapping[old] = new
        return mapping

    # ------------------------------------------------------------------ transforms
    @property
    def augments(self) -> bool:
        """Whether training images are augmented at all (per image, or on the device)."""
        if getattr(self, "batch_augment", None) is not None:
            return True
        return repr(self.train_transform()) != repr(self.eval_transform())

    def eval_transform(self, *, normalize: bool = True):
        """Resize + centre crop per the data config; deterministic."""
        return build_eval_transform(
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
            interpolation=self.interpolation,
            crop_pct=self.eval_crop_pct,
            normalize=normalize,
        )

    def train_transform(self, *, augment: Mapping | None = None, normalize: bool = True):
        """The per-image training pipeline (``augment`` replaces ``self.augment`` if given)."""
        return build_train_transform(
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
            interpolation=self.interpolation,
            crop_pct=self.eval_crop_pct,
            augment=self.augment if augment is None else augment,
            mirror_invariant=self.mirror_invariant,
            color_pca=self.color_pca,
            normalize=normalize,
        )

    # ------------------------------------------------------------------ PCA colour jitter
    def _setup_color_pca(self, pool: Pool, rows: np.ndarray) -> None:
        """Resolve ``augment.pca`` when it is on: the colour PCA and the on-device step."""
        options = self.augment_options["pca"]
        if options["sigma"] <= 0:
            return
        self.color_pca = self.resolve_color_pca(pool, rows)
        if options["where"] == "device":
            self.batch_augment = BatchPCAJitter(
                self.color_pca, sigma=options["sigma"], mean=self.mean, std=self.std
            )

    def resolve_color_pca(self, pool: Pool | None = None, rows: np.ndarray | None = None):
        """The :class:`ColorPCA` that ``augment.pca.eigen`` asks for, even with ``sigma=0``.

        ``imagenet``: AlexNet's constants. ``fit``: fitted on the training split (``pool`` and
        ``rows``, by default those of :meth:`setup`) at the eval geometry, loaded from the cache
        when it is there (:func:`~datamodules.pca_jitter.load_or_fit_training_pca`).
        """
        options = self.augment_options["pca"]
        if options["eigen"] == "imagenet":
            return ColorPCA.imagenet()
        if pool is None:
            if "train" not in self.datasets:
                self.setup()
            pool, rows = self.datasets["train"].pool, self.datasets["train"].indices
        pca, path, cached = load_or_fit_training_pca(
            pool,
            rows,
            transform=self.eval_transform(normalize=False),
            fit_images=options["fit_images"],
            key={
                "source": source_identity(self.source),
                "image_size": self.image_size,
                "crop_pct": self.eval_crop_pct,
                "interpolation": self.interpolation,
            },
            cache_dir=options.get("cache_dir"),
            name=type(self.source).__name__,
            num_workers=self.num_workers,
        )
        log.info("PCA colour jitter: %s", describe_fit(pca, path, cached))
        return pca

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Training batches only: PCA colour jitter on the device, one seeded draw per batch.

        The seed mixes the training ``seed``, the rank, the epoch and the
        batch's position in the epoch, so the same ``seed`` gives the same jitter.
        """
        trainer = self.trainer
        if self.batch_augment is None or trainer is None or not trainer.training:
            return batch
        x, *rest = batch
        # in place: the batch is a fresh tensor from the loader (or from the device transfer)
        return (self.batch_augment(x, seed=self._next_batch_seed(), inplace=True), *rest)

    def _next_batch_seed(self) -> int:
        trainer = self.trainer
        epoch, count = self._batch_position
        if trainer.current_epoch != epoch:
            epoch, count = trainer.current_epoch, 0
        self._batch_position = (epoch, count + 1)
        return batch_seed(self.seed, int(getattr(trainer, "global_rank", 0)), epoch, count)

    # ------------------------------------------------------------------ loaders
    def eval_dataloader(self, split: str, *, rows: Sequence[int] | None = None) -> DataLoader:
        """``split`` in order, with its own transform, unshuffled, in eval-size batches (as
        ``val_dataloader`` for validation); ``rows``: only these rows, each item keeping its row
        number in the whole split. For predictions outside a Trainer (validation predictions,
        soups, the images of BatchNorm statistics)."""
        return self._loader(split, train=False, rows=rows)

    def _loader(self, split: str, *, train: bool, rows: Sequence[int] | None = None) -> DataLoader:
        from torch.utils.data import Subset

        if split not in self.datasets:
            self.setup()
        dataset = self.datasets[split]
        if rows is not None:
            dataset = Subset(dataset, [int(r) for r in rows])
        batch_size = self.batch_size if train else self.eval_batch_size
        # a last training batch of one sample breaks BatchNorm: drop it (only that case)
        drop_last = train and len(dataset) > batch_size and len(dataset) % batch_size == 1
        if train and batch_size > len(dataset):
            log.warning(
                "data.batch_size=%d is larger than the %d training images: every epoch is a "
                "single batch of %d.",
                batch_size,
                len(dataset),
                len(dataset),
            )
        sampler = None
        if train:  # order and augmentation fixed by (seed, epoch): exact resume
            sampler = EpochSampler(
                len(dataset), seed=self.seed, trainer=getattr(self, "trainer", None)
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=drop_last,
        )

    def eval_short_side(self) -> int:
        """The short side an eval image must keep: what its resize to ``image_size / crop_pct``
        needs, with :data:`DECODE_MARGIN` to spare (:func:`keep_short_side`)."""
        return keep_short_side(self.image_size / min(self.eval_crop_pct, 1.0))

    def train_short_side(self) -> int:
        """The short side a training image must keep so that the random crop still spans
        ``image_size`` pixels (× :data:`DECODE_MARGIN`) at worst: for a random resized crop, the
        smallest area at the most elongated ratio, of a square image (a longer image only has
        more pixels), needs ``image_size * sqrt(max(ratio, 1/ratio) / min scale)``; for ResNet's
        scale jitter, the largest short side; with neither, the eval resize. A 4032x3024 photo
        for 224-px ``augment=light`` crops (scale >= 0.5) decodes at 1/4 scale."""
        o = self.augment_options
        if rrc := o["random_resized_crop"]:
            elongation = max(rrc["ratio"][1], 1 / rrc["ratio"][0])
            need = self.image_size * math.sqrt(elongation / rrc["scale"][0])
        elif sj := o["scale_jitter"]:
            need = max(self.image_size, round(sj[1] * self.image_size))
        else:
            return self.eval_short_side()
        return keep_short_side(need)

    def short_side(self, split: str) -> int:
        """What an image of ``split`` must keep of its short side: the training crops' need
        (:meth:`train_short_side`) or the eval resize's (:meth:`eval_short_side`). JPEGs are
        decoded (``draft_decode``) and cached (``cache``) that large and no larger."""
        return self.train_short_side() if split == "train" else self.eval_short_side()

    def views_dataloader(self, split: str, tta, *, rows: Sequence[int] | None = None) -> DataLoader:
        """``split`` (in order) with ``tta``'s views of every image: batches of
        ``(view groups, targets, rows)``, each group ``(B, V, 3, h, w)``, about
        ``eval_batch_size`` views per batch. ``rows``: only these rows of the split (those the
        test step saw: a limited or distributed test), else all."""
        from torch.utils.data import Subset

        if split not in self.datasets:
            self.setup()
        base = self.datasets[split]
        views = tta.image_views(
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
            interpolation=self.interpolation,
            eval_crop_pct=self.eval_crop_pct,
        )
        need = keep_short_side(self.image_size * max(1.0, tta.resize_factor(self.eval_crop_pct)))
        decode = need if self.draft_decode else None
        dataset = SplitDataset(base.pool, base.indices, base.targets, views, min_short_side=decode)
        if base.cache is not None and need <= self.short_side(split):
            dataset.cache = base.cache  # decoded at setup with what these views need to spare
        if rows is not None:  # items keep their row number in the whole split
            dataset = Subset(dataset, [int(r) for r in rows])
        return DataLoader(
            dataset,
            batch_size=max(1, self.eval_batch_size // max(1, tta.num_views)),
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


def source_fingerprint(data: SourceData) -> str:
    """Digest of every sample id and label a source offers: images added, removed, renamed or
    relabelled show (the pixels of an image are not read)."""
    digest = hashlib.sha1("\n".join(data.class_names).encode())
    for name in SPLITS:
        pool = getattr(data, name)
        if pool is None:
            continue
        digest.update(f"\n[{name}]\n".encode())
        digest.update("\n".join(map(str, pool.ids)).encode())
        digest.update(np.asarray(pool.targets, dtype=np.int64).tobytes())
        if pool.labels is not None:  # multi-task labels
            digest.update(np.ascontiguousarray(pool.labels, dtype=np.float32).tobytes())
    return digest.hexdigest()


def source_identity(source) -> dict:
    """What identifies a source's data: its class and its plain settings (paths made absolute)."""
    identity = {"type": f"{type(source).__module__}.{type(source).__qualname__}"}
    for key, value in sorted(vars(source).items()):
        if key.startswith("_") or key == "download":
            continue
        if isinstance(value, Path) or (isinstance(value, str) and key.endswith(("root", "path"))):
            value = str(Path(value).expanduser().resolve())
        if value is None or isinstance(value, (str, int, float, bool)):
            identity[key] = value
    return identity


def keep_short_side(resize: float) -> int:
    """The short side a decoded image keeps for a resize (or crop) that needs ``resize`` pixels
    across: :data:`DECODE_MARGIN` times that, so that JPEG draft decoding and the cache leave
    the final resize most of the shrinking."""
    return math.ceil(DECODE_MARGIN * resize)


def _cache_mode(cache, cache_dir: str | None) -> str | None:
    """``data.cache``: false/null (none), true or ``memory``, ``disk`` (with a ``cache_dir``)."""
    if cache is None or cache is False or str(cache).lower() in ("false", "none", "null"):
        return None
    if cache is True or str(cache).lower() in ("true", "memory"):
        return "memory"
    if str(cache).lower() == "disk":
        if not cache_dir:
            raise UserError("data.cache=disk needs data.cache_dir: a folder on a local disk.")
        return "disk"
    raise UserError(
        f"data.cache={cache!r}: use false, true (decoded images in memory) or disk "
        "(memory-mapped files under data.cache_dir, reused by later runs)."
    )
