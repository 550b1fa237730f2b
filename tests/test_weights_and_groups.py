"""Layer groups on several architectures, local weights, and the `auto` strategy policy."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from datamodules.errors import UserError
from lightning_modules.finetune import build_finetuning, choose_strategy
from lightning_modules.layer_groups import layer_groups
from lightning_modules.weights import load_weights


@pytest.mark.parametrize(
    "name, first_groups",
    [
        ("test_resnet", ["stem", "layer1", "layer2", "layer3", "layer4"]),
        ("test_efficientnet", ["stem", "blocks.0", "blocks.1"]),
        ("test_convnext", ["stem", "stages.0", "stages.1", "stages.2", "stages.3"]),
        ("test_vit", ["stem", "blocks.0", "blocks.1"]),
    ],
)
def test_groups_cover_every_parameter_once_in_order_with_the_classifier_as_head(name, first_groups):
    model = timm.create_model(name, num_classes=7)
    groups = layer_groups(model)
    names = [n for g in groups for n in g.param_names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))  # exactly one group each
    assert [g.name for g in groups[: len(first_groups)]] == first_groups
    head = {id(p) for p in model.get_classifier().parameters()}
    assert groups[-1].name == "head"
    assert {id(p) for p in groups[-1].parameters(model)} == head
    # order stem -> head follows the forward order of registration
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    firsts = [min(order[n] for n in g.param_names) for g in groups[:-1]]
    assert firsts == sorted(firsts)


def test_model_without_a_matcher_falls_back_to_its_children():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), torch.nn.Flatten()
    )
    groups = layer_groups(net)
    assert [g.param_names for g in groups] == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]


def _save(model, path):
    state = model.state_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_with_another_class_count_load_the_backbone_and_renew_the_head(
    tmp_path, suffix
):
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=5)
    path = tmp_path / f"w{suffix}"
    _save(source, path)
    torch.manual_seed(1)
    target = timm.create_model("test_resnet", num_classes=10)
    head_before = target.fc.weight.clone()
    report = load_weights(target, path)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        if name.startswith("fc."):
            continue
        assert torch.equal(a, b), name
    assert target.fc.weight.shape == (10, target.fc.in_features)
    assert torch.equal(target.fc.weight, head_before)  # fresh head kept
    assert sorted(report.head_reinitialised) == ["fc.bias", "fc.weight"]
    assert not report.missing


def test_weights_of_another_backbone_are_refused(tmp_path):
    path = tmp_path / "effnet.safetensors"
    _save(timm.create_model("test_efficientnet", num_classes=3), path)
    with pytest.raises(UserError, match="another architecture"):
        load_weights(timm.create_model("test_resnet", num_classes=3), path)


def test_a_pickle_that_runs_code_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": Evil()}, path)
    with pytest.raises(UserError, match="tensors only"):
        load_weights(timm.create_model("test_resnet", num_classes=3), path)
    assert not marker.exists()


def test_timm_pretrained_path_loads_a_local_file_offline(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=1000)
    path = tmp_path / "test_resnet.safetensors"
    _save(source, path)
    from lightning_modules.backbone import create_backbone

    net = create_backbone(
        name="test_resnet",
        num_classes=4,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path)},
    )
    assert torch.equal(net.conv1[0].weight, source.conv1[0].weight)
    assert net.fc.out_features == 4


def test_offline_hub_failure_says_how_to_pass_a_local_file(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf

    # huggingface_hub reads its environment once, when first imported (earlier in the session):
    # set its constants too, or the download waits for network time-outs instead of failing fast
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    from lightning_modules.backbone import create_backbone

    with pytest.raises(UserError, match="model.weights=/path/to/model.safetensors"):
        create_backbone(name="resnet10t", num_classes=3, pretrained=True)


@pytest.mark.slow
def test_framework_checkpoint_transfers_to_a_new_class_count(cfg_factory, tmp_path):
    from tasks.train import train

    _, first = train(cfg_factory("trainer.limit_train_batches=2", "data.classes=[0,1,2,3,4]"))
    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    target = timm.create_model("test_resnet", num_classes=10)
    report = load_weights(target, ckpt)
    trained = first["model"].net.state_dict()
    assert torch.equal(target.layer4[0].conv1.weight, trained["layer4.0.conv1.weight"])
    assert sorted(report.head_reinitialised) == ["fc.bias", "fc.weight"]


# ---------------------------------------------------------------------------- auto policy
@pytest.mark.parametrize(
    "has_weights, per_class, expected, max_unfrozen",
    [
        (False, 5000, "scratch", None),
        (True, 4, "linear_probe", 0),
        (True, 5, "progressive", None),
        (True, 50, "progressive", None),
        (True, 500, "progressive", None),
        (True, 5000, "full", None),
    ],
)
def test_auto_policy_table(has_weights, per_class, expected, max_unfrozen):
    strategy, overrides, reason = choose_strategy(
        has_weights=has_weights, images_per_class=per_class
    )
    assert strategy == expected
    assert overrides.get("max_unfrozen") == max_unfrozen
    assert reason  # one line, logged by the run


def test_auto_reads_the_training_set_and_keeps_the_callback_settings():
    conf = {
        "name": "auto",
        "few_per_class": 20,
        "lots_per_class": 1000,
        "cache_features": True,
        "callback": {"_target_": "x", "every": 2},
    }
    few = build_finetuning(conf, has_weights=True, train_targets=np.repeat(np.arange(4), 8))
    assert few.strategy == "linear_probe" and few.cache_features
    assert few.callback == {"_target_": "x", "every": 2, "max_unfrozen": 0}
    assert "8 training images per class" in few.reason
    none = build_finetuning(conf, has_weights=False, train_targets=np.zeros(10, int))
    assert none.strategy == "scratch" and none.callback is None and not none.use_weights
    with pytest.raises(UserError, match="few_per_class <= lots_per_class"):
        build_finetuning(
            {**conf, "few_per_class": 5000},
            has_weights=True,
            train_targets=np.zeros(3, int),
        )
