"""Fine-tuning speed: the frozen-feature cache, and a train step with a frozen backbone.

Run with `make bench` (or `RUN_BENCHMARKS=1 python -m pytest tests/benchmarks/bench_finetune.py -s`).
Prints its figures and asserts its targets: cached epoch >= 20x faster than uncached (after the
one pass); a frozen-backbone train step <= 0.5x a full fine-tuning step. A target fails only
when it is missed by more than the measurements' own relative spread.
"""

from __future__ import annotations

import statistics
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from tests.benchmarks.spread import relative_spread

BACKBONE = "resnet10t"  # the default model
CACHE_SPEEDUP = 20.0
FROZEN_STEP = 0.5


class EpochTimer(pl.Callback):
    def __init__(self):
        self.times = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self._t)


def _fit_epochs(tmp_path, name, overrides):
    from tasks.train import train
    from tests.conftest import compose_cfg

    cfg = compose_cfg(
        tmp_path / name,
        [
            f"model.backbone={BACKBONE}",
            "augment=none",
            "trainer.max_epochs=6",
            "trainer.limit_val_batches=0",
            "trainer.num_sanity_val_steps=0",
            "~callbacks.early_stopping",
            "~callbacks.model_checkpoint",
            f"+callbacks.timer._target_={__name__}.EpochTimer",
            *overrides,
        ],
    )
    t0 = time.perf_counter()
    _, objects = train(cfg)
    total = time.perf_counter() - t0
    timer = next(c for c in objects["trainer"].callbacks if isinstance(c, EpochTimer))
    return timer.times, total


def test_bench_feature_cache(tmp_path):
    from datamodules import feature_cache

    feature_cache._MEMORY.clear()
    plain, plain_total = _fit_epochs(
        tmp_path, "plain", ["finetune=linear_probe", "finetune.cache_features=false"]
    )
    t0 = time.perf_counter()
    cached, cached_total = _fit_epochs(tmp_path, "cached", ["finetune=linear_probe"])
    del t0
    per_plain = statistics.median(plain[1:])
    per_cached = statistics.median(cached[1:])
    ratios = [a / b for a, b in zip(plain[1:], cached[1:], strict=True)]  # epoch by epoch
    spread = relative_spread(ratios)
    print(
        f"\n[feature cache] {BACKBONE} on digits, linear probe, per epoch: uncached "
        f"{per_plain * 1000:.1f} ms, cached {per_cached * 1000:.1f} ms -> "
        f"{per_plain / per_cached:.1f}x faster (target >= 20x); whole run incl. the one "
        f"feature pass: {plain_total:.1f} s vs {cached_total:.1f} s (spread {spread:.2f})"
    )
    assert statistics.median(ratios) >= CACHE_SPEEDUP * (1 - spread)


def test_bench_progressive_head_stage_cache(tmp_path):
    """progressive with milestones [2]: epochs 0-1 train the head alone, cached or not."""
    from datamodules import feature_cache

    common = ["finetune=progressive", "finetune.callback.milestones=[2]"]
    feature_cache._MEMORY.clear()
    plain, plain_total = _fit_epochs(tmp_path, "p_plain", common)
    cached, cached_total = _fit_epochs(
        tmp_path, "p_cached", [*common, "finetune.cache_features=true"]
    )
    print(
        f"\n[progressive head stage] {BACKBONE} on digits, epoch 1 (head only): uncached "
        f"{plain[1] * 1000:.1f} ms, cached {cached[1] * 1000:.1f} ms -> "
        f"{plain[1] / cached[1]:.1f}x; epoch 2 (top group unfrozen, images): "
        f"{plain[2] * 1000:.1f} ms vs {cached[2] * 1000:.1f} ms; whole run incl. the feature "
        f"pass: {plain_total:.1f} s vs {cached_total:.1f} s"
    )


def test_bench_frozen_step_vs_full_step():
    import timm

    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))

    def step_time(frozen: bool) -> float:
        net = timm.create_model(BACKBONE, num_classes=10)
        head = set(id(p) for p in net.get_classifier().parameters())
        for p in net.parameters():
            p.requires_grad_(not frozen or id(p) in head)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        times = []
        for i in range(12):
            t = time.perf_counter()
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= 2:
                times.append(time.perf_counter() - t)
        return times

    full_times, frozen_times = step_time(False), step_time(True)
    full, frozen = statistics.median(full_times), statistics.median(frozen_times)
    spread = relative_spread(full_times) + relative_spread(frozen_times)
    print(
        f"\n[train step] {BACKBONE}, batch 64 at 32 px: full fine-tuning {full * 1000:.1f} ms, "
        f"frozen backbone {frozen * 1000:.1f} ms -> {frozen / full:.2f}x (target <= 0.5x, "
        f"spread {spread:.2f})"
    )
    assert frozen / full <= FROZEN_STEP * (1 + spread)
