"""The LR range test: on a problem whose stable range is known it suggests an LR inside it;
layer groups keep their multipliers; task=lr_find and model.optimizer.lr=auto end to end."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_modules.lr_finder import lr_range_test


def _noisy_quadratic(curvatures, n_batches=50):
    """f(w) = 1/2 sum(c_i (w_i - xi_i)^2), xi a fresh small target per batch: plain gradient
    descent is stable exactly for lr < 2 / max(c); the noise keeps the loss off zero."""
    w = torch.nn.Parameter(torch.ones(len(curvatures)))
    c = torch.tensor(curvatures)
    g = torch.Generator().manual_seed(0)
    batches = [0.1 * torch.randn(len(curvatures), generator=g) for _ in range(n_batches)]
    return w, batches, lambda xi: 0.5 * (c * (w - xi) ** 2).sum()


def test_the_suggestion_lies_in_the_stable_range_of_a_known_problem():
    w, batches, loss_of = _noisy_quadratic([10.0, 3.0, 1.0, 0.3])
    stable = 2 / 10.0  # gradient descent diverges above this
    finding = lr_range_test(torch.optim.SGD([w], lr=1.0), loss_of, batches, steps=200)
    assert finding.diverged  # the sweep to lr=1 went past the edge and stopped there
    assert stable < finding.lrs[-1] < 5 * stable
    assert stable / 100 < finding.suggestion < stable
    assert finding.lrs == sorted(finding.lrs) and len(finding.lrs) == len(finding.losses)


def test_groups_keep_their_multipliers():
    a = torch.nn.Parameter(torch.ones(1))
    b = torch.nn.Parameter(torch.ones(1))
    seen = []
    opt = torch.optim.SGD([{"params": [a], "lr_mult": 1.0}, {"params": [b], "lr_mult": 0.1}], lr=1)

    def loss_of(_):
        seen.append([g["lr"] for g in opt.param_groups])
        return (a**2 + b**2).sum()

    lr_range_test(opt, loss_of, [None], min_lr=1e-4, max_lr=1e-2, steps=10)
    assert all(low == pytest.approx(high * 0.1) for high, low in seen)
    assert seen[0][0] == pytest.approx(1e-4) and seen[-1][0] == pytest.approx(1e-2)


@pytest.mark.slow
def test_task_lr_find_per_strategy_and_lr_auto(cfg_factory, tmp_path):
    import tasks
    from lightning_modules.run_outputs import read_metrics

    small = ["lr_find.steps=30", "trainer.limit_train_batches=2"]
    cfg = cfg_factory("task=lr_find", "lr_find.strategies=[scratch,full]", *small)
    metrics, objects = tasks.run_task(cfg)
    assert set(metrics) == {"lr_find/scratch", "lr_find/full"}
    saved = json.loads((tmp_path / "lr_find.json").read_text())
    assert saved["full"]["suggestion"] == pytest.approx(metrics["lr_find/full"])
    assert (tmp_path / "lr_find.png").stat().st_size > 10_000

    run = tmp_path / "auto"
    cfg = cfg_factory("model.optimizer.lr=auto", "finetune=scratch", *small, f"hydra.run.dir={run}")
    with_auto = cfg.copy()
    from omegaconf import open_dict

    with open_dict(with_auto):
        with_auto.paths.output_dir = str(run)
    trained, _ = tasks.run_task(with_auto)
    found = json.loads((run / "lr_find.json").read_text())["scratch"]["suggestion"]
    assert read_metrics(run)["lr"] == pytest.approx(found) == pytest.approx(trained["lr"])
    assert 1e-6 < found < 1.0


def test_progressive_is_tested_with_every_group_it_will_unfreeze(
    cfg_factory, tmp_path, monkeypatch
):
    """The LR holds for the whole run: tested at the first, head-only stage, progressive's
    suggestion was 2-3x too high for the backbone (29-39 % vs 80.9 % at 10 labels per class)."""
    import timm

    import lightning_modules.lr_finder as finder
    from tasks.lr_find import find_lr

    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), weights)
    seen = {}

    def fake_range_test(optimizer, loss_of, loader, **kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        seen["trainable"] = [p.requires_grad for p in params]
        return finder.LRFinding(
            suggestion=1e-3, minimum=1e-2, steepest=1e-3, diverged=False, lrs=[], losses=[]
        )

    monkeypatch.setattr(finder, "lr_range_test", fake_range_test)
    for strategy, all_trainable in (("progressive", True), ("linear_probe", False)):
        cfg = cfg_factory(
            f"finetune={strategy}", f"model.weights={weights}", "trainer.max_epochs=10"
        )
        from tasks.instantiate import instantiate

        dm = instantiate(cfg.data, _convert_="all")
        dm.setup("fit")
        find_lr(cfg, dm)
        assert all(seen["trainable"]) is all_trainable, strategy
        assert any(seen["trainable"])  # the head, at least


def test_a_range_test_over_a_few_images_says_its_suggestion_is_noise(cfg_factory, caplog):
    from tasks.instantiate import instantiate
    from tasks.lr_find import warn_if_memorised

    dm = instantiate(cfg_factory("data.max_per_class=5").data, _convert_="all")
    dm.setup("fit")
    with caplog.at_level("WARNING"):
        assert warn_if_memorised(100, dm) == pytest.approx(100.0)  # 100 steps of all 50 images
    assert "over 50 training images (100 passes)" in caplog.text
    caplog.clear()
    big = instantiate(cfg_factory().data, _convert_="all")
    big.setup("fit")
    assert warn_if_memorised(30, big) < 3 and "range test" not in caplog.text
