"""The frozen-feature cache trains the same head as the uncached path, computing features once."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from datamodules import feature_cache


@pytest.fixture(scope="module")
def pretrained_ckpt(tmp_path_factory):
    from tasks.train import train
    from tests.conftest import compose_cfg

    out = tmp_path_factory.mktemp("pretrain")
    train(
        compose_cfg(
            out,
            [
                "trainer.max_epochs=2",
                "trainer.limit_train_batches=10",
                "finetune=scratch",
                "model.optimizer.lr=0.01",
            ],
        )
    )
    return out / "checkpoints" / "best.ckpt"


@pytest.mark.slow
def test_cached_linear_probe_matches_the_uncached_path(
    cfg_factory, tmp_path, pretrained_ckpt, monkeypatch
):
    from tasks.train import train
    from tests.conftest import compose_cfg

    common = [
        "finetune=linear_probe",
        f"model.weights={pretrained_ckpt}",
        "augment=none",
        "trainer.max_epochs=2",
        "model.optimizer.lr=0.01",
        "trainer.deterministic=true",
    ]
    calls = []
    real = feature_cache.compute_features
    monkeypatch.setattr(
        feature_cache, "compute_features", lambda *a, **k: calls.append(a[2]) or real(*a, **k)
    )
    feature_cache._MEMORY.clear()
    cached, objs = train(compose_cfg(tmp_path / "cached", common))
    assert calls == ["train", "val", "test"]  # computed once per split
    plain, _ = train(compose_cfg(tmp_path / "plain", [*common, "finetune.cache_features=false"]))
    assert cached["test/acc"] > 0.3  # the pretrained features are informative (chance: 0.1)
    assert cached["test/acc"] == pytest.approx(plain["test/acc"], abs=0.02)
    assert cached["test/nll"] == pytest.approx(plain["test/nll"], rel=0.02)
    # the checkpointed model works on images again, and the backbone did not change
    model = objs["model"].eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    state = torch.load(pretrained_ckpt, weights_only=True)["state_dict"]
    assert torch.equal(model.net.layer2[0].conv1.weight, state["net.layer2.0.conv1.weight"])

    # a second run of the same backbone and data reuses the features (memory, then file)
    calls.clear()
    train(compose_cfg(tmp_path / "again", [*common, "seed=5"]))
    assert calls == []
    feature_cache._MEMORY.clear()
    cfg = compose_cfg(tmp_path / "again2", [*common, "seed=6"])
    cfg.paths.data_dir = str(tmp_path / "cached" / "data")  # where the first run cached them
    train(cfg)
    assert calls == []
    assert list((tmp_path / "cached" / "data" / "cache" / "features").glob("*.pt"))


class BatchProbe(pl.Callback):
    """Test probe: (epoch, batch dimensions) of every training batch, after the device hooks."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, batch[0].ndim))


@pytest.mark.slow
def test_progressive_head_stage_trains_on_cached_features_then_on_images(
    tmp_path, pretrained_ckpt, monkeypatch
):
    from datamodules.pca_jitter import BatchPCAJitter
    from tasks.train import train
    from tests.conftest import compose_cfg

    common = [
        "finetune=progressive",
        "finetune.callback.milestones=[2]",  # epochs 0-1: head only; epoch 2: top group too
        f"model.weights={pretrained_ckpt}",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=4",
        "model.optimizer.lr=0.01",
        "trainer.deterministic=true",
        f"+callbacks.probe._target_={__name__}.BatchProbe",
    ]
    jitter_calls = []
    real_jitter = BatchPCAJitter.__call__
    monkeypatch.setattr(
        BatchPCAJitter, "__call__", lambda *a, **k: jitter_calls.append(1) or real_jitter(*a, **k)
    )
    calls = []
    real_compute = feature_cache.compute_features
    monkeypatch.setattr(
        feature_cache,
        "compute_features",
        lambda *a, **k: calls.append(a[2]) or real_compute(*a, **k),
    )
    feature_cache._MEMORY.clear()
    cfg = compose_cfg(tmp_path / "cached", [*common, "finetune.cache_features=true"])
    cached, objs = train(cfg)
    probe = next(c for c in objs["trainer"].callbacks if isinstance(c, BatchProbe))
    # the head-only epochs see features (2-D), the unfrozen stage images (4-D) ...
    assert sorted(set(probe.seen)) == [(0, 2), (1, 2), (2, 4)]
    assert calls == ["train", "val", "test"]  # ... computed once
    # ... and the on-device PCA colour jitter of `augment=light` applies to image batches only
    assert len(jitter_calls) == sum(ndim == 4 for _, ndim in probe.seen) == 4
    before = torch.load(pretrained_ckpt, weights_only=True)["state_dict"]
    after = torch.load(tmp_path / "cached" / "checkpoints" / "last.ckpt", weights_only=True)
    after = after["state_dict"]
    for name in ("net.layer4.0.conv1.weight", "net.fc.weight"):  # the top group and the head
        assert not torch.equal(after[name], before[name]), name
    assert torch.equal(after["net.layer1.0.conv1.weight"], before["net.layer1.0.conv1.weight"])

    # without augmentation the cached head stage trains the same model as the uncached path
    feature_cache._MEMORY.clear()
    plain, _ = train(compose_cfg(tmp_path / "plain", [*common, "augment=none"]))
    cached, _ = train(
        compose_cfg(tmp_path / "cached2", [*common, "augment=none", "finetune.cache_features=true"])
    )
    assert cached["test/acc"] == pytest.approx(plain["test/acc"], abs=0.02)
    assert cached["test/nll"] == pytest.approx(plain["test/nll"], rel=0.05)


def test_an_image_file_replaced_under_the_same_name_is_a_new_feature_cache_key(tmp_path):
    """Ids alone would serve the old image's features: the key covers each file's size and
    times too."""
    import timm
    from PIL import Image

    from datamodules import ImageDataModule
    from datamodules.sources import ImageFolderSource

    for c, cls in enumerate(("a", "b")):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.new("RGB", (40, 30), (40 * i, 100 * c, 50)).save(tmp_path / cls / f"{i}.png")
    net = timm.create_model("test_resnet", num_classes=2)

    def key() -> str:
        dm = ImageDataModule(source=ImageFolderSource(root=str(tmp_path)), image_size=32)
        dm.setup()
        return feature_cache.cache_key(net, dm)

    before = key()
    assert key() == before  # nothing changed: the same key, the cache is reused
    Image.new("RGB", (40, 30), (255, 255, 255)).save(tmp_path / "a" / "0.png")
    assert key() != before
