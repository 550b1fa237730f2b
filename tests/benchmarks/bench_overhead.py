"""The project against a bare PyTorch loop (and timm's ``train.py``) on the default job.

    RUN_BENCHMARKS=1 python -m pytest tests/benchmarks/bench_overhead.py -s
    TIMM_TRAIN_PY=/path/to/timm/train.py ...   # adds timm's unmodified train.py to the table

resnet10t from scratch on the bundled digits, 5 epochs, batch 64, AdamW + warm-up/cosine,
validation every epoch, the best weights saved and tested: the project as
``python run.py augment=none tta=none logger=none`` and ``bare_loop.py`` on the same split and
pixels (timm: the same images as PNG folders, ``--no-aug``). Rounds interleave the variants, at
one math thread and at the default; each figure is the median over rounds, with its spread
(max - min over the median). Goals (a goal fails only when missed by more than the spread):
whole process <= 1.15x the bare loop; steady-state training (epochs 2-5) <= 1.05x per image;
first training step <= the bare loop's + 2 s. Also prints where the project's extra time goes,
phase by phase (``phases``).
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

import torch

from tests.benchmarks.spread import relative_spread

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ROUNDS = int(os.environ.get("BENCH_ROUNDS", 3))
EPOCHS = 5
WHOLE, STEP, FIRST_STEP_S = 1.15, 1.05, 2.0
PROJECT = ["augment=none", "tta=none", "logger=none", "seed=1"]


def _prepare(tmp: Path) -> Path:
    """The project's own split and pixels, as tensors (bare loop) and PNG folders (timm): its
    data module made from the composed config the project run uses (``eval_crop_pct`` and all)."""
    from torchvision.transforms.functional import to_pil_image

    from tasks.instantiate import instantiate
    from tests.conftest import compose_cfg

    cfg = compose_cfg(tmp / "compose", [o for o in PROJECT if o.startswith("augment")], fast=False)
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    data = {"classes": torch.tensor(len(dm.class_names))}
    for split in ("train", "val", "test"):
        ds = dm.datasets[split]
        items = [ds[row] for row in range(len(ds))]
        data[f"{split}_x"] = torch.stack([x for x, _, _ in items])
        data[f"{split}_y"] = torch.tensor([y for _, y, _ in items])
        folder = tmp / "images" / {"train": "train", "val": "validation", "test": "test"}[split]
        for row in range(len(ds)):
            where = folder / f"{int(ds.targets[row]):02d}"
            where.mkdir(parents=True, exist_ok=True)
            to_pil_image(ds._load(row)).save(where / f"{row:04d}.png")  # uint8 CHW: lossless
    torch.save(data, tmp / "data.pt")
    return tmp


def _timed(argv: list[str], env: dict, cwd: Path) -> tuple[float, float, str]:
    start = time.time()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    wall = time.time() - start
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return start, wall, proc.stdout + proc.stderr


def _bare(tmp: Path, env: dict, name: str) -> dict:
    out = tmp / f"{name}.json"
    cmd = [sys.executable, str(HERE / "bare_loop.py"), str(tmp / "data.pt"), str(out), str(EPOCHS)]
    start, wall, _ = _timed(cmd, env, tmp)
    rec = json.loads(out.read_text())
    n = rec["n_train"]
    return {
        "wall": wall,
        "first": rec["first_step"] - start,
        "rate": n / statistics.median(rec["epochs"][1:]),
        "acc": rec["test_acc"],
        "phases": phases(rec, start, wall),
    }


def _project(tmp: Path, env: dict, name: str) -> dict:
    out = tmp / f"{name}.json"
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        *PROJECT,
        f"paths.log_dir={tmp / 'outputs'}",
        f"trainer.max_epochs={EPOCHS}",
        "+callbacks.epoch_timer._target_=tests.benchmarks.epoch_timer.EpochTimer",
        f"+callbacks.epoch_timer.path={out}",
    ]
    start, wall, _ = _timed(cmd, {**env, "PYTHONPATH": str(ROOT)}, ROOT)
    rec = json.loads(out.read_text())
    run_dir = max((tmp / "outputs/train/runs").iterdir(), key=lambda p: p.stat().st_mtime)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "wall": wall,
        "first": rec["first_step"] - start,
        "rate": rec["n_train"] / statistics.median(rec["epochs"][1:]),
        "acc": metrics.get("test/acc"),
        "phases": phases(rec, start, wall),
    }


def _timm(tmp: Path, env: dict, name: str) -> dict:
    cmd = [
        sys.executable,
        os.environ["TIMM_TRAIN_PY"],
        "--data-dir",
        str(tmp / "images"),
        "--device",
        "cpu",
        "--model",
        "resnet10t",
        "--num-classes",
        "10",
        "--input-size",
        "3",
        "32",
        "32",
        "--crop-pct",
        "1.0",
        "--no-aug",
        "--epochs",
        str(EPOCHS),
        "-b",
        "64",
        "--opt",
        "adamw",
        "--lr",
        "0.002",
        "--weight-decay",
        "0.05",
        "--sched",
        "cosine",
        "--warmup-epochs",
        "1",
        "--min-lr",
        "2e-5",
        "--drop",
        "0.1",
        "--smoothing",
        "0",
        "--workers",
        "1",
        "--seed",
        "1",
        "--log-interval",
        "1000",
        "--output",
        str(tmp / f"timm-{name}"),
        "--checkpoint-hist",
        "1",
    ]
    _, wall, log = _timed(cmd, env, tmp)
    rates: dict[int, float] = {}  # each epoch's last line: its average step time and rate
    for epoch, rate in re.findall(r"Train: (\d+) \[.*?\(\d+\.\d+s,\s+([\d.]+)/s\)", log):
        rates[int(epoch)] = float(rate)
    return {
        "wall": wall,
        "first": float("nan"),
        "rate": statistics.median(list(rates.values())[1:]),
        "acc": float("nan"),
    }


PHASES = (
    "start-up",
    "sanity check",
    "training",
    "validation",
    "checkpoints",
    "rest of fit",
    "test",
    "after test",
    "exit",
)


def phases(rec: dict, start: float, wall: float) -> dict[str, float]:
    """Where a run's wall time goes, from the timestamps of ``epoch_timer.py`` / ``bare_loop.py``:
    start-up (imports, config, data, model: up to the first training step, less the sanity
    check), training (the epochs' batches), validation, checkpoints (the best weights kept and
    written; the project also writes ``last.ckpt``), the rest of fit (loader start, epoch ends,
    logging), test (restoring the best weights included), after test (the run's files:
    predictions, validation predictions, calibration) and exit (interpreter shutdown)."""
    train, val, ckpt = sum(rec["epochs"]), rec["val"], rec["checkpoints"]
    out = {
        "start-up": rec["first_step"] - start - rec["sanity"],
        "sanity check": rec["sanity"],
        "training": train,
        "validation": val,
        "checkpoints": ckpt,
        "rest of fit": rec["fit_end"] - rec["first_step"] - train - val - ckpt,
        "test": rec["test_end"] - rec["fit_end"],
        "after test": rec["exit"] - rec["test_end"],
        "exit": start + wall - rec["exit"],
    }
    return out


def _breakdown(runs: dict[str, list[dict]]) -> None:
    """Median seconds per phase for each variant, and the project's extra over the bare loop."""
    if not all("phases" in rs[0] for rs in runs.values()):
        return
    names = [v for v in runs if "phases" in runs[v][0]]
    print(f"{'phase, s':>14} " + " ".join(f"{v:>9}" for v in names) + f" {'extra':>7}")
    for ph in PHASES:
        med = {v: statistics.median(r["phases"][ph] for r in runs[v]) for v in names}
        extra = med["project"] - med["bare"]
        print(f"{ph:>14} " + " ".join(f"{med[v]:9.2f}" for v in names) + f" {extra:+7.2f}")


def _summarise(setting: str, res: dict, variants: list[str]) -> list[str]:
    """Print one thread setting's table and ratios; the goals it misses."""
    runs = {v: res[(setting, v)] for v in variants}
    print(f"\n{setting}, median of {ROUNDS} rounds:")
    print(f"{'':>10} {'train img/s':>12} {'whole s':>8} {'1st step s':>11} {'test acc':>9}")
    for v, rs in runs.items():
        med = {k: statistics.median(x[k] for x in rs) for k in ("rate", "wall", "first", "acc")}
        print(
            f"{v:>10} {med['rate']:12.0f} {med['wall']:8.1f} {med['first']:11.1f} {med['acc']:9.4f}"
        )
    _breakdown({v: rs for v, rs in runs.items() if v in ("bare", "project")})
    pairs = list(zip(runs["project"], runs["bare"], strict=True))
    whole = [p["wall"] / b["wall"] for p, b in pairs]
    step = [b["rate"] / p["rate"] for p, b in pairs]
    first = [p["first"] - b["first"] for p, b in pairs]
    w, st, fs = (statistics.median(x) for x in (whole, step, first))
    print(
        f"project/bare: whole {w:.2f}x (goal {WHOLE}, spread {relative_spread(whole):.2f}); per image "
        f"{st:.2f}x (goal {STEP}, spread {relative_spread(step):.2f}); first step +{fs:.1f} s "
        f"(goal +{FIRST_STEP_S})"
    )
    failures = []
    if w > WHOLE * (1 + relative_spread(whole)):
        failures.append(f"{setting}: whole process {w:.2f}x > {WHOLE}x")
    if st > STEP * (1 + relative_spread(step)):
        failures.append(f"{setting}: per image {st:.2f}x > {STEP}x")
    if fs > FIRST_STEP_S + max(first) - min(first):
        failures.append(f"{setting}: first step +{fs:.1f} s > +{FIRST_STEP_S} s")
    return failures


def test_project_against_a_bare_loop(tmp_path):
    _prepare(tmp_path)
    variants = {"bare": _bare, "project": _project}
    if os.environ.get("TIMM_TRAIN_PY"):
        variants["timm"] = _timm
    base_env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    }
    settings = {
        "1 thread": {**base_env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        "default threads": base_env,
    }
    res = {(s, v): [] for s in settings for v in variants}
    for r in range(ROUNDS):  # interleaved: machine load drifts over every variant alike
        for s, env in settings.items():
            for v, fn in variants.items():
                res[(s, v)].append(fn(tmp_path, env, f"{v}-{s[0]}-{r}"))
    failures = [f for s in settings for f in _summarise(s, res, list(variants))]
    assert not failures, failures
