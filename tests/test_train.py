"""train(cfg) in-process: the run contract (metrics.json, predictions), learning, determinism."""

import json

import numpy as np
import pytest

from datamodules.errors import UserError
from lightning_modules.run_outputs import load_predictions, read_metrics


@pytest.mark.slow
def test_train_writes_metrics_and_predictions(cfg_factory, tmp_path):
    from tasks.train import train

    cfg = cfg_factory("trainer.limit_train_batches=3", "seed=0")
    metrics, objects = train(cfg)
    saved = read_metrics(tmp_path)
    assert saved["seed"] == 0  # seed=0 is a real seed, not "no seed"
    for key in ("val/acc_best", "test/acc", "test/nll", "test/ece", "test/acc_top5", "train/loss"):
        assert key in saved, key
        assert saved[key] == pytest.approx(metrics[key])
    assert (tmp_path / saved["best_ckpt"]).is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    pred = load_predictions(tmp_path, "test")
    dm = objects["datamodule"]
    n = len(dm.ids("test"))
    assert pred["probs"].shape == (n, 10) and pred["probs"].dtype == np.float32
    assert np.allclose(pred["probs"].sum(1), 1, atol=1e-5)
    assert pred["ids"].tolist() == dm.ids("test")  # stable ids, in data order
    assert pred["targets"].tolist() == dm.datasets["test"].targets.tolist()
    assert pred["class_names"].tolist() == [str(i) for i in range(10)]
    # the saved predictions are the ones the metrics were computed from
    acc = (pred["probs"].argmax(1) == pred["targets"]).mean()
    assert acc == pytest.approx(saved["test/acc"], abs=1e-6)
    nll = -np.log(pred["probs"][np.arange(n), pred["targets"]]).mean()
    assert nll == pytest.approx(saved["test/nll"], rel=1e-3)
    onehot = np.eye(10)[pred["targets"]]
    brier = ((pred["probs"] - onehot) ** 2).sum(1).mean()
    assert brier == pytest.approx(saved["test/brier"], abs=1e-6)
    # ... and the loggers see the same test/brier as metrics.json
    logged = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    header, last = logged[0].split(","), logged[-1].split(",")
    assert float(last[header.index("test/brier")]) == pytest.approx(brier, abs=1e-5)
    # the epoch's validation metrics are over the validation images alone (not the sanity
    # check's batch), per image: they match the best (= only) epoch's validation predictions
    epoch = next(r.split(",") for r in logged[1:] if r.split(",")[header.index("val/acc")])
    val = load_predictions(tmp_path, "val")
    m = len(val["targets"])
    val_acc = (val["probs"].argmax(1) == val["targets"]).mean()
    val_nll = -np.log(val["probs"][np.arange(m), val["targets"]]).mean()
    assert float(epoch[header.index("val/acc")]) == pytest.approx(val_acc, abs=1e-6)
    assert float(epoch[header.index("val/loss")]) == pytest.approx(val_nll, rel=1e-4)


@pytest.mark.slow
def test_model_learns_digits_well_above_chance(cfg_factory):
    from tasks.train import train

    cfg = cfg_factory("trainer.max_epochs=3", "augment=none", "model.optimizer.lr=0.01")
    metrics, _ = train(cfg)
    assert metrics["test/acc"] > 0.5  # chance is 0.1
    assert metrics["val/acc_best"] >= metrics["val/acc"] - 1e-9


@pytest.mark.slow
def test_same_seed_deterministic_runs_are_identical(tmp_path):
    from tasks.train import train
    from tests.conftest import compose_cfg

    overrides = ["trainer.deterministic=true", "trainer.limit_train_batches=4", "seed=7"]
    results = []
    for name in ("a", "b", "c"):
        extra = ["seed=8"] if name == "c" else []
        cfg = compose_cfg(tmp_path / name, overrides + extra)
        train(cfg)
        results.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert results[0] == results[1]
    assert results[0]["test/nll"] != results[2]["test/nll"]  # another seed, another model


@pytest.mark.slow
def test_unknown_backbone_suggests_close_names(cfg_factory):
    from tasks.train import train

    with pytest.raises(UserError, match="Did you mean: .*resnet18"):
        train(cfg_factory("model.backbone=resnet1"))


def test_fast_dev_run_tests_final_weights_without_a_checkpoint_warning(
    cfg_factory, tmp_path, caplog
):
    """``debug=fdr`` turns checkpointing off by design: testing the final weights is expected
    there, so the "no ModelCheckpoint" warning (meant for a config that dropped it) stays quiet."""
    import logging

    from tasks.train import train

    with caplog.at_level(logging.WARNING):
        metrics, _ = train(cfg_factory("debug=fdr"))
    assert metrics["best_ckpt"] is None and "test/acc" in metrics
    assert "No best checkpoint" not in caplog.text


def test_a_run_with_too_few_steps_says_so_once(cfg_factory, caplog):
    """100 training images in batches of 64 for 15 epochs are 30 optimizer steps: one warning
    naming the count and a batch size that gives enough; none for a run that has enough."""
    import logging

    from tasks.instantiate import instantiate
    from tasks.train import FEW_STEPS, warn_if_few_steps

    def steps(*overrides):
        cfg = cfg_factory("trainer.limit_train_batches=1.0", *overrides)
        dm = instantiate(cfg.data, _convert_="all")
        dm.setup("fit")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            return warn_if_few_steps(cfg, dm), caplog.text

    few, text = steps("data.max_per_class=10", "trainer.max_epochs=15")
    assert few == 30 and text.count("only 30 optimizer steps") == 1
    suggested = int(text.split("data.batch_size=")[-1].split(")")[0])
    assert 15 * -(-100 // suggested) >= FEW_STEPS  # the suggested batch size gives enough steps
    enough, text = steps(
        "data.max_per_class=10", "trainer.max_epochs=15", f"data.batch_size={suggested}"
    )
    assert enough >= FEW_STEPS and "optimizer steps" not in text
    default, text = steps("trainer.max_epochs=5")  # the default job: 1,259 images, batch 64
    assert default == 100 and "optimizer steps" not in text
    assert (
        steps("data.max_per_class=10", "trainer.max_epochs=15", "trainer.limit_train_batches=2")[0]
        is None
    )
