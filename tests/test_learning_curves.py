"""Learning curves: per-epoch arrays from Lightning's CSV log, and the PNG drawn from them."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_modules.figures import learning_curves as LC

# As CSVLogger writes it: lr-monitor rows without an epoch, an epoch's val and train metrics on
# separate rows, the test row last at epoch == max_epochs. Epoch 1 has no val row; epoch 2's
# train row comes first and its val/acc is logged twice (the last wins).
HEADER = (
    "epoch,lr-AdamW/decay,step,test/acc,test/loss,train/acc,train/loss,val/acc,val/acc_best,"
    "val/loss\n"
)
ROWS = [
    ",0.002,9,,,,,,,",
    "0,,19,,,,,0.25,0.25,2.5",
    "0,,19,,,0.2,3.0,,,",
    ",0.0017,29,,,,,,,",
    "1,,39,,,0.5,1.5,,,",
    "2,,59,,,0.75,0.8,,,",
    "2,,59,,,,,0.5,0.5,1.25",
    "2,,59,,,,,0.625,0.625,",
    "3,,60,0.9,0.4,,,,,",
]


def write_csv(run_dir, rows=ROWS, header=HEADER):
    path = run_dir / "csv" / "metrics.csv"
    path.parent.mkdir(parents=True)
    path.write_text(header + "".join(f"{r}\n" for r in rows))
    return run_dir


def test_read_curves_merges_rows_per_epoch(tmp_path):
    curves = LC.read_curves(write_csv(tmp_path))
    assert set(curves) == {"epoch", "train/loss", "train/acc", "val/loss", "val/acc"}
    np.testing.assert_array_equal(curves["epoch"], [0, 1, 2])  # the test row's epoch 3 is not
    assert curves["epoch"].dtype.kind == "i"
    np.testing.assert_array_equal(curves["train/loss"], [3.0, 1.5, 0.8])
    np.testing.assert_array_equal(curves["train/acc"], [0.2, 0.5, 0.75])
    np.testing.assert_array_equal(curves["val/loss"], [2.5, np.nan, 1.25])
    np.testing.assert_array_equal(curves["val/acc"], [0.25, np.nan, 0.625])


def test_read_curves_sorts_epochs_and_reads_epoch_suffixed_names(tmp_path):
    header = "epoch,step,train/loss_epoch,train/loss_step,val/loss\n"
    rows = ["1,20,0.5,0.4,", "0,10,1.0,0.9,", "0,10,,,2.0", "1,20,,,1.0"]
    curves = LC.read_curves(write_csv(tmp_path, rows, header))
    np.testing.assert_array_equal(curves["epoch"], [0, 1])
    np.testing.assert_array_equal(curves["train/loss"], [1.0, 0.5])
    np.testing.assert_array_equal(curves["val/loss"], [2.0, 1.0])
    assert np.isnan(curves["val/acc"]).all() and curves["val/acc"].shape == (2,)


def test_a_test_row_never_enters_the_curves(tmp_path):
    # a test run at the last epoch, whose row also carries a curve-named value
    rows = [*ROWS[:-1], "2,,60,0.9,0.4,,,0.99,,0.1"]
    curves = LC.read_curves(write_csv(tmp_path, rows))
    np.testing.assert_array_equal(curves["val/acc"], [0.25, np.nan, 0.625])
    np.testing.assert_array_equal(curves["val/loss"], [2.5, np.nan, 1.25])


def test_read_curves_none_without_a_file_or_epoch_rows(tmp_path):
    assert LC.read_curves(tmp_path / "missing") is None
    only_lr_and_test = [",0.002,9,,,,,,,", "0,,60,0.9,0.4,,,,,"]
    assert LC.read_curves(write_csv(tmp_path, only_lr_and_test)) is None


def _curves(tmp_path):
    one = LC.read_curves(write_csv(tmp_path / "a"))
    two = {k: v.copy() for k, v in one.items()}
    two["val/acc"] = two["val/acc"] + 0.1
    return {"seed 1": one, "seed 2": two}


def test_the_figure_draws_each_member_and_the_unfreeze_lines(tmp_path):
    fig = LC.draw_learning_curves(_curves(tmp_path), unfreeze_epochs=[2, None, 1, 2, 0])
    loss, acc = fig.axes
    assert loss.get_xlabel() == acc.get_xlabel() == "epoch"
    for ax in (loss, acc):
        dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
        assert sorted(line.get_xdata()[0] for line in dotted) == [1, 2]  # distinct, no None/0
        solid = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(solid) == len(dashed) == 2  # train and val per member
        for train, val in zip(solid, dashed, strict=True):
            assert train.get_color() == val.get_color()
        assert solid[0].get_color() != solid[1].get_color()
    # val loss of epoch 1 is missing: the line joins epochs 0 and 2, not cut by a NaN
    np.testing.assert_array_equal(dashed[0].get_xdata(), [0, 2])
    labels = [t.get_text() for t in loss.get_legend().get_texts()]
    assert labels.count("unfreeze") == 1
    assert {"seed 1", "seed 2", "train", "val"} <= set(labels)


def test_no_unfreeze_line_without_a_later_unfreeze(tmp_path):
    fig = LC.draw_learning_curves(_curves(tmp_path), unfreeze_epochs=[None, 0])
    assert not [line for line in fig.axes[0].get_lines() if line.get_linestyle() == ":"]
    assert "unfreeze" not in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_learning_curves_figure_writes_a_png(tmp_path):
    from matplotlib.image import imread

    path = tmp_path / "figures" / "learning_curves.png"
    out = LC.learning_curves_figure(path, _curves(tmp_path), unfreeze_epochs=[1], title="t")
    assert out == path and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    width, height = LC.FIGSIZE
    assert image.shape[:2] == (round(height * LC.DPI), round(width * LC.DPI))
    assert image[..., :3].std() > 0.05  # something was drawn on the white
    assert [p.name for p in path.parent.iterdir()] == ["learning_curves.png"]  # no .tmp left


def test_no_members_is_an_error():
    with pytest.raises(ValueError, match="no member"):
        LC.draw_learning_curves({})
