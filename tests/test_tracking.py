"""Experiment tracking: wandb offline without an account, one group per multirun, no secrets."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict, read_write

from datamodules.errors import UserError
from lightning_modules.run_outputs import read_metrics
from tasks.tracking import (
    MASK,
    is_rank_zero,
    loggable_config,
    run_labels,
    short_label,
    wandb_mode,
)
from tests.conftest import FAST, ONE_THREAD, run_cli

SECRET = "wbkey-9f3c1e77d2a84b6c8e0f5a1d2c3b4a59"


# ---------------------------------------------------------------------------- offline run files
def wandb_records(run_dir: Path) -> list:
    """The protobuf records of an offline run (``run-<id>.wandb``: a LevelDB-style log of
    32 KiB blocks after a 7-byte ``:W&B`` header; chunks of type 1 full, 2 first, 3 middle,
    4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, parts, records = 7, [], []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        parts = [] if kind in (1, 2) else parts
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
    return records


def offline_run(run_dir: Path) -> dict:
    """group, job_type, name, tags, config, summary, history keys and exit code of a run."""
    out = {"config": {}, "summary": {}, "history": set(), "exit_code": None}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(group=run.run_group, job_type=run.job_type, name=run.display_name)
            out.update(tags=list(run.tags), run_id=run.run_id)
        elif kind in ("config", "summary"):
            for item in getattr(record, kind).update:
                if item.key or len(item.nested_key) == 1:  # not a field of a media object
                    out[kind][item.key or item.nested_key[0]] = json.loads(item.value_json)
        elif kind == "history":
            out["history"] |= {item.key or item.nested_key[0] for item in record.history.item}
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def _tracker_env(tmp_path: Path) -> dict:
    home = tmp_path / "wandb_home"
    return {
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": SECRET,
        "WANDB_DIR": str(home / "dir"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_DATA_DIR": str(home / "data"),
    }


# ---------------------------------------------------------------------------- the real thing
@pytest.mark.slow
def test_multirun_logs_each_job_as_its_own_offline_wandb_run_in_one_group(tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in FAST if not o.startswith("logger=")]  # the default loggers
    proc = run_cli(
        "-m",
        "seed=1,2",
        *overrides,
        "model.drop_rate=0.2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        f"paths.log_dir={tmp_path}",
        f"hydra.sweep.dir={sweep}",
        env={**ONE_THREAD, **_tracker_env(tmp_path)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert output.count("wandb: offline (WANDB_MODE=offline)") == 1  # the choice, printed once

    runs = {}
    for job in ("0", "1"):
        (run_dir,) = (sweep / job / "wandb").glob("offline-run-*")  # one run per job
        runs[job] = offline_run(run_dir)
        assert (sweep / job / "csv" / "metrics.csv").is_file()  # csv and wandb together
    first, second = runs["0"], runs["1"]
    assert first["run_id"] != second["run_id"]
    # one group, named after the sweep; one job type per setting; names say the seed
    assert first["group"] == second["group"] == sweep.name
    setting = "callbacks.rich_model_summary=null,callbacks.rich_progress_bar=null,"
    setting += "data.num_workers=0,model.backbone=test_resnet,model.drop_rate=0.2,"
    setting += "trainer.limit_test_batches=1,trainer.limit_train_batches=2,"
    setting += "trainer.limit_val_batches=1,trainer.max_epochs=1"
    assert first["name"] == f"{setting},seed=1" and second["name"] == f"{setting},seed=2"
    assert first["job_type"] == second["job_type"] != ""
    assert first["tags"] == ["train", "test_resnet"]
    for job, run in runs.items():
        config, metrics = run["config"], read_metrics(sweep / job)
        # the full resolved config of this job
        assert config["seed"] == int(job) + 1
        assert config["model"]["drop_rate"] == 0.2 and config["model"]["backbone"] == "test_resnet"
        assert config["trainer"]["default_root_dir"] == str(sweep / job)
        assert config["paths"]["root_dir"] == "${oc.env:PROJECT_ROOT,.}"  # env never read in
        # summary metrics: the job's final metrics
        for key in ("test/acc", "test/nll", "val/acc_best", "epochs"):
            assert run["summary"][key] == pytest.approx(metrics[key]), key
        assert {"train/loss", "val/acc", "test/acc"} <= run["history"]
        assert run["exit_code"] == 0  # finished before the next job started
    # the API key is in no file the run wrote (run dirs, wandb's own dirs)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------------------- units
def test_wandb_mode_offline_unless_logged_in_or_told(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    other = tmp_path / "netrc_other"
    other.write_text("machine example.com\n  login user\n  password abc123\n")
    missing = tmp_path / "nothing"
    assert wandb_mode(environ={}, netrc_file=missing)[0] == "offline"
    assert wandb_mode(environ={}, netrc_file=other)[0] == "offline"
    assert wandb_mode(environ={}, netrc_file=netrc) == ("online", "logged in (wandb login)")
    assert wandb_mode(environ={"WANDB_API_KEY": "k"}, netrc_file=missing)[0] == "online"
    on_premises = {"WANDB_BASE_URL": "https://wandb.example.com"}
    assert wandb_mode(environ=on_premises, netrc_file=netrc)[0] == "offline"  # another host
    # an explicit choice wins: the environment, then the config
    assert wandb_mode(environ={"WANDB_MODE": "dryrun", "WANDB_API_KEY": "k"})[0] == "offline"
    assert wandb_mode("disabled", environ={"WANDB_MODE": "online"})[0] == "disabled"
    with pytest.raises(UserError, match="logger.wandb.mode='offlne' is not a wandb mode"):
        wandb_mode("offlne", environ={})


def test_loggable_config_resolves_but_never_reads_the_environment(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "t0ken-value-42")
    monkeypatch.setenv("DATA_HOME", "/mnt/data")
    cfg = OmegaConf.create(
        {
            "seed": 3,
            "lr": "${model.lr}",
            "model": {"lr": 0.01, "name": "run-${seed}"},
            "paths": {"root": "${oc.env:DATA_HOME}", "data": "${paths.root}/digits"},
            "service": {"token": "${oc.env:MY_SERVICE_TOKEN}", "url": "x?t=${service.token}"},
            "api_key": "plain-secret",
            "list": ["${seed}", {"k": "${model.lr}"}],
            "hydra": {"run": {"dir": "somewhere"}},
        }
    )
    out = loggable_config(cfg)
    assert "hydra" not in out
    assert out["lr"] == 0.01 and out["model"]["name"] == "run-3"
    assert out["list"] == [3, {"k": 0.01}]
    assert out["paths"]["root"] == "${oc.env:DATA_HOME}"  # kept as text
    assert out["service"]["token"] == MASK and out["api_key"] == MASK
    text = json.dumps(out)
    assert "t0ken-value-42" not in text and "plain-secret" not in text
    assert out["service"]["url"] == f"x?t={MASK}"  # a secret read in indirectly is masked


def test_run_labels_name_the_sweep_setting_and_seed(cfg_factory):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    cfg = cfg_factory()
    with read_write(cfg.hydra), open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = "/x/train/multiruns/2025-01-02_03-04-05_abc123"
        cfg.hydra.overrides.task = [
            "seed=2",
            "model.optimizer.lr=0.001",
            "paths.log_dir=/somewhere/else",
            "logger=[csv,wandb]",
            "+model.label_smoothing=0.1",
            "hparams_search=optuna",
        ]
    HydraConfig().set_config(cfg)
    labels = run_labels(seed=2)
    assert labels.group == "2025-01-02_03-04-05_abc123"
    assert labels.job_type == "model.label_smoothing=0.1,model.optimizer.lr=0.001"
    assert labels.name == labels.job_type + ",seed=2"
    job_types = set()
    for lr in ("0.00012345678901234", "0.00012345678901235"):
        with read_write(cfg.hydra), open_dict(cfg):
            cfg.hydra.overrides.task = [
                "seed=7",
                f"model.optimizer.weight_decay={lr}",
                "model.drop_rate=0.1",
            ]
        HydraConfig().set_config(cfg)
        long = run_labels(seed=7)
        assert long.name == f"model.drop_rate=0.1,model.optimizer.weight_decay={lr},seed=7"
        assert len(long.job_type) == 64  # wandb's limit ...
        job_types.add(long.job_type)
    assert len(job_types) == 2  # ... and cut labels of different settings stay different


def test_rank_zero_from_the_launchers_environment():
    assert is_rank_zero({})
    assert is_rank_zero({"LOCAL_RANK": "0", "NODE_RANK": "0", "SLURM_PROCID": "0"})
    assert not is_rank_zero({"LOCAL_RANK": "1"})
    assert not is_rank_zero({"SLURM_PROCID": "5", "LOCAL_RANK": "1"})
    assert not is_rank_zero({"LOCAL_RANK": "0", "NODE_RANK": "1"})


@pytest.mark.slow
def test_csv_and_mlflow_together_log_the_run_into_a_local_file_store(cfg_factory, tmp_path):
    from tasks.train import train

    cfg = cfg_factory(
        "logger=[csv,mlflow]",
        "seed=4",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
    )
    metrics, _ = train(cfg)
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    (run,) = (p.parent for p in (tmp_path / "mlruns").glob("*/*/meta.yaml"))
    name = (run / "tags" / "mlflow.runName").read_text()
    assert name.endswith("trainer.max_epochs=1,seed=4") and "model.backbone=test_resnet" in name
    assert "logger" not in name  # where things are logged is no part of the setting
    assert (run / "tags" / "job_type").read_text() == short_label(name.removesuffix(",seed=4"))
    assert (run / "params" / "model" / "backbone").read_text() == "test_resnet"
    last = (run / "metrics" / "test" / "acc").read_text().split()
    assert float(last[1]) == pytest.approx(metrics["test/acc"])


@pytest.mark.slow
def test_a_wandb_key_without_network_trains_and_logs_offline(tmp_path):
    """A well-formed key on a node without network: one warning, an offline run, no waiting."""
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env.update(ONE_THREAD)
    env["WANDB_API_KEY"] = "0123456789abcdef0123456789abcdef01234567"  # well-formed, fake
    env["WANDB_BASE_URL"] = "http://127.0.0.1:9"  # nothing listens: as unreachable as no network
    start = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            *FAST,
            "logger=wandb",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "tta=none",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "cannot be reached" in output and "wandb sync" in output
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert read_metrics(tmp_path / "run")["test/acc"] > 0
    assert elapsed < 120, elapsed  # not the ~90 s wandb waits per member, on top of the run


def test_an_unreachable_mlflow_server_falls_back_to_the_local_store(tmp_path, caplog):
    from tasks.tracking import mlflow_logger

    with caplog.at_level("WARNING"):
        logger = mlflow_logger(
            tracking_uri="http://127.0.0.1:9",  # nothing listens there
            experiment_name="e",
            save_dir=tmp_path,
        )
    assert logger._tracking_uri == f"file:{tmp_path.resolve()}/mlruns"
    assert "cannot be reached" in caplog.text
    assert (tmp_path / "mlruns").is_dir()
