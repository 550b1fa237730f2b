"""task=visualize and the end-of-run pictures: the right images, the right numbers, logged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.errors import UserError
from lightning_modules.figures.pictures import PICTURES, log_pictures, pick_images
from lightning_modules.run_outputs import load_predictions, read_metrics
from tests.conftest import compose_cfg

# fewer, smaller pictures: drawing dominates these tests' time
SMALL = ["visualize.num_images=3", "visualize.channels=3", "visualize.max_filters=16"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short digits run with the pictures callback and TensorBoard."""
    from tasks.train import train

    out = tmp_path_factory.mktemp("trained")
    cfg = compose_cfg(
        out,
        [
            "trainer.limit_train_batches=6",
            "augment=none",
            "model.optimizer.lr=0.01",
            "logger=tensorboard",
            "callbacks=[default,visualize]",
            *SMALL,
        ],
    )
    train(cfg)
    return out


def _image(path) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(str(path))


@pytest.mark.slow
def test_end_of_run_pictures_are_drawn_and_logged(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in PICTURES:
        pixels = _image(trained_run / f"{name}.png")
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 300, name
        assert pixels[..., :3].std() > 0.05, name  # not a blank canvas
    events = EventAccumulator(str(trained_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = set(events.Tags()["images"])
    assert {f"pictures/{n}" for n in PICTURES} <= tags
    logged = events.Images("pictures/confusion_matrix")[-1]
    assert (logged.height, logged.width) == _image(trained_run / "confusion_matrix.png").shape[:2]


@pytest.mark.slow
def test_visualize_task_scores_the_checkpoint_like_the_test(trained_run, tmp_path):
    from tasks import run_task

    cfg = compose_cfg(tmp_path, ["task=visualize", f"ckpt_path={trained_run}", *SMALL])
    metrics, objects = run_task(cfg)
    trained = read_metrics(trained_run)
    # the best checkpoint on the same test images: the accuracy of the training run's test
    assert metrics["acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
    predictions = load_predictions(trained_run)
    assert metrics["images"] == len(predictions["targets"])
    predicted = predictions["probs"].argmax(1)
    for c, name in enumerate(predictions["class_names"]):
        mine = predictions["targets"] == c
        assert metrics[f"acc/{name}"] == pytest.approx((predicted[mine] == c).mean(), abs=1e-6)
    assert read_metrics(tmp_path)["acc"] == metrics["acc"]
    assert {p.name for p in objects["paths"].values()} == {f"{n}.png" for n in PICTURES}


@pytest.mark.slow
def test_visualize_a_folder_of_images(trained_run, tmp_path):
    from PIL import Image

    from datamodules.sources.digits import DigitsSource
    from tasks import run_task

    data = DigitsSource().load().train
    folder = tmp_path / "images"
    picked = {"3": [3, 13], "7": [7, 17], "": [0, 1]}  # two labelled classes, two unlabelled
    for cls, rows in picked.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for r in rows:
            assert str(int(data.targets[r])) == cls or cls == ""
            pixels = data.load(r).permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(folder / cls / f"{r}.png")
    cfg = compose_cfg(
        tmp_path / "run",
        ["task=visualize", f"ckpt_path={trained_run}", f"visualize.images={folder}", *SMALL],
    )
    metrics, objects = run_task(cfg)
    assert metrics["images"] == 4  # the labelled files only
    assert set(k for k in metrics if k.startswith("acc/")) <= {"acc/3", "acc/7"}
    assert "confusion_matrix" in objects["paths"]
    # only unlabelled images: explained for the predicted class, no confusion matrix
    cfg = compose_cfg(
        tmp_path / "flat",
        [
            "task=visualize",
            f"ckpt_path={trained_run}",
            f"visualize.images={folder / '3'}",
            *SMALL,
        ],
    )
    metrics, objects = run_task(cfg)
    assert "acc" not in metrics and "confusion_matrix" not in objects["paths"]
    assert (tmp_path / "flat" / "gradcam.png").is_file()


@pytest.mark.slow
def test_visualize_refuses_what_does_not_fit(trained_run, tmp_path):
    from tasks import run_task

    with pytest.raises(UserError, match="predicts classes"):
        run_task(
            compose_cfg(
                tmp_path, ["task=visualize", f"ckpt_path={trained_run}", "data.classes=[0,1]"]
            )
        )
    with pytest.raises(UserError, match="does not exist"):
        run_task(compose_cfg(tmp_path, ["task=visualize", f"ckpt_path={tmp_path}/none.ckpt"]))
    with pytest.raises(UserError, match="needs a checkpoint"):
        run_task(compose_cfg(tmp_path, ["task=visualize"]))
    with pytest.raises(UserError, match="multi-task models"):
        run_task(
            compose_cfg(
                tmp_path, ["task=visualize", f"ckpt_path={trained_run}", "visualize.task=age"]
            )
        )


def test_mistakes_come_first_then_one_image_per_class():
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 1])
    predicted = torch.tensor([0, 1, 1, 0, 2, 2, 2])  # mistakes at 1, 3, 6
    picked = pick_images(targets, predicted, 4)
    assert picked[:2] == [1, 3]  # half mistakes, one per true class in turn (0, then 1)
    assert picked[2:] == [0, 2]  # then correct ones, class by class
    assert pick_images(None, predicted, 3) == [0, 1, 2]  # unlabelled: the first ones
    partly = torch.tensor([-1, 0, -1, 1])  # two labelled, both right: then the unlabelled
    assert pick_images(partly, torch.tensor([0, 0, 0, 1]), 3) == [1, 3, 0]


def test_pictures_go_to_loggers_that_take_images(tmp_path):
    class WandbLike:
        def __init__(self):
            self.calls = []

        def log_image(self, key, images, step=None):
            self.calls.append((key, images, step))

    class NoImages:
        experiment = object()

    path = tmp_path / "gradcam.png"
    path.write_bytes(b"png")
    logger = WandbLike()
    log_pictures([logger, NoImages()], {"gradcam": path}, step=7)
    assert logger.calls == [("pictures/gradcam", [str(path)], 7)]


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    from sklearn.metrics import confusion_matrix as sk_confusion

    from lightning_modules.figures.model_figures import confusion_matrix

    rng = np.random.default_rng(0)
    targets, predicted = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    np.testing.assert_array_equal(
        confusion_matrix(targets, predicted, 5), sk_confusion(targets, predicted, labels=range(5))
    )


def test_multi_task_heads_are_explained_one_task_at_a_time(tmp_path):
    from lightning_modules.figures.pictures import ImageSet, draw_pictures, head_of
    from lightning_modules.multitask import MultiTaskModel

    torch.manual_seed(0)
    tasks = {
        "age": {"type": "regression", "mean": 40.0, "std": 10.0},
        "smoker": {"type": "binary", "class_names": ["no", "yes"]},
    }
    model = MultiTaskModel(backbone="test_resnet", tasks=tasks).eval()
    x = torch.randn(3, 3, 32, 32)
    # binary: the pair (-z/2, z/2) has the softmax (1 - sigmoid(z), sigmoid(z))
    smoker = head_of(model)  # the first non-regression task
    assert smoker.name == "smoker" and smoker.class_names == ["no", "yes"]
    with torch.no_grad():
        z = model(x)["smoker"]
        probs = smoker.select(model.net(x)).softmax(1)
    assert torch.allclose(probs[:, 1], torch.sigmoid(z), atol=1e-6)
    # regression: one map per image for the predicted value, no confusion matrix
    age = head_of(model, "age")
    images = ImageSet(x.__getitem__, ["a", "b", "c"], None, torch.tensor([30.0, float("nan"), 50]))
    common = {"mean": (0.5,) * 3, "std": (0.25,) * 3, "title": "t", "num_images": 2, "channels": 2}
    paths, metrics = draw_pictures(model.net, age, images, tmp_path / "age", **common)
    assert set(paths) == {"gradcam", "first_conv_filters", "activations"} and metrics == {}
    labels = torch.tensor([1, 0, -1])  # the third image has no label
    images = ImageSet(x.__getitem__, ["a", "b", "c"], labels)
    paths, metrics = draw_pictures(model.net, smoker, images, tmp_path / "smoker", **common)
    assert metrics["images"] == 2 and "confusion_matrix" in paths
    with pytest.raises(UserError, match="not a task"):
        head_of(model, "height")


@pytest.mark.slow
def test_unreadable_files_among_the_images_are_skipped_and_named(trained_run, tmp_path, caplog):
    from PIL import Image

    from datamodules.sources import DigitsSource
    from tasks import run_task

    data = DigitsSource().load().train
    folder = tmp_path / "images" / "3"
    folder.mkdir(parents=True)
    Image.fromarray(data.load(3).permute(1, 2, 0).numpy()).save(folder / "good.png")
    whole = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 3])  # loads, grey where cut
    (folder / "empty.png").write_bytes(b"")
    cfg = compose_cfg(
        tmp_path / "run",
        ["task=visualize", f"ckpt_path={trained_run}", f"visualize.images={folder.parent}", *SMALL],
    )
    with caplog.at_level("WARNING"):
        metrics, _ = run_task(cfg)
    assert "Skipped 1 unreadable file(s)" in caplog.text and "3/empty.png" in caplog.text
    assert metrics["images"] == 2  # good and truncated, both labelled 3
