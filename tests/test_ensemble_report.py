"""The ensemble report: a real multirun with a failing member, grouping, and refused mixtures."""

import json
import logging

import numpy as np
import pytest
from omegaconf import OmegaConf

from datamodules.errors import UserError
from lightning_modules.run_outputs import (
    list_runs,
    load_predictions,
    read_failure,
    read_metrics,
    save_predictions,
    write_failure,
    write_metrics,
)
from tasks.ensemble import (
    ensemble_task,
    flat_setting,
    report_runs,
)
from tests.conftest import compose_cfg, imported_modules


# ---------------------------------------------------------------------------- a real multirun
# ``seed_sweep`` (tests/conftest.py): ``python run.py -m seed=1,2,-1``; the last job fails.
@pytest.mark.slow
def test_multirun_ends_with_the_report_of_the_members_that_finished(seed_sweep):
    sweep_dir, proc = seed_sweep
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]  # a member failed (a user error): non-zero
    assert "Left out of the ensemble: seed -1" in out
    assert "Job 2 failed: UserError: seed=-1 is not a valid seed" in out
    assert read_failure(sweep_dir / "2")["error"] == "UserError"

    report = json.loads((sweep_dir / "ensemble" / "report.json").read_text())
    assert report["seeds"] == [1, 2]
    assert [r["seed"] for r in report["left_out"]] == [-1]
    assert "seed=-1 is not a valid seed" in report["left_out"][0]["reason"]
    assert report["tta"]["mode"] == "five_crop"

    for split in ("test", "test_tta"):
        preds = [load_predictions(sweep_dir / run, split) for run in ("0", "1")]
        targets = preds[0]["targets"]
        average = (preds[0]["probs"].astype(np.float64) + preds[1]["probs"]) / 2
        ens = report[split]["ensemble"]
        assert ens["acc"] == pytest.approx((average.argmax(1) == targets).mean())
        nll = -np.log(average[np.arange(len(targets)), targets]).mean()
        assert ens["nll"] == pytest.approx(nll, rel=1e-6)
        for i, run in enumerate(("0", "1")):  # members as each run measured itself
            member, logged = report[split]["members"][i], read_metrics(sweep_dir / run)
            assert member["acc"] == pytest.approx(logged[f"{split}/acc"], abs=1e-6)
            assert member["ece"] == pytest.approx(logged[f"{split}/ece"], abs=1e-5)
            assert member["brier"] == pytest.approx(logged[f"{split}/brier"], abs=1e-5)
        disagree = (preds[0]["probs"].argmax(1) != preds[1]["probs"].argmax(1)).mean()
        assert report[split]["disagreement"]["mean"] == pytest.approx(disagree)

    for run in ("0", "1"):  # every member also wrote validation predictions and a temperature
        val, logged = load_predictions(sweep_dir / run, "val"), read_metrics(sweep_dir / run)
        assert len(val["ids"]) == 269 and val["probs"].shape == (269, 10)
        assert logged["calibration/temperature"] > 0 and "test_tta_calibrated/nll" in logged
        assert (sweep_dir / run / "checkpoints" / "best.calibration.json").is_file()
    assert report["soups"]["soupable"] is False  # from scratch: different initial weights
    assert set(report["calibration"]) == {"test", "test_tta"}
    assert "ensemble − mean member" in report["gains"]["test"]
    md = (sweep_dir / "ensemble" / "report.md").read_text()
    assert "| ensemble |" in md and "acc % TTA" in md and "Left out: seed -1" in md
    assert "## Calibration" in md and "## 95 % intervals" in md
    for figure in ("reliability.png", "confusion.png", "learning_curves.png"):
        data = (sweep_dir / "ensemble" / figure).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "Ensemble of 2 members (seeds 1, 2)" in proc.stdout  # the printed table


@pytest.mark.slow
def test_ensemble_task_reports_an_existing_sweep_the_same_way(seed_sweep, tmp_path):
    sweep_dir, _ = seed_sweep
    cfg = compose_cfg(tmp_path, ["task=ensemble", f"ensemble.runs={sweep_dir}"])
    metrics, objects = ensemble_task(cfg)
    assert metrics["reports"] == [str(tmp_path / "report.md")]
    again = json.loads((tmp_path / "report.json").read_text())
    first = json.loads((sweep_dir / "ensemble" / "report.json").read_text())
    assert again["test"] == first["test"] and again["test_tta"] == first["test_tta"]


# ---------------------------------------------------------------------------- synthetic runs
CLASSES = [str(i) for i in range(4)]


def make_run(path, overrides=(), *, seed, probs, ids=None, targets=None, classes=CLASSES):
    """A finished run as the report reads it: its config, metrics and test predictions."""
    cfg = compose_cfg(path, [f"seed={seed}", *overrides])
    (path / ".hydra").mkdir(parents=True, exist_ok=True)
    job = {k: cfg[k] for k in cfg if k != "hydra"}
    OmegaConf.save(OmegaConf.create(job), path / ".hydra" / "config.yaml")
    n = len(probs)
    ids = [f"digits/{i}" for i in range(n)] if ids is None else ids
    targets = np.arange(n) % len(classes) if targets is None else targets
    save_predictions(path, "test", probs=probs, targets=targets, ids=ids, class_names=classes)
    write_metrics(path, {"seed": seed, "split_seed": int(cfg.data.split_seed)})
    return path


def random_probs(seed, n=12, c=4):
    rng = np.random.default_rng(seed)
    p = rng.random((n, c)) + 0.1
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def test_a_sweep_over_another_key_gives_one_report_per_setting(tmp_path):
    for job, (lr, seed) in enumerate([(1e-3, 1), (1e-3, 2), (3e-4, 1), (3e-4, 2)]):
        make_run(
            tmp_path / str(job), [f"model.optimizer.lr={lr}"], seed=seed, probs=random_probs(job)
        )
    written = report_runs(list_runs(tmp_path), tmp_path / "ensemble", plots=False)
    assert sorted(p.parent.name for p in written) == [
        "model.optimizer.lr=0.0003",
        "model.optimizer.lr=0.001",
    ]
    for path in written:
        report = json.loads(path.with_name("report.json").read_text())
        assert report["seeds"] == [1, 2]
        lr = float(path.parent.name.split("=")[1])
        assert report["setting"] == {"model.optimizer.lr": lr}
        runs = [m["run"] for m in report["members"]]
        assert runs == (["0", "1"] if lr == 1e-3 else ["2", "3"])


def test_settings_are_named_by_the_overrides_that_tell_them_apart(tmp_path):
    """A preset changes many keys: the report is named `augment=none`, not by those keys."""
    for job, (augment, seed) in enumerate([("none", 1), ("none", 2), ("strong", 1), ("strong", 2)]):
        path = make_run(
            tmp_path / str(job), [f"augment={augment}"], seed=seed, probs=random_probs(job)
        )
        overrides = [f"augment={augment}", f"seed={seed}", "logger=csv"]
        OmegaConf.save(OmegaConf.create(overrides), path / ".hydra" / "overrides.yaml")
    written = report_runs(list_runs(tmp_path), tmp_path / "ensemble", plots=False)
    assert sorted(p.parent.name for p in written) == ["augment=none", "augment=strong"]
    report = json.loads((tmp_path / "ensemble" / "augment=none" / "report.json").read_text())
    assert report["name"] == "augment=none"
    assert report["setting"]["augment.elastic.p"] == 0.0  # the keys the presets change
    assert report["seeds"] == [1, 2]
    text = (tmp_path / "ensemble" / "augment=none" / "report.md").read_text()
    assert "Setting: `augment=none`" in text and "`augment.elastic.p=0.0`" in text


def test_config_comparison_ignores_seed_paths_and_logger_only(tmp_path):
    base = flat_setting(compose_cfg(tmp_path / "a", ["seed=1", "logger.csv.name=x"]))
    other_seed = flat_setting(compose_cfg(tmp_path / "b", ["seed=2"]))
    assert base == other_seed
    assert "seed" not in base and not any(k.startswith(("paths.", "logger.")) for k in base)
    assert base["augment.hflip"] == 0.5  # nested options compare key by key
    # an interpolation whose value reaches into paths (augment.pca.cache_dir) keeps its text
    assert base["data.augment"] == "${augment}"
    other_lr = flat_setting(compose_cfg(tmp_path / "c", ["seed=1", "model.optimizer.lr=0.1"]))
    assert [k for k in base if base[k] != other_lr[k]] == ["model.optimizer.lr"]


def test_members_in_a_different_sample_order_are_refused(tmp_path, caplog):
    probs = random_probs(0)
    make_run(tmp_path / "0", seed=1, probs=probs)
    ids = [f"digits/{i}" for i in range(12)]
    order = np.arange(12)[::-1]
    make_run(
        tmp_path / "1",
        seed=2,
        probs=probs[order],
        ids=[ids[i] for i in order],
        targets=(np.arange(12) % 4)[order],
    )
    with pytest.raises(UserError, match="same test samples in a different order"):
        report_runs(list_runs(tmp_path), tmp_path / "ensemble", strict=True)
    # after a multirun: the same message, logged; no report, no crash
    with caplog.at_level(logging.ERROR):
        assert report_runs(list_runs(tmp_path), tmp_path / "ensemble") == []
    assert "different order" in caplog.text
    assert not (tmp_path / "ensemble" / "report.json").exists()


def test_runs_with_another_data_split_are_not_mixed(tmp_path):
    make_run(tmp_path / "0", ["data.split_seed=0"], seed=1, probs=random_probs(0))
    make_run(tmp_path / "1", ["data.split_seed=1"], seed=2, probs=random_probs(1))
    with pytest.raises(UserError, match=r"differ in more than the seed: data.split_seed"):
        report_runs(list_runs(tmp_path), tmp_path / "ensemble", strict=True)


def test_other_samples_or_classes_are_refused(tmp_path):
    make_run(tmp_path / "a" / "0", seed=1, probs=random_probs(0))
    make_run(tmp_path / "a" / "1", seed=2, probs=random_probs(1), ids=[f"x/{i}" for i in range(12)])
    with pytest.raises(UserError, match="tested on different samples"):
        report_runs(list_runs(tmp_path / "a"), tmp_path / "ra", strict=True)
    make_run(tmp_path / "b" / "0", seed=1, probs=random_probs(0))
    make_run(tmp_path / "b" / "1", seed=2, probs=random_probs(1), classes=list("abcd"))
    with pytest.raises(UserError, match="predict different classes"):
        report_runs(list_runs(tmp_path / "b"), tmp_path / "rb", strict=True)


def test_fewer_than_two_members_is_one_message_not_a_crash(tmp_path, caplog):
    make_run(tmp_path / "0", seed=1, probs=random_probs(0))
    (tmp_path / "1" / ".hydra").mkdir(parents=True)
    (tmp_path / "1" / ".hydra" / "config.yaml").write_text(
        (tmp_path / "0" / ".hydra" / "config.yaml").read_text().replace("seed: 1", "seed: 2")
    )
    write_failure(tmp_path / "1", RuntimeError("out of memory"))
    with caplog.at_level(logging.WARNING):
        assert report_runs(list_runs(tmp_path), tmp_path / "ensemble") == []
    assert "1 member(s) finished (seed 1); it needs at least 2" in caplog.text
    assert "seed 2" in caplog.text and "RuntimeError: out of memory" in caplog.text
    with pytest.raises(UserError, match="No ensemble"):
        report_runs(list_runs(tmp_path), tmp_path / "ensemble", strict=True)


def test_ensemble_runs_that_match_nothing_is_a_user_error(tmp_path):
    cfg = compose_cfg(tmp_path, ["task=ensemble", f"ensemble.runs={tmp_path}/nothing*"])
    with pytest.raises(UserError, match="names no run directory"):
        ensemble_task(cfg)


# ---------------------------------------------------------------------------- failed jobs
def test_a_failed_job_is_recorded_with_its_traceback(tmp_path):
    from tasks.outcome import record_failure

    cfg = compose_cfg(tmp_path)
    try:
        raise RuntimeError("boom")
    except RuntimeError as err:
        record_failure(cfg, err)
    info = read_failure(tmp_path)
    assert info["error"] == "RuntimeError" and info["message"] == "boom"
    assert 'raise RuntimeError("boom")' in info["traceback"]


@pytest.mark.parametrize(
    "errors, status",
    [([], None), ([UserError("bad")], 2), ([UserError("bad"), RuntimeError("x")], 1)],
)
def test_failed_jobs_set_the_exit_status(tmp_path, errors, status):
    from tasks.hydra_callbacks.failed_jobs import FailedJobs

    for job in range(3):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "config.yaml").write_text("seed: 1\n")
    for job, err in enumerate(errors):
        write_failure(tmp_path / str(job), err)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    if status is None:
        FailedJobs().on_multirun_end(config)
    else:
        with pytest.raises(SystemExit) as exit_info:
            FailedJobs().on_multirun_end(config)
        assert exit_info.value.code == status


def test_hydra_callbacks_import_no_heavy_library():
    imported, _ = imported_modules(
        "-c", "import tasks.hydra_callbacks.ensemble_report, tasks.hydra_callbacks.failed_jobs"
    )
    assert "hydra" in imported
    assert not imported & {"torch", "pytorch_lightning", "timm", "matplotlib", "numpy"}
