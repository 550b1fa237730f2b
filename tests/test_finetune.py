"""Fine-tuning correctness: freezing, unfreeze boundaries, per-group LRs, exact resume."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from callbacks.progressive_unfreeze import ProgressiveUnfreeze
from datamodules.errors import UserError
from lightning_modules.layer_groups import layer_groups

SNAPSHOTS: dict[str, list] = {}
NO_ES = ["~callbacks.early_stopping", "~callbacks.model_checkpoint", "logger=csv"]


class Recorder(pl.Callback):
    """Test probe: parameters/buffers per epoch, LRs per step, BN modes during validation."""

    def __init__(self, key: str, stop_after: int | None = None) -> None:
        self.key, self.stop_after = key, stop_after
        SNAPSHOTS[key] = self.records = []

    def _state(self, pl_module, tag):
        state = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
        self.records.append((tag, state))

    def on_fit_start(self, trainer, pl_module):
        self._state(pl_module, "start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        opt = trainer.optimizers[0]
        self.records.append(("lr", trainer.global_step, [g["lr"] for g in opt.param_groups]))

    def on_validation_start(self, trainer, pl_module):
        modes = [m.training for m in pl_module.net.modules() if isinstance(m, _BatchNorm)]
        self.records.append(("val_bn_modes", modes))

    def on_train_epoch_end(self, trainer, pl_module):
        self._state(pl_module, f"epoch{trainer.current_epoch}")
        req = [p.requires_grad for p in pl_module.net.parameters()]
        modes = [m.training for m in pl_module.net.modules() if isinstance(m, _BatchNorm)]
        self.records.append(("flags", trainer.current_epoch, req, modes))
        if self.stop_after is not None and trainer.current_epoch == self.stop_after:
            trainer.should_stop = True


def _train(cfg_factory, key, *overrides, stop_after=None):
    from tasks.train import train

    probe = [f"+callbacks.probe._target_={__name__}.Recorder", f"+callbacks.probe.key={key}"]
    if stop_after is not None:
        probe.append(f"+callbacks.probe.stop_after={stop_after}")
    cfg = cfg_factory(*NO_ES, *probe, *overrides)
    return train(cfg)


def _groups_changed(before, after, groups):
    return [any(not torch.equal(before[n], after[n]) for n in g.param_names) for g in groups]


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer",
    [
        [],  # AdamW with weight decay 0.05 (the default)
        ["model.optimizer._target_=torch.optim.SGD", "+model.optimizer.momentum=0.9"],
    ],
    ids=["adamw", "sgd_momentum"],
)
def test_unfreeze_schedule_changes_exactly_the_scheduled_groups(cfg_factory, optimizer):
    key = f"sched-{len(optimizer)}"
    _, objects = _train(
        cfg_factory,
        key,
        "finetune=progressive",
        "finetune.callback.milestones=[1,2]",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=3",
        *optimizer,
    )
    net = objects["model"].net
    groups = layer_groups(net)
    names = [g.name for g in groups]
    assert names == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    states = {e[0]: e[1] for e in SNAPSHOTS[key] if e[0].startswith(("start", "epoch"))}
    # epoch 0: head only; epoch 1: + layer4; epoch 2: + layer3. stem..layer2 never change.
    expect = {
        "epoch0": [False, False, False, False, False, True],
        "epoch1": [False, False, False, False, True, True],
        "epoch2": [False, False, False, True, True, True],
    }
    prev = states["start"]
    for epoch in ("epoch0", "epoch1", "epoch2"):
        assert _groups_changed(prev, states[epoch], groups) == expect[epoch], epoch
        prev = states[epoch]
    # frozen stages' BatchNorm running statistics (buffers) are bit-for-bit unchanged too,
    # through the sanity check and every validation
    frozen_bn = [n for n in states["start"] if n.startswith(("conv1", "bn1", "layer1", "layer2"))]
    assert any("running_mean" in n for n in frozen_bn)
    for n in frozen_bn:
        assert torch.equal(states["start"][n], states["epoch2"][n]), n
    # and frozen BN modules were in eval mode whenever training ran
    flags = [e for e in SNAPSHOTS[key] if e[0] == "flags"]
    bn_modules = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    first_layer3 = next(i for i, m in enumerate(net.modules()) if m is net.layer3)
    del first_layer3
    frozen_at_end = [m for m in bn_modules if not any(p.requires_grad for p in m.parameters())]
    assert len(frozen_at_end) > 0
    assert flags[0][3].count(True) < flags[-1][3].count(True)  # more BN layers train later


@pytest.mark.slow
def test_per_group_lr_is_base_times_multiplier_times_schedule(cfg_factory):
    key = "lr"
    milestones, epochs, batches, warm = [1, 2], 3, 4, 0.5
    _, objects = _train(
        cfg_factory,
        key,
        "finetune=progressive",
        f"finetune.callback.milestones={milestones}",
        "finetune.callback.lr_policy=layer_decay",
        "finetune.callback.layer_decay=0.5",
        f"finetune.callback.group_warmup_epochs={warm}",
        f"trainer.max_epochs={epochs}",
        f"trainer.limit_train_batches={batches}",
        "model.optimizer.lr=0.01",
        "model.scheduler.warmup_fraction=0.25",
        "model.scheduler.min_lr_ratio=0.0",
    )
    model = objects["model"]
    opt = objects["trainer"].optimizers[0]
    sched = objects["trainer"].lr_scheduler_configs[0].scheduler
    assert len(sched.lr_lambdas) == len(opt.param_groups)  # every group is scheduled
    total, warmup = epochs * batches, round(0.25 * epochs * batches)
    ramp = round(warm * batches)

    def base(step):  # linear warm-up then cosine to 0, written out independently
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    n_groups = len(model.finetune_plan.groups)
    start_epoch = {n_groups - 1: 0, n_groups - 2: 1, n_groups - 3: 2}  # head, layer4, layer3
    records = [e for e in SNAPSHOTS[key] if e[0] == "lr"]
    assert len(records) == total
    for _, step, lrs in records:
        for group, lr in zip(opt.param_groups, lrs, strict=True):
            index = group["layer_group"]
            mult = 0.5 ** (n_groups - 1 - index)
            if index not in start_epoch or step < start_epoch[index] * batches:
                assert lr == 0.0, (group["name"], step)
                continue
            since = step - start_epoch[index] * batches
            gate = (since + 1) / (ramp + 1) if start_epoch[index] and since < ramp else 1.0
            assert lr == pytest.approx(0.01 * mult * base(step) * gate, rel=1e-6), (
                group["name"],
                step,
            )


@pytest.mark.slow
def test_resume_across_an_unfreeze_boundary_is_exact(cfg_factory, tmp_path):
    common = [
        "finetune=progressive",
        "finetune.callback.milestones=[1,2]",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=3",
        "trainer.deterministic=true",
        "~callbacks.early_stopping",
    ]
    from tasks.train import train
    from tests.conftest import compose_cfg

    full_metrics, full = train(compose_cfg(tmp_path / "full", common + _probe("full")))
    for stop in (0, 1):  # killed before the first boundary, and right after it
        run_dir = tmp_path / f"stop{stop}"
        train(compose_cfg(run_dir, common + _probe(f"a{stop}", stop)))
        last = run_dir / "checkpoints" / "last.ckpt"
        assert last.is_file()
        resumed_metrics, resumed = train(
            compose_cfg(run_dir, common + _probe(f"b{stop}") + [f"ckpt_path={last}"])
        )
        a, b = full["model"], resumed["model"]
        # compare the state at the end of training (the probe's last snapshot), then flags
        end_full = [e for e in SNAPSHOTS["full"] if e[0] == "epoch2"][0][1]
        end_res = [e for e in SNAPSHOTS[f"b{stop}"] if e[0] == "epoch2"][0][1]
        for name in end_full:
            assert torch.equal(end_full[name], end_res[name]), (stop, name)
        flags_full = [e for e in SNAPSHOTS["full"] if e[0] == "flags"][-1]
        flags_res = [e for e in SNAPSHOTS[f"b{stop}"] if e[0] == "flags"][-1]
        assert flags_full[2:] == flags_res[2:]  # requires_grad and BN modes
        lrs_full = [e[2] for e in SNAPSHOTS["full"] if e[0] == "lr"][-1]
        lrs_res = [e[2] for e in SNAPSHOTS[f"b{stop}"] if e[0] == "lr"][-1]
        assert lrs_full == lrs_res
        opt_a = full["trainer"].optimizers[0].state_dict()["state"]
        opt_b = resumed["trainer"].optimizers[0].state_dict()["state"]
        assert opt_a.keys() == opt_b.keys()
        for k in opt_a:
            for field in opt_a[k]:
                assert torch.equal(
                    torch.as_tensor(opt_a[k][field]), torch.as_tensor(opt_b[k][field])
                )
        assert resumed_metrics["val/acc_best"] == full_metrics["val/acc_best"]
        del a, b


def _probe(key, stop_after=None):
    out = [f"+callbacks.probe._target_={__name__}.Recorder", f"+callbacks.probe.key={key}"]
    if stop_after is not None:
        out.append(f"+callbacks.probe.stop_after={stop_after}")
    return out


# ---------------------------------------------------------------------------- config validation
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"milestones": [3, 1]}, "increasing order"),
        ({"milestones": [-1]}, "non-negative"),
        ({"milestones": [1, 2, 3, 4, 5, 6]}, "at most one milestone per group"),
        ({"milestones": [1, 9]}, "at or after trainer.max_epochs=5"),
        ({"lr_mults": [1.0, 0.5]}, "lr_mults has 2 values but the model has 6 layer groups"),
        ({"lr_policy": "magic"}, "Unknown lr_policy"),
        ({"layer_decay": 0.0}, "layer_decay=0.0"),
    ],
)
def test_bad_schedules_are_refused_with_the_fix(kwargs, message):
    import timm

    net = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(UserError, match=message):
        ProgressiveUnfreeze(**kwargs).make_plan(net, max_epochs=5)


def test_every_and_max_unfrozen_build_the_plan():
    import timm

    net = timm.create_model("test_resnet", num_classes=3)
    plan = ProgressiveUnfreeze(
        every=2, max_unfrozen=2, lr_policy="seeds", upper_groups=1
    ).make_plan(net, max_epochs=10)
    assert plan.unfreeze_epochs == [None, None, None, 4, 2, 0]
    assert plan.lr_mults == [0.01, 0.01, 0.01, 0.01, 0.1, 1.0]
    full = ProgressiveUnfreeze(every=0, lr_policy="layer_decay").make_plan(net, max_epochs=10)
    assert full.unfreeze_epochs == [0] * 6
    assert full.lr_mults == [0.5**5, 0.5**4, 0.5**3, 0.25, 0.5, 1.0]
    probe = ProgressiveUnfreeze(max_unfrozen=0).make_plan(net, max_epochs=10)
    assert probe.trainable(9) == [False] * 5 + [True]


@pytest.mark.parametrize("bn_eval", ["frozen", "all", "none"])
def test_bn_eval_sets_which_batchnorm_layers_normalise_with_running_statistics(bn_eval):
    import timm

    net = timm.create_model("test_resnet", num_classes=3).train()
    unfreeze = ProgressiveUnfreeze(milestones=[1], bn_eval=bn_eval)
    unfreeze.plan = unfreeze.make_plan(net, max_epochs=3)
    top = unfreeze.plan.groups[-2]  # layer4, unfrozen at epoch 1
    top_bn = [m for m in top.modules(net) if isinstance(m, _BatchNorm)]
    other_bn = [
        m for m in net.modules() if isinstance(m, _BatchNorm) and all(m is not t for t in top_bn)
    ]
    assert top_bn and other_bn
    for epoch, top_trains in ((0, False), (1, True)):
        on = unfreeze.set_state(net, epoch, training=True)
        assert on[-2] is top_trains and on[-1] is True
        assert all(p.requires_grad is top_trains for p in top.parameters(net))
        expect_top = {"frozen": top_trains, "all": False, "none": True}[bn_eval]
        assert all(m.training is expect_top for m in top_bn), epoch
        assert all(m.training is (bn_eval == "none") for m in other_bn), epoch
    # evaluation mode is never switched to training by the schedule
    net.eval()
    unfreeze.set_state(net, 1, training=False)
    assert not any(m.training for m in net.modules() if isinstance(m, _BatchNorm))


def test_unknown_bn_eval_is_refused():
    with pytest.raises(UserError, match="Unknown bn_eval 'some'"):
        ProgressiveUnfreeze(bn_eval="some")
