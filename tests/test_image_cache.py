"""data.cache: image files decoded once and kept; the same pictures, bounded in size, refused
when they would not fit in memory."""

import pytest
import torch
from PIL import Image

from datamodules import ImageDataModule
from datamodules.errors import UserError
from datamodules.sources import ImageFolderSource

LIGHT = {"random_resized_crop": {"scale": [0.5, 1.0], "ratio": [0.75, 1.3333]}, "hflip": 0.5}


def _folder(root, size=(640, 480), per_class=6):
    from sklearn.datasets import load_sample_image

    photo = Image.fromarray(load_sample_image("china.jpg"))
    for c, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            box = (10 * i, 5 * c, 10 * i + 400, 5 * c + 300)
            photo.crop(box).resize(size).save(root / cls / f"{i}.jpg", quality=90)
    return root


def _dm(root, **kw):
    dm = ImageDataModule(
        source=ImageFolderSource(root=str(root)),
        image_size=64,
        eval_crop_pct=0.875,
        val_fraction=0.25,
        test_fraction=0.25,
        augment=LIGHT,
        **kw,
    )
    dm.setup()
    return dm


def test_cached_images_are_bounded_used_and_give_the_same_pictures(tmp_path, monkeypatch):
    root = _folder(tmp_path / "photos")
    plain, cached = _dm(root), _dm(root, cache=True)
    for split, ds in cached.datasets.items():
        side = cached.train_short_side() if split == "train" else cached.eval_short_side()
        assert len(ds.cache) == len(ds)
        assert all(t.dtype == torch.uint8 and min(t.shape[-2:]) == side for t in ds.cache)

    def no_file_reads(*args, **kwargs):
        raise AssertionError("a cached split read a file")

    for ds in cached.datasets.values():
        monkeypatch.setattr(ds.pool, "load", no_file_reads)
    for row in range(len(cached.datasets["test"])):  # eval: double resize, the same picture
        a, b = cached.datasets["test"][row][0], plain.datasets["test"][row][0]
        assert (a - b).abs().mean() < 0.15  # normalised by ImageNet std: ~0.03 of [0, 1]
    x, y, _ = next(iter(cached.train_dataloader()))
    assert x.shape[1:] == (3, 64, 64) and len(y) == len(x)


def test_an_in_memory_source_has_nothing_to_cache():
    from datamodules.sources import DigitsSource

    dm = ImageDataModule(source=DigitsSource(image_size=32), image_size=32, cache=True)
    dm.setup()
    assert all(ds.cache is None for ds in dm.datasets.values())


def test_a_cache_larger_than_half_the_free_memory_is_refused(tmp_path, monkeypatch):
    root = _folder(tmp_path / "photos")
    monkeypatch.setattr("datamodules.image_cache.available_memory", lambda: 100_000)
    with pytest.raises(UserError, match=r"data.cache=true would keep .* data.cache=false"):
        _dm(root, cache=True)
