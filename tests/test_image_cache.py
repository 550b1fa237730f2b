"""data.cache: image files decoded once and kept (in memory, or memory-mapped files reused by
later runs); the same pictures, bounded in size, refused when they would not fit, never stale."""

import inspect
import os

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
        image_size=kw.pop("image_size", 64),
        eval_crop_pct=kw.pop("eval_crop_pct", 0.875),
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
        assert cached.short_side(split) == side
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


def test_a_worker_filled_cache_holds_ordinary_tensors_in_row_order(tmp_path):
    """Filled by a loader worker: each image copied out of shared memory (a process may map
    only ~65,000 shared tensors), in the split's row order."""
    root = _folder(tmp_path / "photos")
    by_worker, in_process = _dm(root, cache=True, num_workers=1), _dm(root, cache=True)
    for split, ds in by_worker.datasets.items():
        assert not any(t.is_shared() for t in ds.cache)
        assert all(
            torch.equal(a, b)
            for a, b in zip(ds.cache, in_process.datasets[split].cache, strict=True)
        )


def test_the_memory_limit_counts_every_split_together(tmp_path, monkeypatch):
    """Half the free memory is for all splits together: a cache whose splits each fit but whose
    total does not is refused."""
    from datamodules import image_cache

    root = _folder(tmp_path / "photos")
    sizes = {
        s: sum(t.numel() for t in ds.cache) for s, ds in _dm(root, cache=True).datasets.items()
    }
    assert max(sizes.values()) < sum(sizes.values()) - 1
    free = (sum(sizes.values()) - 1) / image_cache.MEMORY_SHARE
    monkeypatch.setattr(image_cache, "available_memory", lambda: free)
    with pytest.raises(UserError, match="data.cache=true would keep"):
        _dm(root, cache=True)


def test_evaluating_a_checkpoint_does_not_carry_its_cache_setting(tmp_path):
    """A run trained with data.cache=true records it in its data contract; testing its checkpoint
    decodes every split into memory only when that command asks for it."""
    from omegaconf import OmegaConf

    from lightning_modules.data_contract import data_config_for

    contract = {"data": {"_target_": "datamodules.ImageDataModule", "cache": True}, "input": {}}
    cfg = OmegaConf.create({"data": {"batch_size": 8}})
    assert "cache" not in data_config_for(cfg, contract)  # this command's default: no cache
    assert inspect.signature(ImageDataModule).parameters["cache"].default is False
    cfg = OmegaConf.create({"data": {"batch_size": 8, "cache": False}})
    assert data_config_for(cfg, contract).cache is False
    cfg = OmegaConf.create({"data": {"batch_size": 8, "cache": True}})
    assert data_config_for(cfg, contract).cache is True


def _images(dm) -> dict:
    return {split: list(ds.cache) for split, ds in dm.datasets.items()}


def _same_images(a: dict, b: dict) -> bool:
    if a.keys() != b.keys() or any(len(a[s]) != len(b[s]) for s in a):
        return False
    return all(torch.equal(x, y) for s in a for x, y in zip(a[s], b[s], strict=True))


def test_a_disk_cache_holds_the_memory_cache_and_the_next_run_decodes_nothing(
    tmp_path, monkeypatch
):
    root, cache_dir = _folder(tmp_path / "photos"), tmp_path / "cache"
    in_memory = _images(_dm(root, cache=True))
    on_disk = _dm(root, cache="disk", cache_dir=str(cache_dir))
    files = sorted(p.name for p in cache_dir.iterdir())
    # a file, its index and its lock per split, no temporary file
    suffixes = sorted(p.suffix for p in cache_dir.iterdir())
    assert suffixes == sorted([".json", ".lock", ".u8"] * len(on_disk.datasets))
    assert _same_images(_images(on_disk), in_memory)
    # a loader worker started by spawn gets the path and maps the file itself
    from multiprocessing.reduction import ForkingPickler

    sent = ForkingPickler.loads(ForkingPickler.dumps(on_disk.datasets["test"]))
    assert all(torch.equal(a, b) for a, b in zip(sent.cache, in_memory["test"], strict=True))
    assert torch.equal(sent.cache[-1], in_memory["test"][-1])  # a sequence, as a list is

    def no_decoding(*args, **kwargs):
        raise AssertionError("a file was decoded")

    monkeypatch.setattr("datamodules.sources.folder.load_rgb", no_decoding)
    again = _dm(root, cache="disk", cache_dir=str(cache_dir), num_workers=1)
    assert sorted(p.name for p in cache_dir.iterdir()) == files  # nothing written again
    assert _same_images(_images(again), in_memory)
    x, y, _ = next(iter(again.train_dataloader()))  # a loader worker reads the mapped file
    assert x.shape[1:] == (3, 64, 64) and len(y) == len(x)


def test_a_disk_cache_never_serves_stale_or_partial_pixels(tmp_path):
    root, cache_dir = _folder(tmp_path / "photos"), tmp_path / "cache"
    _dm(root, cache="disk", cache_dir=str(cache_dir))
    before = set(cache_dir.iterdir())
    # an image is replaced: the splits holding it get files of their own, with its new pixels
    Image.new("RGB", (640, 480), (200, 30, 30)).save(sorted(root.glob("a/*.jpg"))[0])
    changed = _dm(root, cache="disk", cache_dir=str(cache_dir))
    assert _same_images(_images(changed), _images(_dm(root, cache=True)))
    assert before < set(cache_dir.iterdir())
    # another input size: files of its own, bounded by its own sizes
    larger = _dm(root, cache="disk", cache_dir=str(cache_dir), image_size=96)
    assert _same_images(_images(larger), _images(_dm(root, cache=True, image_size=96)))
    # a file cut short (a full disk, a killed copy) is decoded again, not read; a new file, as
    # a copy would make it: the runs above still map the old ones
    expected = {s: [t.clone() for t in images] for s, images in _images(changed).items()}
    for data in cache_dir.glob("*.u8"):
        cut = data.with_name("cut")
        cut.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        os.replace(cut, data)
    again = _dm(root, cache="disk", cache_dir=str(cache_dir))
    assert _same_images(_images(again), expected)


def test_a_disk_cache_larger_than_half_the_free_space_is_refused(tmp_path, monkeypatch):
    from collections import namedtuple

    root, cache_dir = _folder(tmp_path / "photos"), tmp_path / "cache"
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(10**6, 10**6 - 100_000, 100_000))
    with pytest.raises(UserError, match=r"data.cache=disk would keep .* free space in"):
        _dm(root, cache="disk", cache_dir=str(cache_dir))
    assert {p.suffix for p in cache_dir.iterdir()} == {".lock"}  # nothing half-written left


def test_a_disk_cache_clears_what_a_killed_writer_left_and_names_an_unusable_folder(tmp_path):
    from datamodules.image_cache import disk_key

    root, cache_dir = _folder(tmp_path / "photos"), tmp_path / "cache"
    dm = _dm(root, cache="disk", cache_dir=str(cache_dir))
    split = dm.datasets["train"]
    key = disk_key(split, short_side=dm.short_side("train"), interpolation=_interp(dm))
    for suffix in ("u8", "json"):  # as if killed after writing its file, before the rename
        (cache_dir / f"{key}.{suffix}").rename(cache_dir / f".{key}.killed.{suffix}.tmp")
    _dm(root, cache="disk", cache_dir=str(cache_dir))
    assert not list(cache_dir.glob("*.tmp"))
    assert (cache_dir / f"{key}.u8").is_file()

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(UserError, match=r"data.cache_dir=.*a-file/cache: cannot make it"):
        _dm(root, cache="disk", cache_dir=str(blocked / "cache"))


def _interp(dm):
    from datamodules.transforms import _interpolation

    return _interpolation(dm.interpolation)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cache": "ram"}, "data.cache='ram': use false, true"),
        ({"cache": "disk"}, "data.cache=disk needs data.cache_dir"),
    ],
)
def test_a_cache_setting_it_cannot_honour_is_one_clear_error(kwargs, match):
    from datamodules.sources import DigitsSource

    with pytest.raises(UserError, match=match):
        ImageDataModule(source=DigitsSource(image_size=32), image_size=32, **kwargs)


def test_tta_views_come_from_the_cache_when_it_kept_enough_pixels(tmp_path, monkeypatch):
    """Five crops at the eval scale need what the eval cache kept: no file is decoded again, and
    the views are the uncached ones up to resampling. Larger views (multiscale 1.25) need more
    pixels than the cache kept: those decode the files."""
    from lightning_modules.tta import TestTimeAugmentation

    root = _folder(tmp_path / "photos")
    plain, cached = _dm(root), _dm(root, cache=True)
    five = TestTimeAugmentation(mode="five_crop")
    expected = torch.cat([g for v, _, _ in plain.views_dataloader("test", five) for g in v])

    def no_file_reads(*args, **kwargs):
        raise AssertionError("a cached split read a file")

    monkeypatch.setattr(cached.datasets["test"].pool, "load", no_file_reads)
    views = torch.cat([g for v, _, _ in cached.views_dataloader("test", five) for g in v])
    assert views.shape == expected.shape
    assert (views - expected).abs().mean() < 0.15  # normalised by ImageNet std: resampling only
    larger = TestTimeAugmentation(mode="multiscale", scales=(1.0, 1.25))
    assert cached.views_dataloader("test", larger).dataset.cache is None
    # flips are cut at the data's own eval crop, whatever tta.crop_pct says
    whole = _dm(root, cache=True, eval_crop_pct=0.95)
    flip = TestTimeAugmentation(mode="flip")
    assert flip.crop_pct < 0.95 and whole.views_dataloader("test", flip).dataset.cache is not None
    tighter = TestTimeAugmentation(mode="five_crop", crop_pct=0.8)  # needs more than was kept
    assert whole.views_dataloader("test", tighter).dataset.cache is None


def test_an_atomic_file_is_whole_or_absent(tmp_path):
    """How every cache file is written (decoded images, features, colour PCA)."""
    from datamodules.atomic_file import atomic_file

    path = tmp_path / "cache.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("killed while writing")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["cache.bin"]
    with atomic_file(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["cache.bin"]
    assert path.stat().st_mode & 0o777 == 0o644
