"""The frozen-feature cache trains the same head as the uncached path, computing features once."""

from __future__ import annotations

import pytest
import torch

from lightning_modules import feature_cache


@pytest.fixture(scope="module")
def pretrained_ckpt(tmp_path_factory):
    from run import train
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


def test_cached_linear_probe_matches_the_uncached_path(
    cfg_factory, tmp_path, pretrained_ckpt, monkeypatch
):
    from run import train
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
    model = objs["model"]
    assert model.inputs == "images"
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
