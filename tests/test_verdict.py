"""The report's verdict on synthetic runs: calibration, best member, intervals, paired gains,
soupability, and the comparison of settings, each against a direct reference computation."""

import json

import numpy as np
import pytest

from datamodules.errors import UserError
from lightning_modules import metrics as M
from lightning_modules.calibration import (
    apply_temperature,
    fit_temperature,
    temperature_for,
    write_calibration,
)
from lightning_modules.run_outputs import list_runs, load_predictions, save_predictions, write_json
from tasks.ensemble import ReportOptions, report_runs
from tests.test_ensemble_report import make_run

C, N = 5, 300
CLASSES = [str(i) for i in range(C)]


def _probs(logits, t=1.0):
    z = logits / t
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def _member(path, seed, *, sharpness, val_shift=0.0, overrides=(), n=N):
    """A run whose test and val predictions are over-confident (``sharpness`` x the logits of a
    model whose labels follow the softmax of the logits)."""
    rng = np.random.default_rng(seed)
    preds = {}
    for split in ("test", "val"):
        data = np.random.default_rng(1000 + (split == "val"))  # the same images for every member
        base = data.normal(size=(n, C)) * 2.0
        targets = np.array([data.choice(C, p=p) for p in _probs(base)])
        noisy = base + rng.normal(size=(n, C)) * 0.8 + (val_shift if split == "val" else 0.0)
        preds[split] = (_probs(noisy * sharpness), targets)
    probs, targets = preds["test"]
    make_run(
        path,
        overrides,
        seed=seed,
        probs=probs,
        targets=targets,
        classes=CLASSES,
        ids=[f"img/{i}" for i in range(n)],
    )
    save_predictions(
        path,
        "val",
        probs=preds["val"][0],
        targets=preds["val"][1],
        ids=[f"val/{i}" for i in range(n)],
        class_names=CLASSES,
    )
    return path


QUICK = ReportOptions(plots=False, soups=False, resamples=300)


def _report(tmp_path, options=QUICK):
    written = report_runs(list_runs(tmp_path), tmp_path / "ensemble", options=options, strict=True)
    return json.loads(written[0].with_name("report.json").read_text()), written[0]


def test_members_and_the_pooled_ensemble_are_calibrated_on_validation(tmp_path):
    for i in range(3):
        _member(tmp_path / str(i), seed=i + 1, sharpness=3.0)  # over-confident: T > 1
    report, md = _report(tmp_path)
    val = [load_predictions(tmp_path / str(i), "val") for i in range(3)]
    test = [load_predictions(tmp_path / str(i), "test") for i in range(3)]
    cal = report["calibration"]["test"]
    for i in range(3):  # each member's own temperature, fitted on its validation predictions
        t = fit_temperature(val[i]["probs"], val[i]["targets"])
        assert cal["members"][i]["temperature"] == pytest.approx(t, rel=1e-9)
        assert t > 1.5
        after = M.summarize(apply_temperature(test[i]["probs"], t), test[i]["targets"])
        assert cal["members"][i]["nll"] == pytest.approx(after["nll"])
        assert cal["members"][i]["acc"] == report["test"]["members"][i]["acc"]  # never changes
    pooled_val = np.mean([v["probs"].astype(np.float64) for v in val], axis=0)
    t = fit_temperature(pooled_val, val[0]["targets"])  # after pooling, not before
    assert cal["ensemble"]["temperature"] == pytest.approx(t, rel=1e-9)
    assert cal["ensemble"]["acc"] == report["test"]["ensemble"]["acc"]
    assert cal["ensemble"]["nll"] < report["test"]["ensemble"]["nll"]
    assert cal["ensemble_val_nll"]["calibrated"] <= cal["ensemble_val_nll"]["raw"]
    assert cal["better"] == "calibrated"
    text = md.read_text()
    assert "## Calibration" in text and "calibrated is better here" in text
    assert f"ensemble, calibrated (T={t:.3f})" in text


def test_intervals_and_paired_gains_match_a_direct_bootstrap(tmp_path):
    for i in range(3):
        _member(tmp_path / str(i), seed=i + 1, sharpness=1.0)
    report, md = _report(tmp_path)
    test = [load_predictions(tmp_path / str(i), "test") for i in range(3)]
    targets = test[0]["targets"]
    from lightning_modules.bootstrap import resample_counts

    counts = resample_counts(N, n_boot=300, seed=0)  # the report's resamples (seed 0)
    ens, gain = [], []
    for row in counts:  # a resample materialised, scored with the plain metrics
        idx = np.repeat(np.arange(N), row)
        members = [M.accuracy(t["probs"][idx], targets[idx]) for t in test]
        pooled = np.mean([t["probs"][idx].astype(np.float64) for t in test], axis=0)
        ens.append(M.accuracy(pooled, targets[idx]))
        gain.append(ens[-1] - np.mean(members))
    cell = report["intervals"]["test"]["ensemble"]["acc"]
    assert cell["value"] == pytest.approx(report["test"]["ensemble"]["acc"])
    assert [cell["lo"], cell["hi"]] == pytest.approx(np.quantile(ens, [0.025, 0.975]))
    g = report["gains"]["test"]["ensemble − mean member"]["acc"]
    assert g["value"] == pytest.approx(report["test"]["gain"]["acc"])
    assert [g["lo"], g["hi"]] == pytest.approx(np.quantile(gain, [0.025, 0.975]))
    assert g["distinguishable"] == (g["lo"] > 0 or g["hi"] < 0)
    # paired: narrower than the two intervals of what it subtracts
    mean = report["intervals"]["test"]["mean member"]["acc"]
    assert g["hi"] - g["lo"] < min(cell["hi"] - cell["lo"], mean["hi"] - mean["lo"])
    assert "## 95 % intervals" in md.read_text()


def _perfect_on_validation(run):
    """Rewrite a run's validation predictions: every image right, with confidence 0.92."""
    val = load_predictions(run, "val")
    perfect = np.eye(C, dtype=np.float32)[val["targets"]] * 0.9 + 0.02
    save_predictions(
        run,
        "val",
        probs=perfect,
        targets=val["targets"],
        ids=val["ids"].tolist(),
        class_names=CLASSES,
    )


def test_the_best_member_is_chosen_on_validation_not_on_test(tmp_path):
    _member(tmp_path / "0", seed=1, sharpness=1.0)
    _member(tmp_path / "1", seed=2, sharpness=1.0)
    _perfect_on_validation(tmp_path / "1")  # seed 2
    report, _ = _report(tmp_path)
    assert report["best_member"]["label"] == "seed 2"
    best = report["intervals"]["test"]["best member"]["acc"]["value"]
    assert best == report["test"]["members"][1]["acc"]


def test_members_from_different_initial_weights_are_not_souped(tmp_path):
    for i in range(2):
        _member(tmp_path / str(i), seed=i + 1, sharpness=1.0)
        write_json(tmp_path / str(i) / "contract.json", {"version": 1, "initial_weights": f"w{i}"})
    report, md = _report(tmp_path, ReportOptions(plots=False, resamples=200))  # soups on
    assert report["soups"]["soupable"] is False
    assert (
        report["soups"]["reason"]
        == "not soupable: different initial weights (trained from scratch?)"
    )
    assert "uniform soup" not in report["intervals"]["test"]
    assert "Soups: not soupable: different initial weights" in md.read_text()


def test_a_grid_is_compared_with_paired_differences(tmp_path):
    for job, (sharp, seed) in enumerate([(1.0, 1), (1.0, 2), (4.0, 1), (4.0, 2)]):
        _member(
            tmp_path / str(job),
            seed=seed,
            sharpness=sharp,
            overrides=[f"model.drop_rate={0.1 * sharp}"],
        )
    options = ReportOptions(plots=True, soups=False, resamples=300)
    report_runs(list_runs(tmp_path), tmp_path / "ensemble", options=options, strict=True)
    result = json.loads((tmp_path / "ensemble" / "compare.json").read_text())
    assert [r["setting"] for r in result["settings"]] == [
        "model.drop_rate=0.1",
        "model.drop_rate=0.4",
    ]
    ens = {r["setting"]: r["test"]["ensemble"]["nll"]["value"] for r in result["settings"]}
    diff = next(
        d for d in result["differences"] if d["model"] == "ensemble" and d["views"] == "single view"
    )
    nll = diff["difference"]["nll"]
    assert nll["value"] == pytest.approx(ens["model.drop_rate=0.4"] - ens["model.drop_rate=0.1"])
    assert nll["distinguishable"] and nll["lo"] > 0  # 4x sharper logits: clearly worse NLL
    text = (tmp_path / "ensemble" / "compare.md").read_text()
    assert "model.drop_rate=0.4 − model.drop_rate=0.1" in text and "✓" in text
    png = (tmp_path / "ensemble" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_task_needs_two_settings(tmp_path):
    from tasks.compare import compare_task
    from tests.conftest import compose_cfg

    for i in range(2):
        _member(tmp_path / "runs" / str(i), seed=i + 1, sharpness=1.0)
    with pytest.raises(UserError, match="compare.runs"):
        compare_task(compose_cfg(tmp_path / "a", ["task=compare"]))
    cfg = compose_cfg(tmp_path / "b", ["task=compare", f"compare.runs={tmp_path / 'runs'}"])
    with pytest.raises(UserError, match="holds 1 setting"):
        compare_task(cfg)


FIVE_CROP = {
    "mode": "five_crop",
    "crop_pct": 0.875,
    "scales": [1.0],
    "flip": False,
    "interpolation": "bilinear",
}


def test_a_stored_temperature_is_used_only_for_its_own_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights v1")
    with pytest.raises(UserError, match="no fitted temperature"):
        temperature_for([ckpt], tta=None)
    write_calibration(ckpt, {"test": {"temperature": 1.7}})
    assert temperature_for([ckpt], tta=None) == 1.7
    with pytest.raises(UserError, match="no temperature for TTA"):
        temperature_for([ckpt], tta=FIVE_CROP)
    write_calibration(
        ckpt, {"test": {"temperature": 1.7}, "test_tta": {"temperature": 1.2}}, tta=FIVE_CROP
    )
    assert temperature_for([ckpt], tta=FIVE_CROP) == 1.2
    with pytest.raises(UserError, match=r"other views: crop_pct=0.875 \(now 0.9\)"):
        temperature_for([ckpt], tta={**FIVE_CROP, "crop_pct": 0.9})
    ckpt.write_bytes(b"weights v2")  # retrained since the fit
    with pytest.raises(UserError, match="fitted for another version"):
        temperature_for([ckpt], tta=None)
    other = tmp_path / "b.ckpt"
    other.write_bytes(b"x")
    with pytest.raises(UserError, match="no ensemble report fitted a temperature"):
        temperature_for([ckpt, other], tta=None)


def test_the_report_goes_to_wandb_with_the_same_numbers(tmp_path, monkeypatch):
    import wandb

    from tasks.tracking import report_numbers, report_to_wandb

    for i in range(2):
        _member(tmp_path / str(i), seed=i + 1, sharpness=2.0)
    report, md = _report(tmp_path)
    flat = report_numbers(report)
    assert flat["test/ensemble/acc"] == report["test"]["ensemble"]["acc"]
    assert (
        flat["calibration/test/ensemble/temperature"]
        == (report["calibration"]["test"]["ensemble"]["temperature"])
    )
    gain = report["gains"]["test"]["ensemble − mean member"]["nll"]
    assert flat["gains/test/ensemble − mean member/nll/lo"] == gain["lo"]
    seen = {}

    class Run:
        summary = seen

        def log(self, data):
            seen["images"] = sorted(data)

        def finish(self):
            seen["finished"] = True

    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(init=kw) or Run())
    (md.parent / "reliability.png").write_bytes(b"")  # only its name matters here
    monkeypatch.setattr(wandb, "Image", lambda path: path)
    report_to_wandb(md.parent, report, wandb_config={"mode": "offline"}, group="sweep-7")
    assert seen["init"]["group"] == "sweep-7" and seen["init"]["job_type"] == "ensemble"
    assert seen["init"]["mode"] == "offline"
    assert {k: seen[k] for k in flat} == flat and seen["finished"]
    assert seen["images"] == ["reliability"]


def test_a_temperature_that_cannot_be_fitted_is_refused_not_applied(tmp_path):
    """Every validation image right: the NLL falls as T -> 0; that is no fit."""
    for i in range(2):
        _member(tmp_path / str(i), seed=i + 1, sharpness=1.0)
        _perfect_on_validation(tmp_path / str(i))
    report, md = _report(tmp_path)
    cal = report["calibration"]["test"]
    assert cal["ensemble"]["temperature"] is None and "T -> 0" in cal["ensemble"]["reason"]
    assert all(m["temperature"] is None for m in cal["members"])
    assert cal["ensemble"]["nll"] == report["test"]["ensemble"]["nll"]  # left as it was
    assert "ensemble, calibrated" not in report["intervals"]["test"]
    assert "| - | no temperature: the validation NLL keeps falling" in md.read_text()
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"w")
    from lightning_modules.calibration import calibration_summary

    v = load_predictions(tmp_path / "0", "val")
    t = load_predictions(tmp_path / "0", "test")
    summary = calibration_summary(v["probs"], v["targets"], t["probs"], t["targets"])
    write_calibration(ckpt, {"test": summary})
    with pytest.raises(UserError, match="0 of 300 validation images wrong"):
        temperature_for([ckpt], tta=None)
