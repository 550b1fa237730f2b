"""Interrupted runs: SIGKILL then `resume=<run dir>` ends exactly like an uninterrupted run;
a re-launched multirun only runs its missing members; checkpoint writes never corrupt the last
good checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.conftest import FAST, ROOT, run_cli

COMMON = [
    *FAST,
    "trainer.max_epochs=4",
    "trainer.limit_train_batches=6",
    "trainer.deterministic=true",
    "finetune=progressive",
    "finetune.callback.milestones=[1,2,3]",
    "~callbacks.early_stopping",
]


def _final(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return metrics, state


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    proc = run_cli(*COMMON, f"hydra.run.dir={full}")
    assert proc.returncode == 0, proc.stderr[-2000:]

    killed = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *COMMON, f"hydra.run.dir={killed}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the next epoch, inside a progressive-unfreeze stage
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert last.exists() and not (killed / "metrics.json").exists(), "killed too late"
    epoch_at_kill = torch.load(last, weights_only=True)["epoch"]
    assert epoch_at_kill < 3

    resumed = run_cli(f"resume={killed}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (m_full, s_full), (m_res, s_res) = _final(full), _final(killed)
    for key in ("val/acc_best", "test/acc", "test/nll", "test/ece", "epochs"):
        assert m_full[key] == m_res[key], key
    for name, tensor in s_full["state_dict"].items():
        assert torch.equal(tensor, s_res["state_dict"][name]), name
    # nothing already written was lost: the original Hydra files and metrics are still there
    assert (killed / ".hydra" / "config.yaml").is_file()
    assert list((killed / ".hydra").glob("resume-*/config.yaml"))
    assert (killed / "csv" / "metrics.csv").is_file()


@pytest.mark.slow
def test_resume_of_a_directory_without_checkpoint_is_a_clear_error(tmp_path):
    proc = run_cli(f"resume={tmp_path}")
    assert (
        proc.returncode == 2 and "Cannot resume" in proc.stderr and "Traceback" not in proc.stderr
    )


@pytest.mark.slow
def test_relaunched_multirun_runs_only_missing_members(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1", *FAST, "trainer.limit_train_batches=2", f"hydra.sweep.dir={sweep}"]
    assert run_cli(*args).returncode == 0
    first = (sweep / "0" / "metrics.json").read_text()
    (sweep / "1" / "metrics.json").unlink()  # as if member 1 had died before finishing
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr + (sweep / "0" / "run.log").read_text()
    assert "already complete" in log
    assert (sweep / "0" / "metrics.json").read_text() == first  # untouched
    assert (sweep / "1" / "metrics.json").is_file()


def test_a_failed_checkpoint_write_leaves_the_previous_one_valid(tmp_path, monkeypatch):
    import fsspec.implementations.local as local
    import pytorch_lightning as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    model = Tiny()
    trainer.strategy.connect(model)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    with torch.no_grad():
        model.w.mul_(5)

    def full_disk(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local.LocalFileOpener, "write", full_disk)
    with pytest.raises(OSError):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    state = torch.load(path, weights_only=True)["state_dict"]
    assert torch.equal(state["w"], torch.ones(3))  # the earlier checkpoint, intact


def test_step_seed_makes_each_steps_randomness_a_function_of_seed_and_step():
    """What makes a resumed run's dropout equal an uninterrupted run's, drawn from every
    generator a step may use."""
    from types import SimpleNamespace

    from callbacks.step_seed import StepSeed

    module = SimpleNamespace(device=torch.device("cpu"))

    def draws(seed: int, step: int) -> tuple:
        StepSeed(seed).on_train_batch_start(SimpleNamespace(global_step=step), module, None, 0)
        return torch.rand(4).tolist(), random.random(), float(np.random.rand())

    first = draws(7, 3)
    torch.rand(100), random.random(), np.random.rand(5)  # whatever ran in between
    assert draws(7, 3) == first
    assert draws(7, 4)[0] != first[0] and draws(8, 3)[0] != first[0]
    assert draws(7, 4)[1:] != first[1:]
