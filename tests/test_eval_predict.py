"""task=eval and task=predict: checkpoints rebuilt alone, ensembles of them, TTA, CSV output."""

import csv
import json

import numpy as np
import pytest
import torch

from datamodules.errors import UserError
from lightning_modules.run_outputs import load_predictions, read_metrics
from tests.conftest import compose_cfg

TINY = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
TINY += ["trainer.num_sanity_val_steps=0"]


@pytest.fixture(scope="module")
def members(seed_sweep):
    """The two finished runs of the tiny seed sweep, and the data module of their test set."""
    sweep_dir, proc = seed_sweep
    runs = [sweep_dir / "0", sweep_dir / "1"]
    assert all((r / "checkpoints" / "best.ckpt").is_file() for r in runs), proc.stderr[-3000:]
    from tasks.instantiate import instantiate

    dm = instantiate(compose_cfg(sweep_dir.parent / "dm").data, _convert_="all")
    dm.setup("test")
    return runs, dm


def _eval(tmp_path, *overrides):
    from tasks.evaluate import evaluate

    return evaluate(compose_cfg(tmp_path, ["task=eval", *TINY, *overrides]))


@pytest.mark.slow
def test_checkpoint_loads_weights_only_and_reproduces_its_run(members, tmp_path):
    runs, _ = members
    ckpt = torch.load(runs[0] / "checkpoints" / "best.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["class_names"] == [str(i) for i in range(10)]
    metrics, _ = _eval(tmp_path, f"ckpt_path={runs[0]}", "seed=5")
    trained = read_metrics(runs[0])
    for key in ("test/acc", "test/nll", "test/ece", "test_tta/acc", "test_tta/nll"):
        assert metrics[key] == pytest.approx(trained[key], abs=1e-5), key
    assert read_metrics(tmp_path)["seed"] == 5  # eval is seeded, and says with what
    for split in ("test", "test_tta"):
        mine, theirs = load_predictions(tmp_path, split), load_predictions(runs[0], split)
        assert mine["ids"].tolist() == theirs["ids"].tolist()
        assert np.allclose(mine["probs"], theirs["probs"], atol=1e-5)


@pytest.mark.slow
def test_several_checkpoints_are_tested_as_the_average_of_their_softmaxes(members, tmp_path):
    runs, _ = members
    metrics, _ = _eval(tmp_path, f"ckpt_path=[{runs[0]},{runs[1]}]", "tta=none")
    saved = [load_predictions(r, "test") for r in runs]
    average = (saved[0]["probs"].astype(np.float64) + saved[1]["probs"]) / 2
    mine = load_predictions(tmp_path, "test")
    assert np.allclose(mine["probs"], average, atol=1e-5)
    targets = mine["targets"]
    assert metrics["test/acc"] == pytest.approx((average.argmax(1) == targets).mean())
    nll = -np.log(average[np.arange(len(targets)), targets]).mean()
    assert metrics["test/nll"] == pytest.approx(nll, rel=1e-4)
    assert read_metrics(tmp_path)["checkpoints"] == [str(r / "checkpoints/best.ckpt") for r in runs]
    assert not (tmp_path / "predictions" / "test_tta.npz").exists()  # tta=none


@pytest.mark.slow
def test_eval_refuses_other_classes_and_missing_checkpoints(members, tmp_path):
    runs, _ = members
    with pytest.raises(UserError, match="predict classes .* but data has"):
        _eval(tmp_path / "a", f"ckpt_path={runs[0]}", "data.classes=[0,1,2]")
    with pytest.raises(UserError, match="ckpt_path '.*nothing.ckpt' does not exist"):
        _eval(tmp_path / "b", f"ckpt_path={tmp_path}/nothing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="Cannot load checkpoint"):
        _eval(tmp_path / "c", f"ckpt_path={tmp_path}/junk.ckpt")


def _write_test_images(members, folder, count):
    """The first ``count`` test images as lossless files in nested folders; returns their ids."""
    from PIL import Image

    _, dm = members
    dataset, ids = dm.datasets["test"], dm.ids("test")
    written = {}
    for row in range(count):
        image = dataset.pool.load(int(dataset.indices[row]))  # uint8 (3, H, W)
        sub = folder / f"class_{row % 3}" / ("deep" if row % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{row}.{'png' if row % 4 else 'bmp'}"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        written[str(path.resolve())] = ids[row]
    return written


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_predict_a_folder_matches_the_test_predictions(members, tmp_path, caplog):
    from tasks.predict import predict

    runs, _ = members
    images = _write_test_images(members, tmp_path / "images", 12)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG but not really")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    cfg = compose_cfg(
        tmp_path / "run",
        ["task=predict", f"predict.input={tmp_path}/images", f"ckpt_path={runs[0]}", "tta=none"],
    )
    metrics, _ = predict(cfg)
    rows = _read_csv(tmp_path / "run" / "predictions.csv")
    assert metrics["images"] == len(rows) == 12 and metrics["unreadable"] == 1
    assert "broken.png" in caplog.text
    assert list(rows[0])[:3] == ["path", "predicted", "confidence"]
    assert list(rows[0])[3:] == [f"prob_{i}" for i in range(10)]
    saved = load_predictions(runs[0], "test")
    by_id = dict(zip(saved["ids"].tolist(), saved["probs"], strict=True))
    for row in rows:
        probs = np.array([float(row[f"prob_{i}"]) for i in range(10)])
        assert np.allclose(probs, by_id[images[row["path"]]], atol=1e-5)
        assert row["predicted"] == str(probs.argmax())
        assert float(row["confidence"]) == pytest.approx(probs.max(), abs=1e-6)


@pytest.mark.slow
def test_predict_with_an_ensemble_and_tta_matches_eval(members, tmp_path):
    from tasks.predict import predict

    runs, _ = members
    images = _write_test_images(members, tmp_path / "images", 8)
    ensemble = f"ckpt_path=[{runs[0]},{runs[1]}]"
    # the first 32 test images are enough: the 8 written above are among them
    _eval(tmp_path / "eval", ensemble, "data.eval_batch_size=32", "trainer.limit_test_batches=1")
    output = tmp_path / "out" / "p.csv"
    cfg = compose_cfg(
        tmp_path / "run",
        ["task=predict", f"predict.input={tmp_path}/images", ensemble, f"predict.output={output}"],
    )
    predict(cfg)
    evaluated = load_predictions(tmp_path / "eval", "test_tta")
    by_id = dict(zip(evaluated["ids"].tolist(), evaluated["probs"], strict=True))
    rows = _read_csv(output)
    assert len(rows) == 8
    for row in rows:
        probs = np.array([float(row[f"prob_{i}"]) for i in range(10)])
        assert np.allclose(probs, by_id[images[row["path"]]], atol=1e-5)


@pytest.mark.slow
def test_predict_without_images_is_a_user_error(members, tmp_path):
    from tasks.predict import predict

    runs, _ = members
    (tmp_path / "empty").mkdir()
    cfg = compose_cfg(tmp_path, ["task=predict", f"predict.input={tmp_path}/empty"])
    with pytest.raises(UserError, match="No images in"):
        predict(cfg)
    cfg = compose_cfg(tmp_path, ["task=predict", f"predict.input={tmp_path}/missing"])
    with pytest.raises(UserError, match="is not a folder"):
        predict(cfg)
    json.dumps([str(r) for r in runs])  # the fixture's runs stay usable by other tests
