"""Bad inputs: each ends in one clear UserError naming cause and fix, or is handled gracefully.

The table below is also the table of docs/troubleshooting.md. `error` rows must raise UserError
whose message contains the fragment; `ok` rows must train and pass their check.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from datamodules.errors import UserError

FOLDER_FAST = [
    "data=folder",
    "data.image_size=32",
    "data.batch_size=8",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "data.num_workers=0",
    "data.persistent_workers=false",
]


def _img(path: Path, size=(24, 20), mode="RGB", color=(200, 30, 30), **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, **save)
    return path


def _folder(root: Path, n=6, classes=("cat", "dog")) -> Path:
    for k, name in enumerate(classes):
        for i in range(n):
            _img(root / name / f"{i}.png", color=(40 + 150 * k, 90, 20 * i))
    return root


def folder(tmp, n=6, classes=("cat", "dog")):
    return [*FOLDER_FAST, f"data.root={_folder(tmp / 'imgs', n, classes)}"]


def _with(extra):
    def make(tmp):
        root = _folder(tmp / "imgs")
        names = extra(root)
        return [*FOLDER_FAST, f"data.root={root}"], names

    return make


def _corrupt(root):
    (root / "cat" / "empty.png").write_bytes(b"")
    (root / "cat" / "notes.jpg").write_text("not an image")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return ["empty.png", "notes.jpg", "broken.png"]


def _truncated(root):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, format="JPEG")
    (root / "cat" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return ["cut.jpg"]


def _odd_modes(root):
    _img(root / "cat" / "cmyk.jpg", mode="CMYK")
    arr = (np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) * 100).astype(np.uint16)
    Image.fromarray(arr).save(root / "cat" / "sixteen.png")
    pal = Image.new("RGBA", (24, 20), (255, 0, 0, 0)).convert("P")
    pal.info["transparency"] = 0
    pal.save(root / "dog" / "palette.png", transparency=0)
    _img(root / "dog" / "tiny.png", size=(1, 1))
    _img(root / "dog" / "wide.png", size=(400, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    _img(root / "cat" / "rotated.jpg", size=(40, 10), exif=exif)
    return []


def _weights_of(name, classes):
    def make(tmp):
        from safetensors.torch import save_file

        path = tmp / f"{name}.safetensors"
        save_file(
            {
                k: v.contiguous()
                for k, v in timm.create_model(name, num_classes=classes).state_dict().items()
            },
            str(path),
        )
        return [f"model.weights={path}", "finetune=full"], []

    return make


def _evil(tmp):
    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp / "victim"),))

    (tmp / "victim").mkdir()
    torch.save({"conv1.weight": Evil()}, tmp / "evil.pth")
    return [f"model.weights={tmp / 'evil.pth'}", "finetune=full"], []


# id, setup(tmp) -> overrides (or (overrides, names)), outcome, message fragment or check
CASES = [
    (
        "folder_missing",
        lambda t: [*FOLDER_FAST, f"data.root={t / 'nope'}"],
        "error",
        "does not exist",
    ),
    (
        "folder_empty",
        lambda t: ((t / "e").mkdir(), [*FOLDER_FAST, f"data.root={t / 'e'}"])[1],
        "error",
        "no class sub-folders",
    ),
    ("one_class", lambda t: folder(t, classes=("cat",)), "error", "single class"),
    (
        "class_folder_empty",
        lambda t: ((t / "imgs" / "emu").mkdir(parents=True), folder(t))[1],
        "error",
        "holds no images",
    ),
    ("class_too_small", lambda t: folder(t, n=2), "error", "needs at least 3"),
    ("corrupt_zero_byte_non_image_files", _with(_corrupt), "ok", "skipped"),
    ("truncated_image", _with(_truncated), "ok", "loads"),
    ("cmyk_16bit_palette_exif_1x1_extreme_aspect", _with(_odd_modes), "ok", "loads"),
    ("unknown_backbone", lambda t: ["model.backbone=resnet_51"], "error", "Did you mean"),
    (
        "weights_of_another_backbone",
        _weights_of("test_efficientnet", 10),
        "error",
        "another architecture",
    ),
    ("weights_of_another_class_count", _weights_of("test_resnet", 3), "ok", "head"),
    (
        "weights_file_missing",
        lambda t: [f"model.weights={t / 'none.pth'}", "finetune=full"],
        "error",
        "does not exist",
    ),
    ("weights_file_runs_code", _evil, "error", "tensors only"),
    (
        "batch_size_not_a_number",
        lambda t: ["data.batch_size=abc"],
        "error",
        "data.batch_size='abc'",
    ),
    ("lr_negative", lambda t: ["model.optimizer.lr=-0.1"], "error", "model.optimizer.lr=-0.1"),
    ("lr_zero", lambda t: ["model.optimizer.lr=0"], "error", "expected a positive number"),
    ("batch_size_zero", lambda t: ["data.batch_size=0"], "error", "data.batch_size=0"),
    (
        "batch_larger_than_dataset",
        lambda t: ["data.batch_size=4096", "data.max_per_class=5"],
        "ok",
        "one batch",
    ),
    (
        "unfreeze_after_last_epoch",
        lambda t: [
            "finetune=progressive",
            "finetune.callback.milestones=[1,5]",
            "trainer.max_epochs=2",
        ],
        "error",
        "at or after trainer.max_epochs=2",
    ),
    (
        "milestones_unsorted",
        lambda t: [
            "finetune=progressive",
            "finetune.callback.milestones=[2,1]",
            "trainer.max_epochs=4",
        ],
        "error",
        "increasing order",
    ),
    (
        "search_selects_on_the_test_set",
        lambda t: ["optimized_metric=test/nll"],
        "error",
        "select on a validation metric",
    ),
    (
        "fractions_leave_nothing",
        lambda t: ["data.val_fraction=0.5", "data.test_fraction=0.5"],
        "error",
        "nothing to train on",
    ),
    ("no_validation_set", lambda t: ["data.val_fraction=0"], "error", "No val set"),
    ("class_not_in_data", lambda t: ["data.classes=[3,11]"], "error", "not a class"),
    ("image_size_tiny", lambda t: ["data.image_size=2"], "error", "data.image_size=2"),
    (
        "torchvision_set_offline",
        lambda t: ["data=cifar10", "data.source.download=false"],
        "error",
        "Run once with internet",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, cfg_factory, tmp_path, caplog):
    from tasks.train import train

    _, setup, outcome, expect = case
    made = setup(tmp_path)
    overrides, names = made if isinstance(made, tuple) else (made, [])
    cfg = cfg_factory("trainer.limit_train_batches=2", *overrides)
    if outcome == "error":
        with pytest.raises(UserError, match=expect.replace("[", r"\[").replace("(", r"\(")) as err:
            train(cfg)
        assert "\n" not in str(err.value)  # one line
        if case[0] == "weights_file_runs_code":
            assert (tmp_path / "victim").is_dir()  # the pickle's payload never ran
        return
    caplog.set_level("INFO")
    metrics, objects = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    if expect == "skipped":
        warning = "\n".join(r.getMessage() for r in caplog.records if "Skipped" in r.getMessage())
        assert "Skipped 3 unreadable file(s)" in warning
        assert all(name in warning for name in names)
        assert not any(
            i.endswith(tuple(names))
            for s in ("train", "val", "test")
            for i in objects["datamodule"].ids(s)
        )
    if expect == "head":
        assert any("new head" in r.getMessage() for r in caplog.records)
    if expect == "one batch":
        assert any("single batch" in r.getMessage() for r in caplog.records)


def test_odd_images_become_sensible_rgb(tmp_path):
    from datamodules.sources.folder import load_rgb

    root = _folder(tmp_path / "imgs", n=1)
    _odd_modes(root)
    sixteen = np.asarray(load_rgb(root / "cat" / "sixteen.png"))
    assert (
        sixteen.shape == (20, 24, 3) and sixteen.max() > 100 and sixteen.min() < 5
    )  # scaled, not clipped white
    rotated = load_rgb(root / "cat" / "rotated.jpg")
    assert rotated.size == (10, 40)  # EXIF orientation honoured
    assert load_rgb(root / "cat" / "cmyk.jpg").mode == "RGB"
    assert np.asarray(load_rgb(root / "dog" / "palette.png")).max() == 0  # transparent -> black
