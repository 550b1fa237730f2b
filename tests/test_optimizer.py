"""The optimizer and the memory layout: fused kernels where torch has them, NHWC on request; the
same results as the plain path, to rounding."""

import functools
from types import SimpleNamespace

import pytest
import torch

from lightning_modules.optimization import build_optimizer


def _groups():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    return net, [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lr": 0.0005}]


def _adamw(**kw):
    return functools.partial(torch.optim.AdamW, lr=0.002, weight_decay=0.05, **kw)


def test_fused_when_the_config_leaves_it_open_and_the_update_matches_the_loop():
    _, groups = _groups()
    fused = build_optimizer(_adamw(fused=None), groups)
    assert fused.defaults["fused"] is True
    net, groups = _groups()
    looped = build_optimizer(_adamw(fused=False), groups)
    assert not looped.defaults["fused"]
    nets = [_groups()[0] for _ in range(2)]  # the same initial weights twice
    opts = [
        build_optimizer(_adamw(fused=f), [{"params": list(n.parameters())}])
        for n, f in zip(nets, (None, False), strict=True)
    ]
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(20):
        for n, o in zip(nets, opts, strict=True):
            o.zero_grad()
            torch.nn.functional.cross_entropy(n(x), y).backward()
            o.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # same update, other rounding


@pytest.mark.parametrize(
    "factory, trainer, expected",
    [
        (_adamw(fused=False), None, False),  # the config decided
        (functools.partial(torch.optim.SGD, lr=0.1), None, None),  # no such option: untouched
        (_adamw(fused=None), SimpleNamespace(precision="16-mixed", gradient_clip_val=1.0), None),
        (_adamw(fused=None), SimpleNamespace(precision="16-mixed", gradient_clip_val=None), True),
    ],
)
def test_fused_only_where_it_works(factory, trainer, expected):
    """fp16 with gradient clipping cannot unscale before a fused step: torch's loop there."""
    _, groups = _groups()
    opt = build_optimizer(factory, groups, trainer=trainer)
    assert opt.defaults.get("fused") == expected


def test_a_training_run_steps_with_the_fused_kernel(cfg_factory):
    from tasks.train import train

    cfg = cfg_factory("trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "tta=none")
    _, objects = train(cfg)
    assert objects["trainer"].optimizers[0].defaults["fused"] is True


def test_channels_last_keeps_the_network_and_its_inputs_nhwc_with_the_same_outputs():
    from lightning_modules import ImageClassifier

    torch.manual_seed(0)
    plain = ImageClassifier(backbone="test_resnet", num_classes=3).eval()
    nhwc = ImageClassifier(backbone="test_resnet", num_classes=3, channels_last=True).eval()
    nhwc.load_state_dict(plain.state_dict())
    nhwc.setup("fit")
    convs = [m.weight for m in nhwc.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x), plain(x), rtol=1e-4, atol=1e-5)


def test_a_fused_optimizer_resumed_from_a_loop_state_still_steps_under_fp16_scaling():
    """Resuming a run saved before the fused default: the loaded groups say fused=False, so the
    optimizer must not claim to unscale its gradients itself (fp16's scaler would fail)."""
    net, _ = _groups()
    looped = torch.optim.AdamW(net.parameters(), lr=0.002)
    torch.nn.functional.cross_entropy(net(torch.randn(4, 8)), torch.tensor([0, 1, 2, 0])).backward()
    looped.step()
    fused = build_optimizer(_adamw(fused=None), [{"params": list(net.parameters())}])
    fused.load_state_dict(looped.state_dict())
    scaler = torch.amp.GradScaler("cpu")
    loss = torch.nn.functional.cross_entropy(net(torch.randn(4, 8)), torch.tensor([1, 1, 0, 2]))
    scaler.scale(loss).backward()
    scaler.step(fused)  # failed with "Expected grad_scale and found_inf to be None"
    scaler.update()
    assert not fused._step_supports_amp_scaling


def test_an_optimizer_without_a_fused_kernel_still_builds_from_the_config(cfg_factory):
    """Swapping model.optimizer._target_ to an optimizer that has no ``fused`` argument keeps
    working (the config's ``fused: null`` is not passed); asking it for one is a clear error."""
    from hydra.utils import instantiate

    from datamodules.errors import UserError

    _, groups = _groups()
    cfg = cfg_factory("model.optimizer._target_=torch.optim.RMSprop")
    opt = build_optimizer(instantiate(cfg.model.optimizer), groups)
    assert isinstance(opt, torch.optim.RMSprop)
    cfg = cfg_factory("model.optimizer._target_=torch.optim.NAdam", "model.optimizer.fused=true")
    with pytest.raises(UserError, match="NAdam has no fused kernel"):
        build_optimizer(instantiate(cfg.model.optimizer), _groups()[1])
