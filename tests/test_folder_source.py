"""The ImageFolder source on folders generated in tmp_path."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules import ImageDataModule
from datamodules.errors import UserError
from datamodules.sources import ImageFolderSource


def make_folder(root: Path, counts: dict[str, int], size=(20, 16), mode="RGB") -> Path:
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name / "nested").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            img = Image.fromarray(arr).convert(mode)
            sub = "nested/" if i % 2 else ""
            img.save(root / name / f"{sub}{i:03d}.png")
    return root


def dm_for(source, **kw):
    return ImageDataModule(source=source, image_size=16, batch_size=4, **kw)


def test_folder_split_ids_and_batches(tmp_path):
    root = make_folder(tmp_path / "imgs", {"cat": 10, "dog": 12, "emu": 8})
    dm = dm_for(ImageFolderSource(root=str(root)), val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    assert dm.class_names == ["cat", "dog", "emu"] and dm.num_classes == 3
    ids = {s: dm.ids(s) for s in ("train", "val", "test")}
    assert sum(len(v) for v in ids.values()) == 30
    assert not set(ids["test"]) & set(ids["train"])
    assert "cat/nested/001.png" in sum(ids.values(), [])
    x, y, row = next(iter(dm.test_dataloader()))
    assert x.shape[1:] == (3, 16, 16) and x.dtype.is_floating_point
    # the row index maps each sample back to its id and label
    ds = dm.datasets["test"]
    assert [ds.targets[r] for r in row.tolist()] == y.tolist()


def test_separate_val_and_test_folders(tmp_path):
    root = make_folder(tmp_path / "train", {"a": 6, "b": 6})
    val = make_folder(tmp_path / "val", {"a": 2, "b": 3})
    test = make_folder(tmp_path / "test", {"a": 4, "b": 1})
    dm = dm_for(ImageFolderSource(root=str(root), val_root=str(val), test_root=str(test)))
    dm.setup()
    assert len(dm.ids("train")) == 12 and len(dm.ids("val")) == 5 and len(dm.ids("test")) == 5
    assert dm.ids("test")[0].startswith("test:")


def test_class_with_too_few_images_is_a_clear_error(tmp_path):
    root = make_folder(tmp_path / "imgs", {"cat": 10, "dog": 2})
    dm = dm_for(ImageFolderSource(root=str(root)))
    with pytest.raises(UserError, match=r"Class 'dog' has 2 image\(s\) but needs at least 3"):
        dm.setup()


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda r: None, "does not exist"),
        (lambda r: r.mkdir(), "no class sub-folders"),
        (lambda r: make_folder(r, {"only": 5}), "single class"),
        (lambda r: (make_folder(r, {"a": 5}), (r / "b").mkdir()), "holds no images"),
    ],
)
def test_bad_folders_fail_with_the_cause(tmp_path, setup, message):
    root = tmp_path / "imgs"
    setup(root)
    with pytest.raises(UserError, match=message):
        dm_for(ImageFolderSource(root=str(root))).setup()


def test_grey_palette_and_rgba_images_become_rgb(tmp_path):
    root = tmp_path / "imgs"
    for mode, cls in (("L", "grey"), ("P", "palette"), ("RGBA", "rgba")):
        make_folder(root, {cls: 3}, mode=mode)
    dm = dm_for(ImageFolderSource(root=str(root)), val_fraction=0.34, test_fraction=0.34)
    dm.setup()
    x, _, _ = next(iter(dm.train_dataloader()))
    assert x.shape[1] == 3


def test_classes_subset_and_max_per_class(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 12, "b": 12, "c": 12})
    dm = dm_for(ImageFolderSource(root=str(root)), classes=["c", "a"], max_per_class=3)
    dm.setup()
    assert dm.class_names == ["a", "c"]
    train_targets = dm.datasets["train"].targets
    assert sorted(np.bincount(train_targets).tolist()) == [3, 3]
    with pytest.raises(UserError, match="not a class"):
        dm_for(ImageFolderSource(root=str(root)), classes=["zebra"]).setup()


def test_hidden_class_folders_and_non_image_files_are_named_in_a_warning(tmp_path, caplog):
    root = make_folder(tmp_path / "data", {"cat": 6, "dog": 6, ".cache": 3})
    (root / "cat" / "notes.txt").write_text("not an image")
    with caplog.at_level("WARNING"):
        dm = dm_for(ImageFolderSource(root=root))
        dm.setup("fit")
    assert dm.class_names == ["cat", "dog"]
    text = caplog.text
    assert "hidden folder(s)" in text and ".cache" in text
    assert "not images" in text and "cat/notes.txt" in text
