"""Cost of test-time augmentation: ten-crop evaluation time / single-crop (target <= 11x).

    RUN_BENCHMARKS=1 python -m pytest tests/benchmarks/bench_tta.py -s

The default backbone (resnet10t, from scratch) in eval mode on the bundled digits' test set
(269 images, 32 px), on this machine's CPU threads (or the GPU with BENCH_DEVICE=cuda). Timed:
the whole evaluation pass (data loading included), best of ``REPEATS``. Also printed: the same
ten views classified one forward per view, which is what batching the views saves.
"""

import os
import time

import torch

from lightning_modules.tta import TestTimeAugmentation
from tests.conftest import compose_cfg

TARGET = 11.0
REPEATS = 3


def _evaluate(model, loader, predict, device):
    start = time.perf_counter()
    with torch.inference_mode():
        for groups, _, _ in loader:
            predict(model, [g.to(device) for g in groups])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _best(fn):
    fn()  # warm-up
    return min(fn() for _ in range(REPEATS))


def test_ten_crop_costs_at_most_eleven_single_crops(tmp_path):
    import timm

    from tasks.instantiate import instantiate

    device = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
    cfg = compose_cfg(tmp_path, ["data.num_workers=0", "data.mirror_invariant=true"], fast=False)
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("test")
    model = timm.create_model(cfg.model.backbone, num_classes=10).to(device).eval()

    single = TestTimeAugmentation(mode="none")
    ten = TestTimeAugmentation(mode="ten_crop")
    single_loader, ten_loader = (
        dm.views_dataloader("test", single),
        dm.views_dataloader("test", ten),
    )

    def per_view(model, groups):  # the same ten views, one forward each
        (views,) = groups
        return torch.stack([model(views[:, v]).softmax(-1) for v in range(views.shape[1])]).mean(0)

    t_single = _best(lambda: _evaluate(model, single_loader, single.probabilities, device))
    t_ten = _best(lambda: _evaluate(model, ten_loader, ten.probabilities, device))
    t_loop = _best(lambda: _evaluate(model, ten_loader, per_view, device))
    n = len(dm.datasets["test"])
    print(
        f"\n[bench_tta] {cfg.model.backbone}, {n} test images of 32 px, batch "
        f"{dm.eval_batch_size}, device {device}, {torch.get_num_threads()} CPU threads\n"
        f"  single crop          {t_single * 1000:8.1f} ms\n"
        f"  ten crop (batched)   {t_ten * 1000:8.1f} ms  = {t_ten / t_single:5.2f} x single\n"
        f"  ten crop (per view)  {t_loop * 1000:8.1f} ms  = {t_loop / t_single:5.2f} x single"
    )
    assert t_ten / t_single <= TARGET, f"ten-crop costs {t_ten / t_single:.1f}x a single crop"
