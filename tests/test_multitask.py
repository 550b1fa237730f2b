"""Multi-task heads on one backbone: masked losses, weighting, CSV data, training end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from datamodules.errors import UserError
from lightning_modules.layer_groups import layer_groups
from lightning_modules.loss_weighting import build_loss_weighting
from lightning_modules.run_outputs import load_predictions, read_metrics
from lightning_modules.task_heads import parse_tasks

TASKS = {
    "age": {"type": "regression", "mean": 40.0, "std": 15.0},
    "sex": {"type": "binary", "class_names": ["F", "M"]},
    "ethnicity": {"type": "classification", "class_names": ["a", "b", "c"]},
}
CSV_TASKS = (
    "data.source.tasks={brightness: regression, marker: binary,"
    " colour: {type: classification, classes: [red, green, blue]}}"
)
SNAPSHOTS: dict[str, dict] = {}


def _model(**kwargs):
    from lightning_modules.multitask import MultiTaskModel

    torch.manual_seed(0)
    return MultiTaskModel(backbone="test_resnet", tasks=TASKS, **kwargs)


def _head_grads(model) -> dict[str, torch.Tensor]:
    heads = model.net.get_classifier().heads
    return {n: torch.cat([p.grad.flatten() for p in h.parameters()]) for n, h in heads.items()}


def test_a_missing_label_gives_its_head_no_gradient():
    model = _model().eval()  # eval: BatchNorm statistics do not couple the samples
    x = torch.randn(3, 3, 32, 32)
    nan = math.nan
    labels = torch.tensor([[30.0, 1.0, 2.0], [nan, 0.0, nan], [nan, nan, 1.0]])
    model._step((x, labels, torch.arange(3)), "train").backward()
    full = _head_grads(model)
    # age: only sample 0 is labelled, so its head's gradient is that of sample 0 alone
    model.zero_grad()
    model._step((x[:1], labels[:1], torch.arange(1)), "train").backward()
    assert torch.allclose(full["age"], _head_grads(model)["age"], atol=1e-6)
    # no label for a task anywhere in the batch: exactly zero gradient for its head
    model.zero_grad()
    model._step((x[1:2], labels[1:2], torch.arange(1)), "train").backward()
    grads = _head_grads(model)
    assert torch.count_nonzero(grads["age"]) == 0
    assert torch.count_nonzero(grads["ethnicity"]) == 0
    assert torch.count_nonzero(grads["sex"]) > 0
    # and the loss is exactly the labelled task's loss (missing labels are not zeros)
    out = model(x[1:2])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out["sex"], labels[1:2, 1])
    assert model._step((x[1:2], labels[1:2], torch.arange(1)), "val").item() == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_regression_head_predicts_in_label_units_and_fits_on_the_standard_scale():
    model = _model().eval()
    head = model.net.get_classifier().heads["age"]
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.fill_(1.0)  # one standard deviation above the mean
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x)["age"], torch.full((2,), 55.0))
    labels = torch.tensor([[25.0, math.nan, math.nan], [25.0, math.nan, math.nan]])
    loss = model._step((x, labels, torch.arange(2)), "val")
    assert loss.item() == pytest.approx(((55 - 25) / 15) ** 2)  # (2 std)² = 4


def test_uncertainty_weighting_is_kendalls_likelihood():
    specs = parse_tasks(TASKS)
    weighting = build_loss_weighting("uncertainty", specs)
    s = torch.tensor([0.3, -0.2, 0.5])
    with torch.no_grad():
        weighting.log_vars.copy_(s)
    losses = {"age": torch.tensor(2.0), "sex": torch.tensor(0.7)}  # no ethnicity label
    expected = 0.5 * math.exp(-0.3) * 2.0 + 0.15 + math.exp(0.2) * 0.7 - 0.1
    assert weighting(losses).item() == pytest.approx(expected, rel=1e-6)
    # the optimum of s for a fixed loss L is log(2c·L) (regression: σ² = L): zero gradient there
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([math.log(2.0), math.log(2 * 0.7), 0.0]))
    weighting(losses).backward()
    assert torch.allclose(weighting.log_vars.grad, torch.zeros(3), atol=1e-6)
    fixed = build_loss_weighting("fixed", specs, {"age": 0.01})
    assert fixed(losses).item() == pytest.approx(0.01 * 2.0 + 0.7)
    with pytest.raises(UserError, match="not tasks of the data"):
        build_loss_weighting("fixed", specs, {"height": 1.0})


def test_task_metrics_are_exact_over_the_epoch():
    from lightning_modules.task_metrics import TaskMetrics

    specs = parse_tasks(TASKS)
    metrics = TaskMetrics(specs)
    nan = math.nan
    batches = [
        ({"age": [30.0, 50.0], "sex": [2.0, -1.0], "ethnicity": [[3, 0, 0], [0, 3, 0]]},
         [[35.0, 1.0, 0.0], [nan, 1.0, 2.0]]),
        ({"age": [20.0], "sex": [0.5], "ethnicity": [[0, 0, 3]]}, [[10.0, nan, 2.0]]),
    ]  # fmt: skip
    for out, labels in batches:
        metrics.update({k: torch.tensor(v) for k, v in out.items()}, torch.tensor(labels))
    values = {k: float(v) for k, v in metrics.compute().items()}
    y, pred = np.array([35.0, 10.0]), np.array([30.0, 20.0])
    assert values["age/mae"] == pytest.approx(np.abs(y - pred).mean())
    assert values["age/rmse"] == pytest.approx(np.sqrt(((y - pred) ** 2).mean()))
    assert values["age/r2"] == pytest.approx(
        1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    )
    assert values["sex/acc"] == pytest.approx(1 / 2)  # logit 2 -> M (right), -1 -> F (wrong)
    assert values["ethnicity/acc"] == pytest.approx(2 / 3)
    assert values["score"] == pytest.approx((values["age/r2"] + 0.5 + 2 / 3) / 3)


def test_heads_are_the_head_layer_group():
    model = _model(loss_weighting="uncertainty")
    groups = layer_groups(model.net)
    heads = {n for n, _ in model.net.named_parameters() if ".heads." in n}
    assert groups[-1].name == "head" and set(groups[-1].param_names) == heads
    assert len(heads) == 6  # weight and bias of three heads
    # learned loss weights join the heads' LR group and are not weight-decayed
    loss_weights = [g for g in model.param_groups() if g["name"] == "loss_weights"]
    assert loss_weights[0]["params"][0] is model.loss_weighting.log_vars
    assert loss_weights[0]["weight_decay"] == 0.0


def test_csv_source_reads_labels_and_refuses_bad_cells(tmp_path):
    from datamodules.sources.csv_table import CsvSource

    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"")  # existence is all the source checks before loading
    (tmp_path / "labels.csv").write_text(
        "image,age,smoker,eye,split\n"
        "a.png,31.5,yes,blue,train\n"
        "b.png,,no,NA,val\n"
        "c.png,60,,brown,test\n"
    )
    source = CsvSource(
        path=str(tmp_path / "labels.csv"),
        tasks={"age": "regression", "smoker": "binary", "eye": {"type": "classification"}},
        split_column="split",
    )
    data = source.load()
    assert source.tasks["eye"]["class_names"] == ["blue", "brown"]
    assert source.tasks["smoker"]["class_names"] == ["0", "1"]  # yes/no read as 1/0
    assert data.train.ids == ["a.png"] and data.val.ids == ["b.png"] and data.test.ids == ["c.png"]
    np.testing.assert_array_equal(data.train.labels, [[31.5, 1, 0]])
    assert np.isnan(data.val.labels[0, [0, 2]]).all() and data.val.labels[0, 1] == 0
    assert np.isnan(data.test.labels[0, 1]) and data.test.labels[0, 2] == 1

    def load(text, **kwargs):
        (tmp_path / "bad.csv").write_text(text)
        conf = {"path": str(tmp_path / "bad.csv"), "tasks": {"age": "regression"}, **kwargs}
        return CsvSource(**conf).load()

    with pytest.raises(UserError, match="line 2: 'old' in column 'age' is not a number"):
        load("image,age\na.png,old\n")
    with pytest.raises(UserError, match=r"no column\(s\) \['age'\]"):
        load("image,years\na.png,3\n")
    with pytest.raises(UserError, match="do not exist"):
        load("image,age\nmissing.png,3\n")
    with pytest.raises(UserError, match="not among"):
        load(
            "image,eye\na.png,green\n",
            tasks={"eye": {"type": "classification", "classes": ["blue", "brown"]}},
        )


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def synthetic_csv(tmp_path_factory):
    from datamodules.sources.synthetic_tasks import write_csv

    return write_csv(tmp_path_factory.mktemp("synthetic") / "data", n=300)


def _csv_overrides(csv_path):
    return [
        "experiment=multitask",
        "data=csv",
        f"data.root={csv_path}",
        CSV_TASKS,
        "data.num_workers=0",
        "data.persistent_workers=false",
        "data.image_size=32",
        "data.eval_crop_pct=1.0",
        "data.batch_size=16",
        "model.backbone=test_resnet",
        "model.optimizer.lr=0.01",
    ]


@pytest.mark.slow
def test_each_task_is_learned_from_its_own_image_property(cfg_factory, tmp_path, synthetic_csv):
    """brightness (regression), colour (classification), marker (binary), 20 % labels missing."""
    from tasks.train import train

    cfg = cfg_factory(*_csv_overrides(synthetic_csv), "trainer.max_epochs=5")
    metrics, objects = train(cfg)
    saved = read_metrics(tmp_path)
    assert saved["test/colour/acc"] > 0.8  # chance: 1/3
    assert saved["test/marker/acc"] > 0.8  # chance: 1/2
    assert saved["test/brightness/r2"] > 0.8  # predicting the mean: 0
    assert saved["test/brightness/mae"] < 5.0  # percent; labels span 25-75
    assert saved["val/score_best"] >= saved["val/score"] - 1e-9
    assert saved["best_ckpt"] == "checkpoints/best.ckpt"
    # per-task predictions: only the images labelled for the task, matching the logged metrics
    dm = objects["datamodule"]
    labels = dm.datasets["test"].labels
    assert list(dm.tasks) == ["brightness", "marker", "colour"]
    colour = load_predictions(tmp_path, "colour/test")
    assert colour["class_names"].tolist() == ["red", "green", "blue"]  # the configured order
    assert len(colour["ids"]) == int((~np.isnan(labels[:, 2])).sum()) < len(labels)
    acc = (colour["probs"].argmax(1) == colour["targets"]).mean()
    assert acc == pytest.approx(saved["test/colour/acc"], abs=1e-6)
    marker = load_predictions(tmp_path, "marker/test")
    assert marker["class_names"].tolist() == ["absent", "present"]
    assert (marker["probs"].argmax(1) == marker["targets"]).mean() == pytest.approx(
        saved["test/marker/acc"], abs=1e-6
    )
    brightness = load_predictions(tmp_path, "brightness/test")
    mae = np.abs(brightness["preds"] - brightness["targets"]).mean()
    assert mae == pytest.approx(saved["test/brightness/mae"], rel=1e-4)
    assert not (tmp_path / "predictions" / "test.npz").exists()  # no single-task file


class Probe(pl.Callback):
    """Test probe: the network's weights when fitting starts."""

    def __init__(self, key: str) -> None:
        self.key = key

    def on_fit_start(self, trainer, pl_module):
        SNAPSHOTS[self.key] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["progressive", "linear_probe"])
def test_fine_tuning_strategies_train_only_the_heads_first(cfg_factory, synthetic_csv, finetune):
    """Progressive unfreezing (epoch 0: heads only) and the cached-feature linear probe."""
    from tasks.train import train

    cfg = cfg_factory(
        *_csv_overrides(synthetic_csv),
        f"finetune={finetune}",
        "model.loss_weighting=uncertainty",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        f"+callbacks.probe._target_={__name__}.Probe",
        f"+callbacks.probe.key={finetune}",
    )
    _, objects = train(cfg)
    before = SNAPSHOTS[finetune]
    after = objects["model"].state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    heads = {k for k in before if ".heads." in k and not k.endswith(("mean", "std"))}
    assert heads <= changed  # every head trained
    assert "loss_weighting.log_vars" in changed  # learned weights train with the heads
    assert changed <= heads | {"loss_weighting.log_vars"}  # the backbone (and its BN) did not


@pytest.mark.slow
def test_model_and_data_must_agree(cfg_factory, synthetic_csv):
    from tasks.train import train

    with pytest.raises(UserError, match="needs a label column per task"):
        train(cfg_factory("model=multitask"))
    with pytest.raises(UserError, match="use model=multitask"):
        train(cfg_factory(*_csv_overrides(synthetic_csv), "model=classifier"))
    with pytest.raises(UserError, match="watches 'val/acc'"):
        train(
            cfg_factory(
                *_csv_overrides(synthetic_csv), "callbacks.model_checkpoint.monitor=val/acc"
            )
        )
