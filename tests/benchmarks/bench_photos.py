"""The eval input pipeline on real-size photographs: JPEG draft decoding on and off.

    RUN_BENCHMARKS=1 python -m pytest tests/benchmarks/bench_photos.py -s

A data set generated here (nothing downloaded): crops, flips and colour shifts of the two photos
scikit-learn ships, re-encoded as JPEG at ImageNet size (500x375) and at phone size
(4032x3024), in class folders. Measured per worker (one process, one thread), interleaved
repeats, median: images/s of the 224-px eval transform (load + decode + resize + crop +
normalise) with ``data.draft_decode`` on and off, for a data module's test split and for
five-crop TTA views. Then the predictions of a network on both inputs: the share of images
whose predicted class is unchanged and the largest probability change: EfficientNet-Lite1 with
its ImageNet weights (converted offline by ``tests/efficientnet_lite.py``, the dev extras), fed
the inputs those weights record, or a randomly initialised resnet18 where the extras are missing.

Also the training transform (``augment=light``'s random resized crops and flips), whose JPEGs
decode at the scale that keeps every possible crop ``224 x 1.25`` pixels across.

Targets: phone-size eval >= 3x and training >= 1.5x faster with draft decoding; ImageNet-size
within 10 % (the repeats' spread allowed); predictions unchanged on >= 99 % of the images.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

# photo size and how many: ~500 at ImageNet size and ~100 at phone size, made once per module
SIZES = {"imagenet": ((500, 375), 500), "phone": ((4032, 3024), 100)}
REPEATS = 3
# augment=light's per-image steps (its PCA colour jitter runs on the device, after the batch)
LIGHT_CROPS = {"random_resized_crop": {"scale": [0.5, 1.0], "ratio": [0.75, 1.3333]}, "hflip": 0.5}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """``photos(kind)``: the folder of ``kind``'s photos, made on first use."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            size, count = SIZES[kind]
            made[kind] = _photos(tmp_path_factory.mktemp(kind), size, count)
        return made[kind]

    return get


def _photos(root: Path, size: tuple[int, int], count: int) -> Path:
    from PIL import Image, ImageOps
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(0)
    sources = [Image.fromarray(load_sample_image(n)) for n in ("china.jpg", "flower.jpg")]
    for i in range(count):
        cls = i % 2
        img = sources[cls]
        w, h = img.size
        box = (int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4)))
        img = img.crop((*box, box[0] + 3 * w // 4, box[1] + 3 * h // 4)).resize(size)
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        shift = rng.uniform(0.85, 1.15, size=3)
        arr = np.clip(np.asarray(img, dtype=np.float32) * shift, 0, 255).astype(np.uint8)
        folder = root / f"class{cls}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def _datamodule(root: Path, draft: bool = True, *, augment=LIGHT_CROPS, **kwargs):
    """224-px data over the photos: most of them in the test split unless ``kwargs`` say."""
    from datamodules import ImageDataModule
    from datamodules.sources import ImageFolderSource

    split = {"val_fraction": 0.1, "test_fraction": 0.8, **kwargs}
    dm = ImageDataModule(
        source=ImageFolderSource(root=str(root)),
        image_size=224,
        eval_crop_pct=0.875,
        draft_decode=draft,
        augment=augment,
        **split,
    )
    dm.setup()
    return dm


def _rate(dataset, *, epoch: int | None = None) -> float:
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i if epoch is None else (epoch, i)]  # (epoch, row): a seeded training item
    return len(dataset) / (time.perf_counter() - start)


def _train_items(dm):
    """The test split's images through the training transform, decoded as training decodes."""
    from datamodules.image_datamodule import SplitDataset

    ds = dm.datasets["test"]
    decode = dm.short_side("train") if dm.draft_decode else None
    return SplitDataset(
        ds.pool, ds.indices, ds.targets, dm.train_transform(), min_short_side=decode
    )


@pytest.mark.parametrize("kind", list(SIZES))
def test_draft_decoding_of_eval_photos(tmp_path, kind, photos):
    from lightning_modules.tta import TestTimeAugmentation

    torch.set_num_threads(1)
    size, _ = SIZES[kind]
    root = photos(kind)
    weights = _imagenet_weights(tmp_path)
    dms = {draft: _datamodule(root, draft, weights=weights) for draft in (False, True)}
    tta = TestTimeAugmentation(mode="five_crop")
    views = {d: dm.views_dataloader("test", tta).dataset for d, dm in dms.items()}
    train = {d: _train_items(dm) for d, dm in dms.items()}
    rates = {(d, what): [] for d in dms for what in ("eval", "five_crop", "train")}
    for r in range(REPEATS):  # interleaved
        for d, dm in dms.items():
            rates[(d, "eval")].append(_rate(dm.datasets["test"]))
            rates[(d, "five_crop")].append(_rate(views[d]))
            rates[(d, "train")].append(_rate(train[d], epoch=r))
    med = {k: statistics.median(v) for k, v in rates.items()}
    spread = {k: max(v) - min(v) for k, v in rates.items()}
    print(
        f"\n{kind} ({size[0]}x{size[1]}, {len(dms[True].datasets['test'])} test images), "
        "images/s per worker:"
    )
    print(f"  training decodes at short side >= {dms[True].short_side('train')} px")
    for what in ("eval", "five_crop", "train"):
        print(
            f"  {what:>9}: whole {med[(False, what)]:7.1f}, draft {med[(True, what)]:7.1f} "
            f"({med[(True, what)] / med[(False, what)]:.2f}x)"
        )

    net, name = _network(weights)
    x = {
        d: torch.stack([dms[d].datasets["test"][i][0] for i in range(len(dms[d].datasets["test"]))])
        for d in dms
    }
    with torch.no_grad():
        p = {d: net(x[d]).softmax(-1) for d in dms}
    same = float((p[True].argmax(1) == p[False].argmax(1)).float().mean())
    print(
        f"  predictions ({name}): class unchanged on {same * 100:.1f} %, "
        f"largest probability change {(p[True] - p[False]).abs().max():.4f}"
    )
    assert same >= 0.99
    ratio = med[(True, "eval")] / med[(False, "eval")]
    train_ratio = med[(True, "train")] / med[(False, "train")]
    if kind == "phone":
        assert ratio >= 3.0
        assert train_ratio >= 1.5
    else:
        for what, r in (("eval", ratio), ("train", train_ratio)):
            tolerance = spread[(False, what)] / med[(False, what)]
            assert r >= 0.9 - tolerance


def _imagenet_weights(tmp: Path) -> str | None:
    """EfficientNet-Lite1's ImageNet weights as a timm file (None without the dev extras)."""
    try:
        from tests.efficientnet_lite import write

        return str(write("lite1", tmp / "efficientnet_lite1.pth"))
    except ImportError:
        return None


def _network(weights: str | None):
    import timm

    if weights is None:  # a net of random weights: predictions still depend on the pixels
        return timm.create_model("resnet18", num_classes=10).eval(), "random resnet18"
    net = timm.create_model("efficientnet_lite1", num_classes=1000)
    net.load_state_dict(torch.load(weights, weights_only=True)["state_dict"])
    return net.eval(), "EfficientNet-Lite1, ImageNet weights"


PRESETS = ("none", "light", "resnet", "strong")


@pytest.mark.parametrize("kind", list(SIZES))
def test_training_presets_per_worker(tmp_path, kind, photos):
    """Figures only (no target): images/s per worker (one process, one thread) of each
    ``augment`` preset's per-image training pipeline at 224 px, with draft decoding (the default),
    and of the eval pipeline; and how many workers keep 1,000 images/s fed. PCA colour jitter is
    left out: it runs on the batch, on the device (``augment.pca.where=device``)."""
    from omegaconf import OmegaConf

    from tests.conftest import compose_cfg

    torch.set_num_threads(1)
    size, _ = SIZES[kind]
    root = photos(kind)
    items = {}
    for name in PRESETS:
        cfg = compose_cfg(tmp_path / name, [f"augment={name}", "augment.pca.sigma=0"])
        dm = _datamodule(root, augment=OmegaConf.to_container(cfg.augment, resolve=True))
        items[name] = _train_items(dm)
    items["eval"] = dm.datasets["test"]
    rates = {name: [] for name in items}
    for r in range(REPEATS):  # interleaved
        for name, ds in items.items():
            rates[name].append(_rate(ds, epoch=None if name == "eval" else r))
    print(f"\n{kind} ({size[0]}x{size[1]}), 224 px, draft decoding, per worker:")
    print(f"  {'pipeline':>15} {'img/s':>8} {'spread':>7} {'workers for 1,000 img/s':>24}")
    for name, rs in rates.items():
        med = statistics.median(rs)
        label = name if name == "eval" else f"augment={name}"
        print(f"  {label:>15} {med:8.1f} {(max(rs) - min(rs)) / med:7.2f} {1000 / med:24.1f}")


@pytest.mark.parametrize("kind", list(SIZES))
def test_cache_speeds_up_later_epochs(tmp_path, kind, photos):
    """``data.cache=true`` and ``data.cache=disk``: training items/s per worker from the cache
    against decoding each epoch (draft decoding on in all), what filling the cache cost (one
    pass, one worker) and, on disk, what the next run's set-up costs (mapping the files).
    Target: the cached epochs are not slower (within the repeats' spread), and a run that finds
    its disk cache sets up faster than one that fills it."""
    torch.set_num_threads(1)
    size, _ = SIZES[kind]
    root = photos(kind)

    def dm(cache):
        start = time.perf_counter()
        made = _datamodule(root, test_fraction=0.1, cache=cache, cache_dir=str(tmp_path / "c"))
        return made, time.perf_counter() - start

    dm(False)  # imports and first-use costs, paid once
    plain, setup = dm(False)
    cached, fill = dm(True)
    _, fill_disk = dm("disk")
    on_disk, reuse = dm("disk")  # the next run on the same files
    items = {
        "decoded each epoch": plain.datasets["train"],
        "cached": cached.datasets["train"],
        "on disk": on_disk.datasets["train"],
    }
    rates = {name: [] for name in items}
    for r in range(REPEATS):  # interleaved
        for name, ds in items.items():
            rates[name].append(_rate(ds, epoch=r))
    med = {n: statistics.median(rs) for n, rs in rates.items()}
    n_all = sum(len(d) for d in cached.datasets.values())
    kept = sum(t.numel() for d in cached.datasets.values() for t in d.cache)
    base = med["decoded each epoch"]
    print(
        f"\n{kind} ({size[0]}x{size[1]}), augment=light crops at 224 px, training items per worker:"
        f"\n  decoded each epoch {base:7.1f} img/s"
        f"\n  cached in memory   {med['cached']:7.1f} img/s ({med['cached'] / base:.2f}x)"
        f"\n  cached on disk     {med['on disk']:7.1f} img/s ({med['on disk'] / base:.2f}x)"
        f"\n  set-up beyond the plain one's {setup:.1f} s, {n_all} images ({kept / 2**20:.0f} MiB):"
        f" memory {fill - setup:.1f} s, disk {fill_disk - setup:.1f} s the first run,"
        f" {reuse - setup:+.1f} s the next"
    )
    for name in ("cached", "on disk"):
        spread = (max(rates[name]) - min(rates[name])) / med[name]
        assert med[name] >= base * (1 - spread), name
    assert reuse < fill_disk
