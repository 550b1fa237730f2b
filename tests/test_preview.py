"""task=preview_augment: the PNG grid and what each of its columns shows."""

import numpy as np
import pytest
from PIL import Image


@pytest.mark.slow
def test_preview_grid_shows_originals_views_and_pca_only(cfg_factory, tmp_path, capsys):
    import tasks

    cfg = cfg_factory(
        "task=preview_augment",
        "preview.images=3",
        "preview.views=2",
        "preview.pca_views=2",
        "preview.pca_sigma=1.0",
        "seed=4",
    )
    metrics, objects = tasks.run_task(cfg)
    path = tmp_path / "augment_preview.png"
    assert metrics["preview"] == str(path)
    assert str(path) in capsys.readouterr().out  # the path is printed
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width > png.height > 200

    panels, dm = objects["panels"], objects["datamodule"]
    train = dm.datasets["train"]
    first = [int(np.flatnonzero(train.targets == c)[0]) for c in range(3)]  # one row per class
    tf = dm.eval_transform(normalize=False)
    clean = np.stack([tf(train.pool.load(int(train.indices[r]))).movedim(0, -1) for r in first])
    assert np.allclose(panels["original"], clean, atol=1e-6)

    views = panels["views"]
    assert views.shape == (3, 2, 32, 32, 3)
    assert not np.allclose(views[:, 0], views[:, 1])  # random views differ
    assert not np.allclose(views[:, 0], panels["original"])

    # PCA-only columns: a brightness shift (grey digits), the same on every unclamped pixel
    pca = panels["pca"]
    assert pca.shape == (3, 2, 32, 32, 3)
    shifts = []
    for i in range(3):
        for j in range(2):
            diff = pca[i, j] - panels["original"][i]
            free = (pca[i, j] > 0) & (pca[i, j] < 1)
            assert free.any()
            shift = np.median(diff[free])
            assert np.allclose(diff[free], shift, atol=1e-5)
            shifts.append(shift)
    # exaggerated: sigma=1 on the digits' brightness axis gives shifts of ~0.18 rms, not ~0.02
    assert np.sqrt(np.mean(np.square(shifts))) > 0.08
    # the same seed draws the same pictures
    _, again = tasks.run_task(cfg)
    assert np.array_equal(again["panels"]["views"], views)


def test_preview_default_shows_one_row_per_class(cfg_factory, monkeypatch):
    """The documented default: every class gets a row (digits: 10), in class order; a data set
    with more classes than the cap shows the first ``MAX_DEFAULT_ROWS`` of them."""
    import tasks
    import tasks.preview_augment as preview

    cfg = cfg_factory("task=preview_augment", "preview.views=1", "preview.pca_views=1")
    _, objects = tasks.run_task(cfg)
    train = objects["datamodule"].datasets["train"]
    assert objects["panels"]["original"].shape[0] == 10

    monkeypatch.setattr(preview, "MAX_DEFAULT_ROWS", 4)
    _, objects = tasks.run_task(cfg)
    assert objects["panels"]["original"].shape[0] == 4
    assert preview._one_row_per_class(train.targets, 4) == [
        int(np.flatnonzero(train.targets == c)[0]) for c in range(4)
    ]
