"""The data contract: what a checkpoint or a run directory must carry so that reusing it is right.

Each test here reproduces a way the verdict could be silently wrong when a checkpoint or a split
is reused (a kept foreign head, leaking splits, a predict/eval/visualize fed other pixels, TTA
crops that are not torchvision's, an unfreeze schedule that drifts), and checks the contract
that prevents it.
"""

from __future__ import annotations

import logging
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.errors import UserError
from lightning_modules.run_outputs import load_predictions, read_metrics
from tests.conftest import compose_cfg

TINY = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
TINY += ["trainer.num_sanity_val_steps=0", "tta=none", "augment=none"]


def _train(tmp_path, *overrides):
    from tasks.train import train

    return train(compose_cfg(tmp_path, [*TINY, *overrides]))


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory):
    """A tiny run on digits 0-4 (split_seed 0): the pretraining step of the transfer demo."""
    run_dir = tmp_path_factory.mktemp("pretrain")
    _train(run_dir, "data.classes=[0,1,2,3,4]", "finetune=scratch")
    return run_dir


def _finetune_model(tmp_path, weights, *overrides):
    """Data module and model as a fine-tuning run from ``weights`` builds them (no training)."""
    from tasks.instantiate import instantiate
    from tasks.seed import seed_run
    from tasks.train import build_model

    cfg = compose_cfg(tmp_path, [f"model.weights={weights}", *TINY, *overrides])
    seed_run(cfg.seed)
    dm = instantiate(cfg.data, seed=cfg.seed, _convert_="all")
    dm.setup("fit")
    model, _ = build_model(cfg, dm)
    return dm, model


def _head(state: dict, prefix: str = "net.") -> torch.Tensor:
    return state[f"{prefix}fc.weight"]


# ---------------------------------------------------------------------------- 1. the head
@pytest.mark.slow
def test_a_head_trained_on_other_classes_is_reinitialised_and_the_log_names_both(
    pretrain, tmp_path, caplog
):
    ckpt = pretrain / "checkpoints" / "best.ckpt"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    caplog.set_level(logging.INFO)
    _, model = _finetune_model(tmp_path, ckpt, "data.classes=[5,6,7,8,9]", "finetune=linear_probe")
    head = model.net.get_classifier().weight
    assert head.shape == _head(saved).shape  # five classes each: the shapes match
    assert not torch.allclose(head, _head(saved))  # but the 0-4 head is not kept
    # the backbone did come from the checkpoint
    assert torch.equal(model.net.conv1[0].weight, saved["net.conv1.0.weight"])
    line = [r.getMessage() for r in caplog.records if "head" in r.getMessage().lower()]
    assert any("['0', '1', '2', '3', '4']" in m and "['5', '6', '7', '8', '9']" in m for m in line)


@pytest.mark.slow
def test_a_head_trained_on_the_same_classes_in_order_is_kept(pretrain, tmp_path):
    ckpt = pretrain / "checkpoints" / "best.ckpt"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    _, model = _finetune_model(tmp_path, ckpt, "data.classes=[0,1,2,3,4]", "finetune=full")
    assert torch.equal(model.net.get_classifier().weight, _head(saved))


def test_a_plain_state_dict_of_unknown_classes_gets_a_new_head(tmp_path, caplog):
    """A .pth/.safetensors file says nothing of its classes: its head is not trusted either."""
    import timm

    from lightning_modules.weights import load_weights

    donor = timm.create_model("test_resnet", num_classes=10)
    torch.save(donor.state_dict(), tmp_path / "w.pth")
    net = timm.create_model("test_resnet", num_classes=10)
    caplog.set_level(logging.INFO)
    report = load_weights(net, tmp_path / "w.pth", class_names=[str(i) for i in range(10)])
    assert torch.equal(net.conv1[0].weight, donor.conv1[0].weight)
    assert not torch.equal(net.fc.weight, donor.fc.weight)
    assert "fc.weight" in report.head_reinitialised
    assert any("unknown" in r.getMessage() for r in caplog.records)


def test_a_hub_head_is_kept_only_for_imagenets_own_classes(tmp_path):
    """timm keeps the 1000-class hub head for any 1000-class run: the rule renews it unless the
    run's classes are ImageNet's synsets in order."""
    import timm
    from safetensors.torch import save_file
    from timm.data import ImageNetInfo

    from lightning_modules.backbone import create_backbone
    from lightning_modules.weights import renew_hub_head

    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=1000)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))

    def hub_net():
        return create_backbone(
            name="test_resnet",
            num_classes=1000,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(tmp_path / "w.safetensors")},
        )

    imagenet = hub_net()
    assert not renew_hub_head(imagenet, ImageNetInfo().label_names())
    assert torch.equal(imagenet.fc.weight, source.fc.weight)
    other = hub_net()
    assert torch.equal(other.fc.weight, source.fc.weight)  # what timm alone does
    assert renew_hub_head(other, [f"class{i}" for i in range(1000)])
    assert not torch.equal(other.fc.weight, source.fc.weight)
    assert torch.equal(other.conv1[0].weight, source.conv1[0].weight)


# ---------------------------------------------------------------------------- 2. splits
def _digits_dm(**kw):
    from datamodules import ImageDataModule
    from datamodules.sources import DigitsSource

    dm = ImageDataModule(source=DigitsSource(image_size=8), image_size=8, **kw)
    dm.setup()
    return dm


def test_keeping_some_classes_gives_the_all_classes_split_restricted_to_them():
    full, part = _digits_dm(), _digits_dm(classes=[5, 6, 7, 8, 9])
    kept = {f"digits/{i}" for i, t in enumerate(_digits_targets()) if t >= 5}
    for split in ("train", "val", "test"):
        assert set(part.ids(split)) == set(full.ids(split)) & kept, split
    # and the held-out counts are still stratified: 15 % of each class, within one image
    targets = _digits_targets()
    for cls in range(5, 10):
        n = int((targets == cls).sum())
        got = sum(targets[int(i.split("/")[1])] == cls for i in part.ids("test"))
        assert abs(got - 0.15 * n) <= 1


def _digits_targets() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target


def test_max_per_class_keeps_the_same_images_whatever_other_classes_are_kept():
    full = _digits_dm(max_per_class=10)
    part = _digits_dm(max_per_class=10, classes=[5, 6, 7, 8, 9])
    kept = {f"digits/{i}" for i, t in enumerate(_digits_targets()) if t >= 5}
    assert set(part.ids("train")) == set(full.ids("train")) & kept
    assert len(part.ids("train")) == 50


def _folder(root, counts, start=0):
    rng = np.random.default_rng(start)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + n):
            arr = rng.integers(0, 255, size=(12, 12, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i:03d}.png")
    return root


def _splits(root) -> dict[str, str]:
    from datamodules import ImageDataModule
    from datamodules.sources import ImageFolderSource

    dm = ImageDataModule(source=ImageFolderSource(root=str(root)), image_size=8)
    dm.setup()
    return {i: s for s in ("train", "val", "test") for i in dm.ids(s)}


def test_adding_images_to_one_class_folder_moves_no_image_of_another_class(tmp_path):
    root = _folder(tmp_path / "imgs", {"ant": 30, "bee": 30, "cow": 30})
    before = _splits(root)
    _folder(root, {"bee": 7}, start=30)  # seven new bees
    after = _splits(root)
    moved = {i for i in before if before[i] != after[i]}
    assert not {i for i in moved if not i.startswith("bee/")}
    # within the grown class only the few images at the count boundaries may move
    assert len(moved) <= 2
    # removing a class folder moves nothing either
    shutil.rmtree(root / "ant")
    without = _splits(root)
    assert all(without[i] == after[i] for i in without)


# ---------------------------------------------------------------------------- 3. eval/predict
def _export_test_images(dm, folder, *, labelled: bool):
    """The test split of ``dm`` as PNG files (lossless: the same uint8 pixels)."""
    ds = dm.datasets["test"]
    paths = {}
    for row, idx in enumerate(ds.indices):
        image = ds.pool.load(int(idx))
        if isinstance(image, torch.Tensor):
            image = Image.fromarray(image.permute(1, 2, 0).numpy())
        sub = folder / (dm.class_names[int(ds.targets[row])] if labelled else "")
        sub.mkdir(parents=True, exist_ok=True)
        name = dm.ids("test")[row].replace("/", "_")
        image.save(sub / f"{name}.png")
        paths[dm.ids("test")[row]] = (sub / f"{name}.png").resolve()
    return paths


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A run on an image folder at input settings that differ from the digits defaults in
    every field (size, mean, std, crop, interpolation, mirror invariance)."""
    base = tmp_path_factory.mktemp("folder_run")
    digits = _digits_dm(classes=[0, 1, 2], test_fraction=0.3)
    root = base / "images"
    for split in ("train", "val", "test"):
        ds = digits.datasets[split]
        for row, idx in enumerate(ds.indices):
            arr = (ds.pool.load(int(idx)).permute(1, 2, 0).numpy() * 1).astype(np.uint8)
            name = digits.class_names[int(ds.targets[row])]
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).resize((30, 26)).save(root / name / f"{split}{row:03d}.png")
    run_dir = base / "run"
    _train(
        run_dir,
        "data=folder",
        f"data.root={root}",
        "data.image_size=24",
        "data.mean=[0.3,0.3,0.3]",
        "data.std=[0.2,0.2,0.2]",
        "data.eval_crop_pct=0.9",
        "data.interpolation=bicubic",
        "data.num_workers=0",
        "tta=flip",
        "trainer.max_epochs=2",
    )
    return run_dir, root


@pytest.mark.slow
def test_eval_of_a_run_needs_none_of_its_data_options(folder_run, tmp_path):
    from tasks.evaluate import evaluate

    run_dir, _ = folder_run
    metrics, _ = evaluate(compose_cfg(tmp_path, ["task=eval", f"ckpt_path={run_dir}", "tta=flip"]))
    trained = read_metrics(run_dir)
    for key in ("test/acc", "test/nll", "test_tta/acc"):
        assert metrics[key] == pytest.approx(trained[key], abs=1e-5), key
    assert load_predictions(tmp_path)["ids"].tolist() == load_predictions(run_dir)["ids"].tolist()


@pytest.mark.slow
def test_eval_on_moved_data_follows_data_root_into_the_source(folder_run, tmp_path):
    from tasks.evaluate import evaluate

    run_dir, root = folder_run
    moved = shutil.copytree(root, tmp_path / "moved")
    cfg = compose_cfg(
        tmp_path / "e", ["task=eval", f"ckpt_path={run_dir}", "tta=none", f"data.root={moved}"]
    )
    metrics, objects = evaluate(cfg)
    assert str(objects["datamodule"].source.root) == str(moved)
    assert metrics["test/acc"] == pytest.approx(read_metrics(run_dir)["test/acc"], abs=1e-6)


@pytest.mark.slow
def test_tta_scores_the_same_images_as_a_limited_test(folder_run, tmp_path):
    from tasks.evaluate import evaluate

    run_dir, _ = folder_run
    cfg = compose_cfg(
        tmp_path,
        [
            "task=eval",
            f"ckpt_path={run_dir}",
            "tta=flip",
            "trainer.limit_test_batches=2",
            "data.eval_batch_size=8",
        ],
    )
    evaluate(cfg)
    single, tta = load_predictions(tmp_path, "test"), load_predictions(tmp_path, "test_tta")
    assert len(single["ids"]) == 16 and tta["ids"].tolist() == single["ids"].tolist()


@pytest.mark.slow
def test_eval_refuses_an_ensemble_tested_on_other_splits_or_of_old_and_new_members(
    folder_run, tmp_path
):
    from tasks.evaluate import evaluate

    run_dir, _ = folder_run
    other = shutil.copytree(run_dir, tmp_path / "other")
    ckpt = torch.load(other / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["data_contract"]["split_seed"] = 7
    torch.save(ckpt, other / "checkpoints" / "best.ckpt")
    with pytest.raises(UserError, match="split_seed: 0 vs 7"):
        evaluate(compose_cfg(tmp_path / "e", ["task=eval", f"ckpt_path=[{run_dir},{other}]"]))
    ckpt.pop("data_contract")
    torch.save(ckpt, other / "checkpoints" / "best.ckpt")
    with pytest.raises(UserError, match="carry no data contract"):
        evaluate(compose_cfg(tmp_path / "f", ["task=eval", f"ckpt_path=[{run_dir},{other}]"]))


@pytest.mark.slow
def test_predict_uses_the_checkpoints_input_settings_not_the_current_data_config(
    folder_run, tmp_path
):
    import csv

    from tasks.predict import predict

    run_dir, root = folder_run
    saved = load_predictions(run_dir, "test")
    test_ids = set(saved["ids"].tolist())
    images = tmp_path / "new"
    images.mkdir()
    for rel in test_ids:
        shutil.copy(root / rel, images / rel.replace("/", "_"))
    for tta, split in (("none", "test"), ("flip", "test_tta")):
        out = tmp_path / f"{tta}.csv"
        predict(
            compose_cfg(
                tmp_path / tta,
                [
                    "task=predict",
                    f"predict.input={images}",
                    f"ckpt_path={run_dir}",
                    f"tta={tta}",
                    f"predict.output={out}",
                ],
            )
        )
        rows = {r["path"]: r for r in csv.DictReader(out.open())}
        expected = load_predictions(run_dir, split)
        names = expected["class_names"].tolist()
        for rel, probs in zip(expected["ids"].tolist(), expected["probs"], strict=True):
            row = rows[str((images / rel.replace("/", "_")).resolve())]
            got = np.array([float(row[f"prob_{c}"]) for c in names])
            assert np.allclose(got, probs, atol=1e-4), (tta, rel)


@pytest.mark.slow
def test_visualize_a_folder_scores_like_the_runs_test(folder_run, tmp_path):
    from tasks.visualize import visualize

    run_dir, root = folder_run
    images = tmp_path / "labelled"
    saved = load_predictions(run_dir, "test")
    for rel in saved["ids"].tolist():
        (images / rel.split("/")[0]).mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, images / rel)
    cfg = compose_cfg(
        tmp_path / "out",
        [
            "task=visualize",
            f"ckpt_path={run_dir}",
            f"visualize.images={images}",
            "visualize.num_images=2",
        ],
    )
    metrics, _ = visualize(cfg)
    assert metrics["acc"] == pytest.approx(read_metrics(run_dir)["test/acc"], abs=1e-6)


@pytest.mark.slow
def test_an_explicit_different_data_value_gets_one_warning(folder_run, tmp_path, caplog):
    from tasks.evaluate import evaluate

    run_dir, _ = folder_run
    caplog.set_level(logging.WARNING)
    evaluate(
        compose_cfg(
            tmp_path, ["task=eval", f"ckpt_path={run_dir}", "tta=none", "data.image_size=28"]
        )
    )
    warned = [r.getMessage() for r in caplog.records if "image_size" in r.getMessage()]
    assert len(warned) == 1 and "24" in warned[0] and "28" in warned[0]


@pytest.mark.slow
def test_ensemble_members_with_different_input_settings_are_refused(folder_run, tmp_path):
    from tasks.evaluate import evaluate

    run_dir, _ = folder_run
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    ckpt = torch.load(other / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["data_contract"]["input"]["image_size"] = 28
    torch.save(ckpt, other / "checkpoints" / "best.ckpt")
    with pytest.raises(UserError, match="image_size"):
        evaluate(compose_cfg(tmp_path / "e", ["task=eval", f"ckpt_path=[{run_dir},{other}]"]))


@pytest.mark.slow
def test_the_ensemble_report_refuses_members_with_different_contracts(seed_sweep, tmp_path):
    import json

    from tasks.ensemble import report_runs

    sweep_dir, _ = seed_sweep
    copies = [shutil.copytree(sweep_dir / job, tmp_path / job) for job in ("0", "1")]
    contract = json.loads((copies[1] / "contract.json").read_text())
    contract["input"]["mean"] = [0.4, 0.4, 0.4]
    (copies[1] / "contract.json").write_text(json.dumps(contract))
    with pytest.raises(UserError, match=r"input.mean: \[0.5, 0.5, 0.5\] vs \[0.4, 0.4, 0.4\]"):
        report_runs(copies, tmp_path / "report", strict=True)


@pytest.mark.slow
def test_resuming_with_another_backbone_names_both(pretrain, tmp_path):
    from tasks.train import train

    cfg = compose_cfg(
        tmp_path,
        [
            *TINY,
            "data.classes=[0,1,2,3,4]",
            "finetune=scratch",
            "model.backbone=test_efficientnet",
            f"ckpt_path={pretrain / 'checkpoints' / 'last.ckpt'}",
        ],
    )
    with pytest.raises(UserError, match="backbone: 'test_resnet' vs 'test_efficientnet'"):
        train(cfg)


def test_resuming_a_finished_checkpoint_into_a_new_run_is_refused(pretrain, tmp_path):
    """``ckpt_path=<other run>/last.ckpt`` that has already trained ``max_epochs`` epochs: the
    new run would train nothing and report the other run's best checkpoint as its own."""
    from tasks.train import train

    last = pretrain / "checkpoints" / "last.ckpt"
    before = last.stat().st_mtime_ns
    overrides = [*TINY, "data.classes=[0,1,2,3,4]", "finetune=scratch", f"ckpt_path={last}"]
    with pytest.raises(
        UserError,
        match=r"trained 1 epoch\(s\) and trainer.max_epochs=1, so there is nothing left to train.*trainer.max_epochs=2",
    ):
        train(compose_cfg(tmp_path / "new", overrides))
    assert last.stat().st_mtime_ns == before and not (tmp_path / "new" / "metrics.json").exists()
    # with epochs left it trains on, and its best checkpoint is its own
    metrics, _ = train(compose_cfg(tmp_path / "more", [*overrides, "trainer.max_epochs=2"]))
    assert metrics["epochs"] == 2 and (tmp_path / "more" / metrics["best_ckpt"]).is_file()


@pytest.mark.slow
def test_a_checkpoint_without_a_contract_still_loads_with_one_warning(seed_sweep, tmp_path, caplog):
    from tasks.evaluate import evaluate

    sweep_dir, _ = seed_sweep
    ckpt = torch.load(sweep_dir / "0" / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt.pop("data_contract", None)
    torch.save(ckpt, tmp_path / "old.ckpt")
    caplog.set_level(logging.WARNING)
    metrics, _ = evaluate(
        compose_cfg(tmp_path / "e", ["task=eval", f"ckpt_path={tmp_path / 'old.ckpt'}"])
    )
    assert metrics["test/acc"] == pytest.approx(read_metrics(sweep_dir / "0")["test/acc"])
    assert sum("no data contract" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.slow
def test_every_run_records_its_contract_and_splits(pretrain):
    from lightning_modules.data_contract import read_run_contract, read_splits

    contract = read_run_contract(pretrain)
    ckpt = torch.load(pretrain / "checkpoints" / "best.ckpt", weights_only=True)
    assert ckpt["data_contract"]["splits"] == contract["splits"]
    assert contract["backbone"] == "test_resnet"
    assert contract["class_names"] == ["0", "1", "2", "3", "4"]
    assert contract["input"] == {
        "image_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    assert contract["mirror_invariant"] is False and contract["split_seed"] == 0
    splits = read_splits(pretrain)
    assert set(splits) == {"train", "val", "test"}
    assert splits["test"] == load_predictions(pretrain)["ids"].tolist()
    assert not set(splits["train"]) & set(splits["test"])


# ---------------------------------------------------------------------------- leak guard
@pytest.mark.slow
def test_fine_tuning_on_images_the_weights_were_trained_on_is_refused(pretrain, tmp_path):
    ckpt = pretrain / "checkpoints" / "best.ckpt"
    with pytest.raises(UserError, match=r"\d+ of the \d+ validation/test images .*split_seed"):
        _finetune_model(tmp_path / "a", ckpt, "data.classes=[0,1,2]", "data.split_seed=1")
    # the same split seed: the subset's held-out images were held out in pretraining too
    dm, _ = _finetune_model(tmp_path / "b", ckpt, "data.classes=[0,1,2]")
    from lightning_modules.data_contract import read_splits

    trained_on = set(read_splits(pretrain)["train"])
    assert not trained_on & set(dm.ids("val") + dm.ids("test"))


@pytest.mark.slow
def test_the_leak_guard_can_be_switched_off_knowingly(pretrain, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    _finetune_model(
        tmp_path,
        pretrain / "checkpoints" / "best.ckpt",
        "data.split_seed=1",
        "allow_split_overlap=true",
        "data.classes=[0,1,2,3,4]",
    )
    assert any("allow_split_overlap" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------- 4. TTA crops
@pytest.mark.parametrize("mode", ["five_crop", "ten_crop"])
def test_crop_views_are_torchvisions_crops_of_the_whole_resized_image(mode):
    from torchvision.transforms import InterpolationMode, v2

    from lightning_modules.tta import TestTimeAugmentation

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, size=(60, 75, 3), dtype=np.uint8))
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    tta = TestTimeAugmentation(mode=mode, crop_pct=0.8, interpolation="bicubic")
    (views,) = tta.image_views(image_size=32, mean=mean, std=std, interpolation="bicubic")(image)
    crop = v2.TenCrop(32) if mode == "ten_crop" else v2.FiveCrop(32)
    resize = v2.Resize(math.floor(32 / 0.8), interpolation=InterpolationMode.BICUBIC)
    resized = resize(v2.ToImage()(image))
    crops = torch.stack([torch.as_tensor(c) for c in crop(resized)])
    reference = v2.Normalize(mean, std)(v2.ToDtype(torch.float32, scale=True)(crops))
    assert views.shape == (10 if mode == "ten_crop" else 5, 3, 32, 32)
    assert torch.allclose(views, reference, atol=1e-6)
    # the corners reach the border of the whole image: 40 x 50 after the resize, not 32 x 32
    assert resized.shape[-2:] == (40, 50)


@pytest.mark.slow
def test_test_time_augmentation_scores_the_views_of_the_whole_image(tmp_path):
    """End to end: the TTA probabilities of a run are the softmax average over those crops."""
    from tasks.instantiate import instantiate
    from tasks.train import train

    cfg = compose_cfg(
        tmp_path, [*TINY[:-2], "tta=five_crop", "data.eval_crop_pct=0.8", "augment=none"]
    )
    _, objects = train(cfg)
    dm, model = objects["datamodule"], objects["model"].eval()
    tta = instantiate(cfg.tta, mirror_invariant=False, interpolation=dm.interpolation).tta
    views = tta.image_views(
        image_size=dm.image_size, mean=dm.mean, std=dm.std, interpolation=dm.interpolation
    )
    ds = dm.datasets["test"]
    with torch.no_grad():
        first = torch.stack([views(ds.pool.load(int(i)))[0] for i in ds.indices[:8]])
        probs = model(first.flatten(0, 1)).softmax(-1).unflatten(0, first.shape[:2]).mean(1)
    saved = load_predictions(tmp_path, "test_tta")
    assert np.allclose(saved["probs"][:8], probs.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------- 5. the schedule
@pytest.mark.slow
@pytest.mark.parametrize(
    "limits",
    [
        ["trainer.max_epochs=-1", "trainer.max_steps=9"],
        ["trainer.max_epochs=5", "trainer.max_steps=7"],
    ],
)
def test_unfreeze_steps_follow_the_training_loaders_length(limits, tmp_path):
    from tasks.train import train

    cfg = compose_cfg(
        tmp_path,
        [
            "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0",
            "tta=none",
            "finetune=progressive",
            "finetune.callback.milestones=[1,2]",
            "callbacks.early_stopping=null",
            *limits,
        ],
    )
    _, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.num_training_batches == 3
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    starts = sorted({f.start_step for f in scheduler.lr_lambdas if 0 < f.start_step < 2**62})
    assert starts == [3, 6]  # epoch 1 and 2 start after 3 and 6 optimizer steps
