"""Soups and stored temperatures on real runs: members fine-tuned from one weights file."""

import csv
import json

import numpy as np
import pytest
import torch

from lightning_modules.calibration import apply_temperature
from lightning_modules.run_outputs import load_predictions, read_metrics
from tests.conftest import FAST, ONE_THREAD, compose_cfg, run_cli

# limit_test_batches: members test one batch of the 269 test images; soups are scored on those
TINY = ["trainer.limit_train_batches=3", "trainer.limit_test_batches=1"]
TINY += ["trainer.num_sanity_val_steps=0"]


@pytest.fixture(scope="module")
def souped(tmp_path_factory):
    """``python run.py -m seed=1,2 finetune=full model.weights=<one file>``: two members from
    identical initial backbone weights, hence soupable."""
    import timm

    tmp = tmp_path_factory.mktemp("souped")
    weights = tmp / "weights.pth"
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), weights)
    proc = run_cli(
        "-m",
        "seed=1,2",
        *FAST,
        *TINY,
        "finetune=full",
        f"model.weights={weights}",
        f"paths.log_dir={tmp}",
        f"hydra.sweep.dir={tmp}/sweep",
        timeout=400,
        env=ONE_THREAD,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "sweep", proc


def _net(path):
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[4:]: v for k, v in state.items() if k.startswith("net.")}


@pytest.mark.slow
def test_members_from_the_same_weights_are_souped(souped):
    sweep, _ = souped
    report = json.loads((sweep / "ensemble" / "report.json").read_text())
    soups = report["soups"]
    assert soups["soupable"] is True and soups["uniform"]["members"] == ["seed 1", "seed 2"]
    assert soups["uniform"]["bn_reestimated"] > 0  # test_resnet has BatchNorm
    members = [_net(sweep / r / "checkpoints" / "best.ckpt") for r in ("0", "1")]
    uniform = _net(sweep / "ensemble" / "soups" / "uniform.ckpt")
    stats = ("running_mean", "running_var", "num_batches_tracked")
    for key, value in uniform.items():
        if key.endswith(stats):
            continue
        mean = (members[0][key].double() + members[1][key].double()) / 2
        assert torch.allclose(value.double(), mean, atol=1e-6), key
    bn = next(k for k in uniform if k.endswith("running_mean"))
    assert not torch.allclose(uniform[bn], (members[0][bn] + members[1][bn]) / 2)  # re-estimated
    # the greedy soup starts from the member with the best validation accuracy (scored with
    # re-estimated statistics, like every candidate) and never ends below it
    alone = soups["greedy"]["member_val_acc"]
    assert soups["greedy"]["members"][0] == max(alone, key=alone.get)
    assert soups["greedy"]["val_acc"] >= max(alone.values()) - 1e-9
    for name in ("uniform soup", "greedy soup"):  # scored like members, single view and TTA
        assert name in report["intervals"]["test"] and name in report["intervals"]["test_tta"]
    soup_test = load_predictions(sweep / "ensemble" / "soups", "uniform_test")
    member_test = load_predictions(sweep / "0", "test")
    assert len(member_test["ids"]) < 269  # the limited test: one batch
    assert soup_test["ids"].tolist() == member_test["ids"].tolist()
    text = (sweep / "ensemble" / "report.md").read_text()
    assert "| uniform soup (seed 1, seed 2) | 1 |" in text
    assert "greedy soup − best member" in text


@pytest.mark.slow
def test_a_soup_checkpoint_is_evaluated_and_calibrated_like_a_run(souped, tmp_path):
    from lightning_modules.ensemble import load_classifier
    from tasks.evaluate import evaluate

    sweep, _ = souped
    soup = sweep / "ensemble" / "soups" / "greedy.ckpt"
    assert load_classifier(soup).hparams["backbone"] == "test_resnet"  # visualize's loader too
    stored = json.loads(soup.with_name("greedy.calibration.json").read_text())["temperature"]
    cfg = compose_cfg(tmp_path, ["task=eval", f"ckpt_path={soup}", "calibrate=true"])
    metrics, _ = evaluate(cfg)
    raw = load_predictions(sweep / "ensemble" / "soups", "greedy_test")
    mine = load_predictions(tmp_path, "test")
    by_id = dict(zip(mine["ids"].tolist(), mine["probs"], strict=True))
    scored = np.stack([by_id[i] for i in raw["ids"].tolist()])  # the images the report scored
    assert np.allclose(scored, raw["probs"], atol=1e-5)  # the soup as the report scored it
    calibrated = load_predictions(tmp_path, "test_calibrated")
    assert np.allclose(
        calibrated["probs"], apply_temperature(mine["probs"], stored["test"]), atol=1e-6
    )
    assert metrics["calibration/temperature"] == stored["test"]
    assert metrics["test_calibrated/acc"] == pytest.approx(metrics["test/acc"])
    assert read_metrics(tmp_path)["test_tta_calibrated/nll"] == metrics["test_tta_calibrated/nll"]


@pytest.mark.slow
def test_calibrate_applies_the_ensembles_pooled_temperature(souped, tmp_path):
    from tasks.evaluate import evaluate
    from tasks.predict import predict

    sweep, _ = souped
    pooled = json.loads((sweep / "ensemble" / "calibration.json").read_text())["temperature"]
    metrics, _ = evaluate(
        compose_cfg(
            tmp_path / "eval",
            ["task=eval", f"ckpt_path={sweep}", "calibrate=true", "tta=none", *TINY],
        )
    )
    assert metrics["calibration/temperature"] == pooled["test"]
    report = json.loads((sweep / "ensemble" / "report.json").read_text())
    assert metrics["test_calibrated/nll"] == pytest.approx(
        report["calibration"]["test"]["ensemble"]["nll"], abs=1e-5
    )
    # predict: the CSV's probabilities are the raw ensemble's, scaled by that temperature
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((8, 8)) * 255).astype(np.uint8)).save(
            tmp_path / "images" / f"{i}.png"
        )
    rows = {}
    for calibrate in ("false", "true"):
        out = tmp_path / f"{calibrate}.csv"
        predict(
            compose_cfg(
                tmp_path / calibrate,
                [
                    "task=predict",
                    f"predict.input={tmp_path}/images",
                    f"ckpt_path={sweep}",
                    "tta=none",
                    f"calibrate={calibrate}",
                    f"predict.output={out}",
                ],
            )
        )
        with open(out, newline="") as fh:
            rows[calibrate] = [
                [float(r[f"prob_{i}"]) for i in range(10)] for r in csv.DictReader(fh)
            ]
    expected = apply_temperature(np.array(rows["false"]), pooled["test"])
    assert np.allclose(np.array(rows["true"]), expected, atol=1e-5)
