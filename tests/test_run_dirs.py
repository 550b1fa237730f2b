"""Nothing a user re-launches loses work or lies: a directory that holds a run is continued,
skipped or refused, never half-overwritten; a diverged run fails; predictions are never lost."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from datamodules.errors import UserError
from tests.conftest import FAST, ONE_THREAD, compose_cfg, run_cli

TINY = [
    *FAST,
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "tta=none",
]


def _digest(folder: Path) -> dict[str, str]:
    """sha1 of every file below ``folder`` (what a re-launch must leave as it was)."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "run.log"  # the log records every launch, by design
    }


def _errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("Error")]


@pytest.mark.slow
def test_a_finished_sweep_relaunched_with_other_overrides_is_refused_and_kept(tmp_path):
    sweep = tmp_path / "sweep"
    first = run_cli("-m", "seed=1", *TINY, f"hydra.sweep.dir={sweep}", env=ONE_THREAD)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _digest(sweep / "0")

    other = run_cli(
        "-m", "seed=1", *TINY, "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}", env=ONE_THREAD
    )
    assert other.returncode == 2
    (error,) = _errors(other)
    assert "trainer.max_epochs: 1 -> 2" in error and "force=true" in error
    assert _digest(sweep / "0") == before  # config, metrics, checkpoints: all as they were
    assert not (sweep / "0" / "failed.json").exists()

    same = run_cli("-m", "seed=1", *TINY, f"hydra.sweep.dir={sweep}", env=ONE_THREAD)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "Skipping" in same.stderr + same.stdout
    after = _digest(sweep / "0")
    # the skipped member keeps its record; this launch's Hydra files go beside it
    assert {k: v for k, v in after.items() if "relaunch-" not in k} == before
    assert any(k.startswith(".hydra/relaunch-") for k in after)


@pytest.mark.slow
def test_the_same_run_dir_twice_is_refused_and_never_half_overwritten(tmp_path):
    run_dir = tmp_path / "pretrain"
    first = run_cli(*TINY, f"hydra.run.dir={run_dir}", env=ONE_THREAD)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _digest(run_dir)
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {
        "best.ckpt",
        "last.ckpt",
        "best.calibration.json",  # its temperatures, fitted on validation
    }

    again = run_cli(*TINY, f"hydra.run.dir={run_dir}", env=ONE_THREAD)
    assert again.returncode == 2
    (error,) = _errors(again)
    assert "already holds a run" in error and f"resume={run_dir}" in error
    assert _digest(run_dir) == before  # no relaunch files left, nothing rewritten


@pytest.mark.slow
def test_a_diverged_run_fails_and_is_never_a_member(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "seed=1",
        *TINY,
        "model.optimizer.lr=1e6",
        f"hydra.sweep.dir={sweep}",
        env=ONE_THREAD,
    )
    assert proc.returncode != 0
    job = sweep / "0"
    assert (job / "failed.json").is_file()
    assert "diverged" in (job / "failed.json").read_text()
    assert not (job / "metrics.json").exists()
    assert not (job / "checkpoints" / "best.ckpt").exists()


def test_predict_refuses_an_output_folder_before_any_work(tmp_path):
    from tasks.predict import predict

    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(images / "a.png")
    cfg = compose_cfg(
        tmp_path,
        [
            "task=predict",
            f"predict.input={images}",
            f"predict.output={tmp_path}",  # a folder
            f"ckpt_path={tmp_path}/no_such_run",  # never reached
        ],
    )
    with pytest.raises(UserError, match="is a folder: give a file name"):
        predict(cfg)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data=folder"], "data.root has no value"),
        (["data.classes=[0]"], "a classifier needs at least two"),
    ],
)
def test_user_mistakes_end_in_one_error_line(tmp_path, args, message):
    proc = run_cli(*TINY, *args, f"hydra.run.dir={tmp_path}/run", env=ONE_THREAD)
    assert proc.returncode == 2
    assert [message in line for line in _errors(proc)] == [True]
    assert "Traceback" not in proc.stderr


def test_training_from_a_run_folder_says_to_resume_it(tmp_path):
    from tasks.train import train

    folder = tmp_path / "old_run"
    folder.mkdir()
    cfg = compose_cfg(tmp_path, [f"ckpt_path={folder}"])
    with pytest.raises(UserError, match=f"use resume={folder}"):
        train(cfg)


@pytest.mark.slow
def test_a_second_launch_into_a_busy_sweep_dir_is_refused_naming_the_holder(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    sweep = tmp_path / "sweep"
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "-m", "seed=1,2", *TINY, f"hydra.sweep.dir={sweep}"],
        cwd=ROOT,
        env={**os.environ, **ONE_THREAD},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = sweep / ".lock"
    deadline = time.time() + 60
    while not lock.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert lock.exists(), "the first launch never took its lock"
    second = run_cli("-m", "seed=1,2", *TINY, f"hydra.sweep.dir={sweep}", env=ONE_THREAD)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert second.returncode == 2
    (error,) = _errors(second)
    assert f"pid {first.pid}" in error and "is in use by another launch" in error
    assert not lock.exists()  # released at the end
    for job in ("0", "1"):  # the first launch's members are whole and alone
        assert (sweep / job / "metrics.json").is_file()
        assert not (sweep / job / "failed.json").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    from tasks.hydra_callbacks.directory_lock import acquire, release

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    path = acquire(tmp_path)
    assert json.loads(path.read_text())["pid"] != dead.pid
    with pytest.raises(SystemExit):  # now held by this (live) process: a second taker is refused
        acquire(tmp_path)
    release(path)
    assert not path.exists()


def test_an_unwritable_log_dir_is_one_error_line(tmp_path):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")  # nothing can be created below a file, not even by root
    proc = run_cli(*TINY, f"paths.log_dir={blocked}/logs")
    assert proc.returncode == 2
    assert [line.startswith("Error: Cannot write to") for line in _errors(proc)] == [True]
    assert "set paths.log_dir" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_failed_member_run_again_leaves_only_its_new_outcome(tmp_path):
    sweep = tmp_path / "sweep"
    failed = run_cli("-m", "seed=1", *TINY, "model.optimizer.lr=1e6", f"hydra.sweep.dir={sweep}")
    assert failed.returncode != 0 and (sweep / "0" / "failed.json").is_file()
    again = run_cli("-m", "seed=1", *TINY, f"hydra.sweep.dir={sweep}", env=ONE_THREAD)
    assert again.returncode == 0, again.stderr[-2000:]
    job = sweep / "0"
    assert (job / "metrics.json").is_file() and not (job / "failed.json").exists()
    saved = (job / ".hydra" / "overrides.yaml").read_text()
    assert "lr=1e6" not in saved  # the record is the attempt that produced the outcome
    assert not list((job / ".hydra").glob("relaunch-*"))
