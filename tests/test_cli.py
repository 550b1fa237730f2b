"""The command line: fast --help/--cfg without heavy imports, composable configs, run dirs."""

import concurrent.futures as cf

import numpy as np
import pytest
import yaml

from lightning_modules.run_outputs import load_predictions, read_metrics
from tests.conftest import CONF, FAST, ROOT, compose_cfg, imported_modules, run_cli

HEAVY = ("torch", "pytorch_lightning", "lightning", "timm", "wandb", "torchvision", "sklearn")


@pytest.mark.parametrize("args", [["--cfg", "job"], ["--help"]])
def test_cfg_and_help_import_no_heavy_library(args):
    imported, proc = imported_modules(str(ROOT / "run.py"), *args)
    assert "omegaconf" in imported  # the check sees real imports
    assert not imported & set(HEAVY), imported & set(HEAVY)
    if args == ["--cfg", "job"]:
        assert yaml.safe_load(proc.stdout)["task"] == "train"


def _options():
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"):
        for option in sorted(group.glob("*.yaml")):
            yield group.name, option.stem


@pytest.mark.parametrize("group, option", list(_options()))
def test_every_config_option_composes_and_resolves(tmp_path, group, option):
    from omegaconf import OmegaConf

    required = {
        "data/folder": ["data.root=/some/images"],
        "data/csv": ["data.root=/some/labels.csv", "data.source.tasks={age: regression}"],
        "experiment/transfer_finetune": ["model.weights=/w.ckpt"],
    }
    extra = required.get(f"{group}/{option}", [])
    cfg = compose_cfg(tmp_path, [f"{group}={option}", *extra], fast=False)
    resolved = {
        key: OmegaConf.to_container(cfg[key], resolve=True, throw_on_missing=True)
        for key in cfg
        if key != "hydra" and OmegaConf.is_config(cfg[key])
    }
    data_targets = ("datamodules.ImageDataModule", "datamodules.MultiTaskDataModule")
    model_targets = ("lightning_modules.ImageClassifier", "lightning_modules.MultiTaskModel")
    assert resolved["data"]["_target_"] in data_targets
    assert resolved["model"]["_target_"] in model_targets


def test_seed_zero_is_kept(tmp_path):
    cfg = compose_cfg(tmp_path, ["seed=0"])
    assert cfg.seed == 0


@pytest.mark.slow
def test_two_runs_started_together_get_different_directories(tmp_path):
    # An unknown task fails right after Hydra has created the run directory: cheap and real.
    def start(_):
        return run_cli("task=nothing", f"paths.log_dir={tmp_path}", timeout=60)

    with cf.ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(start, range(2)))
    assert all(p.returncode == 2 and "Unknown task 'nothing'" in p.stderr for p in procs)
    dirs = sorted((tmp_path / "nothing" / "runs").iterdir())
    assert len(dirs) == 2, dirs
    assert all((d / ".hydra" / "config.yaml").is_file() for d in dirs)


@pytest.mark.slow
def test_multirun_two_seeds_share_the_test_set(tmp_path):
    proc = run_cli(
        "-m",
        "seed=0,1",
        *FAST,
        "trainer.limit_train_batches=3",
        f"paths.log_dir={tmp_path}",
        f"hydra.sweep.dir={tmp_path}/sweep",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert [r.name for r in runs] == ["0", "1"]
    metrics = [read_metrics(r) for r in runs]
    assert [m["seed"] for m in metrics] == [0, 1]
    assert metrics[0]["test/nll"] != metrics[1]["test/nll"]
    preds = [load_predictions(r) for r in runs]
    assert preds[0]["ids"].tolist() == preds[1]["ids"].tolist()
    assert np.array_equal(preds[0]["targets"], preds[1]["targets"])
    assert not np.allclose(preds[0]["probs"], preds[1]["probs"])
    for run in runs:
        assert (run / ".hydra" / "config.yaml").is_file() and (run / "run.log").is_file()


@pytest.mark.slow
def test_user_error_is_one_line_and_exit_code_2(tmp_path):
    proc = run_cli(*FAST, "model.backbone=resnet1", f"paths.log_dir={tmp_path}")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "Error: Unknown backbone 'resnet1'" in proc.stderr
