"""Learning curves (loss and accuracy per epoch) of one or more runs, from their CSV logs.

:func:`read_curves` reads ``<run dir>/csv/metrics.csv``, written by Lightning's ``CSVLogger``
(``conf/logger/csv.yaml``): one row per ``log_metrics`` call, so an epoch's train and val
metrics sit on separate rows with empty cells, between learning-rate rows (no ``epoch``) and
before the test row. :func:`learning_curves_figure` draws the runs together into one PNG.

Drawn on a bare ``matplotlib.figure.Figure`` with an Agg canvas: no pyplot, no GUI backend,
nothing global.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

METRICS_CSV = Path("csv") / "metrics.csv"  # relative to the run directory
CURVE_KEYS = ("train/loss", "train/acc", "val/loss", "val/acc")
DPI = 110
FIGSIZE = (10.0, 4.0)  # inches: 1100 x 440 pixels at DPI


def _number(cell: str | None) -> float | None:
    """The cell's value; None when empty or not a number."""
    if cell is None or not cell.strip():
        return None
    try:
        return float(cell)
    except ValueError:
        return None


def _row_values(row: dict[str, str]) -> dict[str, float]:
    """The curve metrics on one row (``key`` or, logged on step and epoch, ``key_epoch``)."""
    values = {}
    for key in CURVE_KEYS:
        value = _number(row.get(key))
        if value is None:
            value = _number(row.get(f"{key}_epoch"))
        if value is not None:
            values[key] = value
    return values


def read_curves(run_dir: str | Path) -> dict[str, np.ndarray] | None:
    """Per-epoch arrays ``epoch`` (int, sorted, unique) and :data:`CURVE_KEYS` (float, NaN
    where an epoch lacks the metric), merged from ``run_dir/csv/metrics.csv``.

    Rows without an ``epoch`` (learning-rate monitor) and rows with any ``test/`` value (the
    test run, logged at ``epoch == max_epochs``) are skipped, and an epoch counts only when it
    has a curve metric. Lightning logs nothing while sanity checking; should a value be logged
    twice for one epoch (e.g. a leftover sanity-check row), the last row wins.
    None when the file is absent or holds no epoch with a curve metric.
    """
    path = Path(run_dir) / METRICS_CSV
    if not path.is_file():
        return None
    merged: dict[int, dict[str, float]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            epoch = _number(row.get("epoch"))
            if epoch is None or not math.isfinite(epoch):
                continue
            if any(k and k.startswith("test/") and _number(v) is not None for k, v in row.items()):
                continue
            values = _row_values(row)
            if values:
                merged.setdefault(int(epoch), {}).update(values)
    if not merged:
        return None
    epochs = sorted(merged)
    curves = {"epoch": np.asarray(epochs, dtype=np.int64)}
    for key in CURVE_KEYS:
        curves[key] = np.asarray([merged[e].get(key, np.nan) for e in epochs], dtype=np.float64)
    return curves


def _unfreeze_lines(unfreeze_epochs: Sequence[int | None] | None) -> list[int]:
    """The distinct epochs worth a line: not None, not 0 (trainable from the start)."""
    return sorted({int(e) for e in unfreeze_epochs or () if e is not None and e != 0})


def _plot_series(ax, x: np.ndarray, y: np.ndarray, **style) -> None:
    """Only the finite points: an epoch missing a metric does not cut the line."""
    finite = np.isfinite(y)
    marker = "." if finite.sum() <= 30 else None  # few epochs: show where the points are
    ax.plot(x[finite], y[finite], marker=marker, markersize=4, **style)


def draw_learning_curves(
    curves: dict[str, dict[str, np.ndarray]],
    *,
    unfreeze_epochs: Sequence[int | None] | None = None,
    title: str | None = None,
):
    """The figure of :func:`learning_curves_figure`, not saved (a ``matplotlib.figure.Figure``).

    Left panel loss, right panel accuracy; per member (``curves``' keys label them) the train
    curve solid and the val curve dashed, in the member's colour. A grey dotted line at each
    distinct unfreeze epoch ``e`` (None and 0 skipped): the point at ``e`` is the first trained
    with that layer group unfrozen.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    if not curves:
        raise ValueError("learning curves: no member to draw")
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    lines = _unfreeze_lines(unfreeze_epochs)
    for ax, metric in zip(axes, ("loss", "acc"), strict=True):
        for i, (name, member) in enumerate(curves.items()):
            colour = f"C{i % 10}"
            x = np.asarray(member["epoch"])
            for split, style in (("train", "-"), ("val", "--")):
                y = np.asarray(member.get(f"{split}/{metric}", np.full(len(x), np.nan)), float)
                label = name if split == "train" else f"_{name} val"  # one entry per member
                _plot_series(ax, x, y, color=colour, linestyle=style, linewidth=1.4, label=label)
        for j, epoch in enumerate(lines):
            label = "unfreeze" if j == 0 else "_unfreeze"
            ax.axvline(epoch, color="0.5", linestyle=":", linewidth=1.2, label=label)
        ax.set(xlabel="epoch", ylabel="loss" if metric == "loss" else "accuracy")
        ax.set_title("Loss" if metric == "loss" else "Accuracy")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    styles = [Line2D([], [], color="0.3", linestyle=s) for s in ("-", "--")]
    axes[0].legend([*handles, *styles], [*labels, "train", "val"], fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def learning_curves_figure(
    path: str | Path,
    curves: dict[str, dict[str, np.ndarray]],
    *,
    unfreeze_epochs: Sequence[int | None] | None = None,
    title: str | None = None,
) -> Path:
    """Write :func:`draw_learning_curves` to ``path`` (PNG, ``FIGSIZE`` at ``DPI``) atomically:
    saved as ``path.tmp`` then renamed, so a crash never leaves a half-written image.

    ``curves``: ``{label: read_curves(run_dir)}``, e.g. ``{"seed 1": ..., "seed 2": ...}``.
    """
    path = Path(path)
    fig = draw_learning_curves(curves, unfreeze_epochs=unfreeze_epochs, title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
