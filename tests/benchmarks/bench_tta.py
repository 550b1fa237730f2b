"""Cost of test-time augmentation: ten-crop evaluation time / single-crop, and which way of
running the ten views is faster.

    RUN_BENCHMARKS=1 python -m pytest tests/benchmarks/bench_tta.py -s

The default backbone (resnet10t, from scratch) in eval mode on the bundled digits' test set
(269 images, 32 px), at one math thread and at the default (or on the GPU with
BENCH_DEVICE=cuda). Timed: the whole evaluation pass (data loading included), ``REPEATS``
interleaved repeats of three variants: a single crop; the ten crops as the project runs them
(``TestTimeAugmentation.probabilities``: one forward over every view of a batch, the loader
holding ``eval_batch_size // 10`` images so that a forward sees as many views as a single-crop
forward sees images); and the same views with one forward per view. Medians and their spread.

Targets (each may be missed by the spread of its ratio): ten crops <= 11x a single crop; the
project's way no slower than one forward per view (if it were, the project would be running
the slower of the two).
"""

import os
import statistics
import time

import pytest
import torch

from lightning_modules.tta import TestTimeAugmentation
from tests.benchmarks.spread import relative_spread
from tests.conftest import compose_cfg

TARGET = 11.0
REPEATS = 5


def _evaluate(model, loader, predict, device):
    start = time.perf_counter()
    with torch.inference_mode():
        for groups, _, _ in loader:
            predict(model, [g.to(device) for g in groups])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _per_view(model, groups):  # the same ten views, one forward each
    (views,) = groups
    return torch.stack([model(views[:, v]).softmax(-1) for v in range(views.shape[1])]).mean(0)


@pytest.mark.parametrize("threads", [1, None], ids=["1 thread", "default threads"])
def test_ten_crop_cost_and_the_faster_way_to_run_its_views(tmp_path, threads):
    import timm

    from tasks.instantiate import instantiate

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        device = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
        cfg = compose_cfg(
            tmp_path, ["data.num_workers=0", "data.mirror_invariant=true"], fast=False
        )
        dm = instantiate(cfg.data, _convert_="all")
        dm.setup("test")
        model = timm.create_model(cfg.model.backbone, num_classes=10).to(device).eval()
        single, ten = TestTimeAugmentation(mode="none"), TestTimeAugmentation(mode="ten_crop")
        loaders = {"single": dm.views_dataloader("test", single)}
        loaders["ten"] = loaders["per view"] = dm.views_dataloader("test", ten)
        predict = {"single": single.probabilities, "ten": ten.probabilities, "per view": _per_view}
        for v in loaders:  # warm-up
            _evaluate(model, loaders[v], predict[v], device)
        times = {v: [] for v in loaders}
        for _ in range(REPEATS):  # interleaved: load drifts over every variant alike
            for v in loaders:
                times[v].append(_evaluate(model, loaders[v], predict[v], device))
        threads_now = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    ten_x = [t / s for t, s in zip(times["ten"], times["single"], strict=True)]
    loop_x = [p / t for p, t in zip(times["per view"], times["ten"], strict=True)]
    med = {v: statistics.median(ts) * 1000 for v, ts in times.items()}
    print(
        f"\n[bench_tta] {cfg.model.backbone}, {len(dm.datasets['test'])} test images of 32 px, "
        f"eval batch {dm.eval_batch_size}, device {device}, {threads_now} CPU threads, median of "
        f"{REPEATS} interleaved repeats\n"
        f"  single crop            {med['single']:8.1f} ms\n"
        f"  ten crop, as run       {med['ten']:8.1f} ms  = {statistics.median(ten_x):5.2f} x single "
        f"(spread {relative_spread(ten_x):.2f})\n"
        f"  ten crop, per view     {med['per view']:8.1f} ms  = {statistics.median(loop_x):5.2f} x "
        f"as run (spread {relative_spread(loop_x):.2f})"
    )
    assert statistics.median(ten_x) <= TARGET * (1 + relative_spread(ten_x))
    assert statistics.median(loop_x) >= 1 - relative_spread(loop_x), (
        "one forward per view is faster"
    )
