"""GPU readiness: training images/s at 224 px, the project against a bare loop (and timm's
``train.py``), and what the input pipeline delivers with this machine's CPU cores.

    make bench-gpu                      # on a machine with a CUDA GPU
    TIMM_TRAIN_PY=/path/to/timm/train.py make bench-gpu   # adds timm's train.py
    BENCH_GPU_DRY=1 make bench-gpu      # the same script on the CPU, tiny: checks that it runs

Skipped without a CUDA device (unless ``BENCH_GPU_DRY=1``). For each model (resnet50,
convnext_tiny), bf16 autocast and channels_last, batch 128, AdamW's fused kernel:

- **bare loop**: the network alone on random images already on the GPU: what the GPU can do;
- **project**: ``python run.py data=folder ... trainer=bf16 model.channels_last=true`` on JPEG
  photos made here (ImageNet size, from scikit-learn's sample photos), ``augment=light``, one
  loader worker per CPU core; images/s of its epochs after the first;
- **timm train.py** (with ``TIMM_TRAIN_PY``): the same photos, ``--amp --amp-dtype bfloat16
  --channels-last``, the same worker count;
- **input pipeline**: the project's training loader alone over the same photos with that many
  workers: if it is below the bare loop, the project is input-bound on this machine.

Figures only (the targets of the CPU benchmarks do not carry over to an unknown GPU).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.benchmarks.bench_photos import _photos

ROOT = Path(__file__).resolve().parents[2]
DRY = bool(os.environ.get("BENCH_GPU_DRY"))
MODELS = ["test_resnet"] if DRY else ["resnet50", "convnext_tiny"]
SIZE = 64 if DRY else 224
BATCH = 16 if DRY else 128
PHOTOS = 96 if DRY else 2048
EPOCHS = 2 if DRY else 4
WORKERS = 2 if DRY else (os.cpu_count() or 1)

pytestmark = pytest.mark.skipif(
    not DRY and not torch.cuda.is_available(), reason="needs a CUDA GPU (BENCH_GPU_DRY=1: on CPU)"
)


def _device() -> torch.device:
    return torch.device("cpu" if DRY else "cuda")


def _sync() -> None:
    if torch.cuda.is_available() and not DRY:
        torch.cuda.synchronize()


def bare_rate(model_name: str, steps: int = 30, warmup: int = 10) -> float:
    """Images/s of the network alone: random images on the device, bf16 autocast (on the GPU),
    channels_last, AdamW fused."""
    import timm

    device = _device()
    net = timm.create_model(model_name, num_classes=1000).to(device)
    net = net.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    x = torch.randn(BATCH, 3, SIZE, SIZE, device=device).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, 1000, (BATCH,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=not DRY)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync()
            start = time.perf_counter()
        with autocast:
            loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync()
    return steps * BATCH / (time.perf_counter() - start)


def project_rate(model_name: str, root: Path, out: Path) -> float:
    """Images/s of ``python run.py`` training on the photo folder (epochs after the first)."""
    times = out / f"{model_name}.json"
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        "data=folder",
        f"data.root={root}",
        f"model.backbone={model_name}",
        *(["trainer=bf16", "model.channels_last=true"] if not DRY else []),
        f"data.image_size={SIZE}",
        f"data.batch_size={BATCH}",
        f"data.num_workers={WORKERS}",
        f"trainer.max_epochs={EPOCHS}",
        "augment=light",
        "tta=none",
        "logger=none",
        "~callbacks.early_stopping",
        f"paths.log_dir={out / 'outputs'}",
        "+callbacks.epoch_timer._target_=tests.benchmarks.epoch_timer.EpochTimer",
        f"+callbacks.epoch_timer.path={times}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rec = json.loads(times.read_text())
    return rec["n_train"] / statistics.median(rec["epochs"][1:])


def timm_rate(model_name: str, root: Path, out: Path) -> float | None:
    """Images/s of timm's unmodified train.py on the same photos (``TIMM_TRAIN_PY``), or None."""
    script = os.environ.get("TIMM_TRAIN_PY")
    if not script:
        return None
    layout = out / "timm_layout"  # timm wants train/ and validation/ folders
    for split in ("train", "validation"):
        (layout / split).mkdir(parents=True, exist_ok=True)
        for cls in root.iterdir():
            link = layout / split / cls.name
            if not link.exists():
                link.symlink_to(cls, target_is_directory=True)
    cmd = [
        sys.executable,
        script,
        "--data-dir",
        str(layout),
        "--model",
        model_name,
        "--num-classes",
        "2",
        "--input-size",
        "3",
        str(SIZE),
        str(SIZE),
        "-b",
        str(BATCH),
        "--epochs",
        str(EPOCHS),
        "--workers",
        str(WORKERS),
        "--opt",
        "adamw",
        "--output",
        str(out / f"timm-{model_name}"),
        "--log-interval",
        "1000",
        *(["--amp", "--amp-dtype", "bfloat16", "--channels-last"] if not DRY else []),
        *(["--device", "cpu"] if DRY else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rates = re.findall(r"Train: (\d+) \[.*?\(\d+\.\d+s,\s+([\d.]+)/s\)", proc.stdout + proc.stderr)
    per_epoch = {int(e): float(r) for e, r in rates}
    return statistics.median(list(per_epoch.values())[1:] or list(per_epoch.values()))


def input_rate(root: Path) -> float:
    """Images/s of the project's training loader alone (``augment=light``), ``WORKERS`` workers,
    over its second epoch."""
    from omegaconf import OmegaConf

    from datamodules import ImageDataModule
    from datamodules.sources import ImageFolderSource
    from tests.conftest import compose_cfg

    cfg = compose_cfg(root.parent / "cfg", ["augment=light"])
    dm = ImageDataModule(
        source=ImageFolderSource(root=str(root)),
        image_size=SIZE,
        batch_size=BATCH,
        num_workers=WORKERS,
        persistent_workers=True,
        augment=OmegaConf.to_container(cfg.augment, resolve=True),
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    rate = 0.0
    for _ in range(2):  # the second epoch: workers started
        start, n = time.perf_counter(), 0
        for x, _, _ in loader:
            n += len(x)
        rate = n / (time.perf_counter() - start)
    return rate


def test_gpu_throughput(tmp_path):
    root = _photos(tmp_path / "photos", (500, 375), PHOTOS)
    device = torch.cuda.get_device_name(0) if not DRY else "cpu (dry run)"
    pipeline = input_rate(root)
    print(
        f"\n[bench_gpu] {device}, {os.cpu_count()} CPU cores, {SIZE} px, batch {BATCH}, "
        f"{PHOTOS} photos of 500x375, {WORKERS} loader workers"
    )
    print(f"  input pipeline (augment=light): {pipeline:8.0f} img/s")
    print(f"  {'model':>14} {'bare loop':>10} {'project':>10} {'timm':>10}  img/s")
    for name in MODELS:
        bare = bare_rate(name)
        project = project_rate(name, root, tmp_path)
        timm_ = timm_rate(name, root, tmp_path)
        timm_text = f"{timm_:10.0f}" if timm_ else f"{'-':>10}"
        print(f"  {name:>14} {bare:10.0f} {project:10.0f} {timm_text}")
