"""Shared test helpers: compose the real Hydra config with fast overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# benchmarks print figures and take long: `make bench` runs them, the default suite does not
collect_ignore = [] if os.environ.get("RUN_BENCHMARKS") else ["benchmarks"]

# A tiny timm backbone on 32x32 digits, in-process data loading, no progress bar.
FAST = [
    "model.backbone=test_resnet",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "~callbacks.rich_progress_bar",
    "~callbacks.rich_model_summary",
    "logger=csv",
]


# One math thread per process for runs in subprocesses: on a busy 2-core machine torch's default
# (a thread per core, spin-waiting for each other) makes a small run 3-4x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def compose_cfg(tmp_path: Path, overrides: list[str] = (), *, fast: bool = True):
    """The composed config as ``python run.py`` would see it, writing into ``tmp_path``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import tasks  # noqa: F401  (registers the resolvers and PROJECT_ROOT)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config", overrides=[*(FAST if fast else []), *overrides], return_hydra_config=True
        )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.log_dir = str(tmp_path)
        cfg.paths.data_dir = str(tmp_path / "data")
    return cfg


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600, env: dict | None = None):
    """``python run.py <args>`` in a subprocess; returns the CompletedProcess (text output)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def imported_modules(*args: str) -> tuple[set[str], subprocess.CompletedProcess]:
    """Top-level modules that ``python -X importtime <args>`` imports, and the process."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    return imported, proc


@pytest.fixture(autouse=True, scope="session")
def _offline_trackers(tmp_path_factory):
    """Trackers never reach the network or the user's home: wandb offline, its files in tmp."""
    base = tmp_path_factory.mktemp("trackers")
    patch = pytest.MonkeyPatch()
    patch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        patch.setenv(var, str(base / var.lower()))
    yield
    patch.undo()


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda *overrides, **kw: compose_cfg(tmp_path, list(overrides), **kw)


@pytest.fixture(scope="session")
def seed_sweep(tmp_path_factory):
    """A real ``python run.py -m seed=1,2,-1`` of tiny members: jobs 0 and 1 finish (seeds 1
    and 2, with checkpoints, test and TTA predictions); job 2 fails (seed -1 is out of range).

    Returns ``(sweep dir, CompletedProcess)``.
    """
    tmp = tmp_path_factory.mktemp("seed_sweep")
    proc = run_cli(
        "-m",
        "seed=1,2,-1",
        *FAST,
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        f"paths.log_dir={tmp}",
        f"hydra.sweep.dir={tmp}/sweep",
        timeout=300,
    )
    return tmp / "sweep", proc
