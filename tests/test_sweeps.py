"""Sweeps and launchers: Optuna with a failing trial, joblib and submitit jobs, SLURM settings."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml

from lightning_modules.run_outputs import read_metrics
from tests.conftest import FAST, ONE_THREAD, compose_cfg, run_cli

# a tiny job: two batches of training, one of validation and test
TINY = [
    *FAST,
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
]


class FailInJob(pl.Callback):
    """Test probe: raise in job number ``fail_job`` of a multirun (``job``: ``${hydra:job.num}``)."""

    def __init__(self, job: int, fail_job: int) -> None:
        self.job, self.fail_job = int(job), int(fail_job)

    def on_fit_start(self, trainer, pl_module):
        if self.job == self.fail_job:
            raise RuntimeError(f"trial {self.job} breaks on purpose")


def _trials(sweep: Path) -> list[dict]:
    with open(sweep / "trials.csv") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------- Optuna
@pytest.mark.slow
def test_optuna_search_of_three_trials_survives_a_failed_trial(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        *TINY,
        "+callbacks.fail._target_=tests.test_sweeps.FailInJob",
        "+callbacks.fail.job=${hydra:job.num}",
        "+callbacks.fail.fail_job=1",
        f"paths.log_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
        env=ONE_THREAD,
        timeout=300,
    )
    # the search runs to the end; the failed trial makes the command exit non-zero (1: not a
    # user error), so scripts notice (tasks/hydra_callbacks/failed_jobs.py)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "trial 1 breaks on purpose" in proc.stdout + proc.stderr  # reported ...
    rows = _trials(sweep)
    assert [(r["job"], r["state"]) for r in rows] == [
        ("0", "complete"),
        ("1", "failed"),  # ... as failed, in trials.csv
        ("2", "complete"),  # and the search went on
    ]
    assert rows[1]["val/acc_best"] == "" and "breaks on purpose" in rows[1]["error"]
    space = ["model.optimizer.lr", "model.optimizer.weight_decay", "model.drop_rate", "augment"]
    for row in rows:
        job = sweep / row["job"]
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        # each trial ran with the parameters Optuna drew, inside the search space
        assert config["model"]["optimizer"]["lr"] == pytest.approx(float(row[space[0]]))
        assert 1e-4 <= float(row[space[0]]) <= 1e-2 and 0 <= float(row[space[2]]) <= 0.5
        assert row["augment"] in ("none", "light")
        assert config["finetune"]["callback"]["every"] == int(row["finetune.callback.every"])
        if row["state"] == "complete":
            assert float(row["val/acc_best"]) == pytest.approx(read_metrics(job)["val/acc_best"])
    assert len({row[space[0]] for row in rows}) == 3  # three different trials
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    complete = [r for r in rows if r["state"] == "complete"]
    top = max(complete, key=lambda r: float(r["val/acc_best"]))
    assert best["best_value"] == pytest.approx(float(top["val/acc_best"]))
    assert best["best_params"]["model.optimizer.lr"] == pytest.approx(float(top[space[0]]))


def test_objective_is_none_unless_a_finite_number():
    from tasks.outcome import objective

    metrics = {"val/acc_best": 0.75, "nan": math.nan, "inf": math.inf, "text": "x"}
    assert objective(metrics, "val/acc_best") == 0.75
    for name in ("nan", "inf", "text", "missing", None):
        assert objective(metrics, name) is None


def test_optuna_sweeper_records_none_as_failed_and_would_end_on_nan(tmp_path):
    """The contract run.py relies on: a job returning None is a failed trial and the search goes
    on; a NaN return value would crash hydra-optuna-sweeper (so run.py never returns one)."""
    import optuna
    from hydra.core.utils import JobReturn, JobStatus
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
    from omegaconf import OmegaConf

    class Launcher:
        def __init__(self, values):
            self.values = list(values)

        def launch(self, overrides, initial_job_idx):
            job = JobReturn(status=JobStatus.COMPLETED)
            job.return_value = self.values.pop(0)
            return [job]

    def search(values):
        sweeper = OptunaSweeperImpl(
            sampler=optuna.samplers.RandomSampler(seed=0),
            direction="maximize",
            storage=None,
            study_name="s",
            n_trials=len(values),
            n_jobs=1,
            max_failure_rate=1.0,
            search_space=None,
            custom_search_space=None,
            params={"x": "interval(0, 1)"},
        )
        sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
        sweeper.launcher, sweeper.hydra_context = Launcher(values), object()
        sweeper.sweep([])
        return yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())

    assert search([0.25, None, 0.5])["best_value"] == 0.5
    with pytest.raises(ValueError, match="Values cannot be specified when state is"):
        search([0.25, math.nan, 0.5])


# ---------------------------------------------------------------------------- launchers
@pytest.mark.slow
def test_submitit_job_lands_in_the_sweep_and_the_multirun_end_sees_it(tmp_path):
    """hydra/launcher=submitit_local: the code path of SLURM's submitit_slurm, run here. The job
    runs in a process of its own (pickled there), in the sweep directory the launching process
    created (``${run_id:}`` resolved once), and the callbacks at the multirun's end see its
    results after it finished."""
    logs = tmp_path / "outputs"
    proc = run_cli(
        "-m",
        "hydra/launcher=submitit_local",
        "seed=3",
        *TINY,
        "+hydra.callbacks.trials_table._target_=tasks.hydra_callbacks.trials_table.TrialsTable",
        f"paths.log_dir={logs}",
        env=ONE_THREAD,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (logs / "train" / "multiruns").iterdir()  # one sweep directory, nothing else
    job = sweep / "0"
    assert read_metrics(job)["seed"] == 3
    # the job went through submitit (its folder is named after the job id) ...
    (submitit_dir,) = (d for d in (sweep / ".submitit").iterdir() if d.name.isdigit())
    assert (submitit_dir / f"{submitit_dir.name}_0_result.pkl").is_file()
    (row,) = _trials(sweep)  # ... and the multirun's end saw its result
    assert (row["job"], row["state"]) == ("0", "complete")
    assert float(row["val/acc_best"]) == pytest.approx(read_metrics(job)["val/acc_best"])


def test_slurm_launcher_settings_reach_sbatch(tmp_path, monkeypatch):
    """`hydra/launcher=slurm` with DDP over 2 nodes x 4 GPUs: the sbatch script submitit would
    submit (SLURM itself is not needed: a stand-in `srun` lets submitit start)."""
    import submitit
    from hydra.utils import instantiate

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    cfg = compose_cfg(
        tmp_path,
        [
            "hydra/launcher=slurm",
            "trainer=ddp",
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=90",
            "hydra.launcher.mem_gb=64",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
    )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    scripts = []

    class Submitted(Exception):
        pass

    def submit(self, fn, *args):
        scripts.append(self._executor._make_submission_file_text("python -m submitit", "0"))
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", submit)
    with pytest.raises(Submitted):
        launcher.launch([["seed=1"], ["seed=2"]], initial_job_idx=0)
    sbatch = {
        line.split("=", 1)[0][len("#SBATCH ") :]: line.split("=", 1)[1]
        for line in scripts[0].splitlines()
        if line.startswith("#SBATCH")
    }
    assert sbatch["--partition"] == "gpu"
    assert sbatch["--nodes"] == "2"  # trainer.num_nodes
    assert sbatch["--ntasks-per-node"] == "4"  # one task per device: trainer.devices
    assert sbatch["--gpus-per-node"] == "4"
    assert sbatch["--time"] == "90" and sbatch["--mem"] == "64GB"
    assert sbatch["--output"].startswith(str(tmp_path / "sweep" / ".submitit"))


@pytest.mark.slow
def test_optuna_takes_a_search_range_from_the_command_line_as_documented(tmp_path):
    """docs/tracking-sweeps-scaling.md: `'model.drop_rate=interval(0.1,0.3)'`."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "hparams_search=optuna",
        "model.drop_rate=interval(0.1,0.3)",
        "hydra.sweeper.n_trials=2",
        *TINY,
        f"hydra.sweep.dir={sweep}",
        env=ONE_THREAD,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rates = [
        float(o.split("=", 1)[1])
        for job in ("0", "1")
        for o in yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        if o.startswith("model.drop_rate=")
    ]
    assert len(rates) == 2 and all(0.1 <= r <= 0.3 for r in rates)


@pytest.mark.slow
def test_joblib_jobs_use_loader_workers_as_documented(tmp_path):
    """`python run.py -m hydra/launcher=joblib hydra.launcher.n_jobs=3 seed=1,2,3` with loader
    worker processes (a folder source's default) inside joblib's own worker processes."""
    sweep = tmp_path / "sweep"
    with_workers = [o for o in TINY if not o.startswith("data.num_workers")] + [
        "data.num_workers=1"
    ]
    proc = run_cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "seed=1,2",
        *with_workers,
        f"hydra.sweep.dir={sweep}",
        env=ONE_THREAD,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        config = yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())
        assert config["data"]["num_workers"] == 1  # not the tests' in-process loading
        assert read_metrics(sweep / job)["test/acc"] > 0


@pytest.mark.slow
def test_an_optuna_study_stopped_and_resumed_from_its_storage(tmp_path):
    """`hydra.sweeper.storage=sqlite:///optuna.db` keeps the study: a second launch adds to it."""
    import optuna

    storage = f"sqlite:///{tmp_path}/optuna.db"
    for launch in (1, 2):
        proc = run_cli(
            "-m",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=1",
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=resumable",
            *TINY,
            f"hydra.sweep.dir={tmp_path}/sweep{launch}",
            env=ONE_THREAD,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="resumable", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
