"""Figures of what a network learned, drawn with matplotlib (Agg backend) into PNG files.

Pure drawing: arrays in, a PNG out. The numbers come from ``lightning_modules.gradcam`` and
``lightning_modules.feature_maps``; ``lightning_modules.figures.pictures`` puts it
together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DPI = 110
CAM_CMAP = "jet"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def _short(name: str, n: int = 18) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


@dataclass
class CamRow:
    """One image of the Grad-CAM figure.

    Attributes:
        image: ``(H, W, 3)`` RGB in ``[0, 1]``.
        predicted: predicted class name, and ``probability`` its probability.
        cam_predicted: ``(H, W)`` heatmap in ``[0, 1]`` for the predicted class.
        true: true class name (None: unlabelled), ``cam_true`` its heatmap.
        label: the image's id (shown small under the image).
    """

    image: np.ndarray
    predicted: str
    probability: float
    cam_predicted: np.ndarray
    true: str | None = None
    cam_true: np.ndarray | None = None
    label: str = ""


def plot_gradcam(
    path: Path,
    rows: Sequence[CamRow],
    *,
    title: str,
    alpha: float = 0.5,
    regression: bool = False,
) -> Path:
    """Image | heatmap of the predicted class | heatmap of the true class, one row per image.

    ``regression``: one heatmap per image, for the predicted value (the true value in the titles).
    """
    plt = _plt()
    n = len(rows)
    height = 2.45 * n + 1.0
    fig, grid = plt.subplots(
        n,
        4,
        figsize=(8.4, height),
        squeeze=False,
        gridspec_kw={"width_ratios": [1, 1, 1, 0.06], "wspace": 0.08, "hspace": 0.35},
    )
    axes = grid[:, :3]
    for ax in grid[:, 3]:
        ax.axis("off")
    fig.subplots_adjust(left=0.02, right=0.9, bottom=0.2 / height, top=1 - 1.0 / height)
    for r, row in enumerate(rows):
        _cam_row(axes[r], row, alpha=alpha, regression=regression)
    _cam_legend(fig, grid, title=title, height=height, regression=regression)
    return _save(fig, path)


def _cam_row(axes, row: CamRow, *, alpha: float, regression: bool) -> None:
    """One row of the Grad-CAM figure: the image, its predicted class's and true class's maps."""
    ax_img, ax_pred, ax_true = axes
    ax_img.imshow(row.image, interpolation="nearest")
    ax_img.set_title(
        f"true: {_short(row.true)}" if row.true is not None else "no label", fontsize=9
    )
    if row.label:
        ax_img.set_xlabel(_short(row.label, 30), fontsize=7)
    correct = row.true is not None and row.true == row.predicted
    colour = "black" if row.true is None or regression else ("green" if correct else "red")
    prob = "" if np.isnan(row.probability) else f" (p={row.probability:.2f})"
    panels = (
        (ax_pred, row.cam_predicted, f"predicted: {_short(row.predicted)}{prob}", colour),
        (ax_true, row.cam_true, f"true: {_short(row.true or '')}", "black"),
    )
    for ax, cam, text, text_colour in panels:
        if cam is None:
            note = "regression: one map,\nfor the predicted value" if regression else None
            ax.text(0.5, 0.5, note or "no true label", ha="center", va="center", fontsize=8)
        else:
            ax.imshow(row.image, interpolation="nearest")
            ax.imshow(cam, cmap=CAM_CMAP, alpha=alpha, vmin=0, vmax=1, interpolation="bilinear")
            ax.set_title(text, fontsize=9, color=text_colour)
    for ax in (ax_img, ax_pred, ax_true):
        ax.set_xticks([])
        ax.set_yticks([])
        if ax is not ax_img and (row.cam_true is None and ax is ax_true):
            ax.axis("off")


def _cam_legend(fig, grid, *, title: str, height: float, regression: bool) -> None:
    """The Grad-CAM figure's title with what the columns show, and its colour bar."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    legend = (
        "middle: evidence for a higher predicted value"
        if regression
        else "middle: evidence for the predicted class (green: right, red: wrong); "
        "right: for the true class"
    )
    fig.suptitle(
        f"{title}\n{legend}",
        fontsize=9,
        y=1 - 0.12 / height,
        va="top",
    )
    middle = grid[len(grid) // 2, 3].get_position()
    cax = fig.add_axes((middle.x0, 0.3, 0.015, 0.4))
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap=CAM_CMAP), cax=cax)
    what = "a higher value" if regression else "the class"
    bar.set_label(f"evidence for {what} (1 = strongest in the image)", fontsize=8)


def plot_filters(path: Path, weight: np.ndarray, *, title: str, max_filters: int = 64) -> Path:
    """The first convolution's filters as a grid of small images.

    RGB filters (3 input channels) are shown in colour, others as the mean over input channels in
    grey. Each filter is scaled by its own largest absolute weight: mid-grey is 0.
    """
    plt = _plt()
    weight = np.asarray(weight, dtype=np.float32)[:max_filters]
    n, c = weight.shape[:2]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    size = max(0.55, min(1.1, 9 / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size + 0.9), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        w = weight[i]
        scale = float(np.abs(w).max()) or 1.0
        if c == 3:
            ax.imshow(np.transpose(0.5 + 0.5 * w / scale, (1, 2, 0)), interpolation="nearest")
        else:
            ax.imshow(w.mean(0) / scale, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(str(i), fontsize=6, pad=1)
    kind = "RGB" if c == 3 else f"mean of {c} input channels"
    fig.suptitle(
        f"{title}\n{kind}; each filter scaled to its largest |weight|, grey = 0", fontsize=9
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_activations(
    path: Path,
    image: np.ndarray,
    stages: Sequence[tuple[str, np.ndarray]],
    *,
    title: str,
    channels: int = 6,
) -> Path:
    """For one image: the most active channels of every stage (one row per stage).

    Each row shows the ``channels`` channels with the highest mean activation for this image,
    on a colour scale shared within the row (its colour bar on the right).
    """
    plt = _plt()
    n = len(stages)
    height = 1.45 * (n + 1) + 0.8
    fig, grid = plt.subplots(
        n + 1,
        channels + 1,
        figsize=(1.35 * channels + 1.5, height),
        squeeze=False,
        gridspec_kw={"width_ratios": [1] * channels + [0.08], "wspace": 0.12, "hspace": 0.35},
    )
    fig.subplots_adjust(left=0.1, right=0.93, bottom=0.15 / height, top=1 - 0.8 / height)
    axes, bars = grid[:, :channels], grid[:, channels]
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in [*axes[0], bars[0]]:
        ax.axis("off")
    axes[0, 0].imshow(image, interpolation="nearest")
    axes[0, 0].set_title("input", fontsize=8)
    for r, (name, maps) in enumerate(stages, start=1):
        maps = np.asarray(maps, dtype=np.float32)
        order = np.argsort(-maps.mean(axis=(1, 2)), kind="stable")[:channels]
        shown = maps[order]
        vmin, vmax = float(shown.min()), float(shown.max())
        im = None
        for j, ax in enumerate(axes[r]):
            if j >= len(order):
                ax.axis("off")
                continue
            im = ax.imshow(shown[j], cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(f"ch {order[j]}", fontsize=7, pad=2)
        axes[r, 0].set_ylabel(
            f"{name}\n{maps.shape[0]}×{maps.shape[1]}×{maps.shape[2]}", fontsize=7
        )
        if im is not None:
            bar = fig.colorbar(im, cax=bars[r])
            bar.ax.tick_params(labelsize=6)
        else:
            bars[r].axis("off")
    fig.suptitle(
        f"{title}\nper stage (rows): the {channels} channels with the highest mean activation",
        fontsize=9,
    )
    return _save(fig, path)


def plot_confusion(
    path: Path, matrix: np.ndarray, class_names: Sequence[str], *, title: str
) -> Path:
    """Confusion matrix (counts; colour = share of the true class) and per-class accuracy."""
    plt = _plt()
    matrix = np.asarray(matrix, dtype=np.int64)
    n = len(class_names)
    totals = matrix.sum(axis=1)
    share = matrix / np.maximum(totals, 1)[:, None]
    per_class = np.diag(share)
    accuracy = float(np.trace(matrix) / max(1, matrix.sum()))
    side = min(14.0, max(4.5, 0.42 * n + 2.5))
    fig, (ax, ax_bar) = plt.subplots(
        1, 2, figsize=(side + 3.2, side), gridspec_kw={"width_ratios": [side, 2.6]}
    )
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    show_ticks = n <= 50
    if show_ticks:
        names = [_short(c, 14) for c in class_names]
        slanted = n > 6 and max(len(c) for c in names) > 2
        ax.set_xticks(
            range(n),
            names,
            rotation=60 if slanted else 0,
            ha="right" if slanted else "center",
            fontsize=8,
        )
        ax.set_yticks(range(n), names, fontsize=8)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(
                        j,
                        i,
                        str(matrix[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}\naccuracy {accuracy:.1%} on {int(matrix.sum())} images", fontsize=10)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class's images", fontsize=8)
    y = np.arange(n)
    ax_bar.barh(y, per_class, color="#9ecae1", edgecolor="#3182bd")
    ax_bar.axvline(accuracy, color="grey", ls="--", lw=1)
    ax_bar.set_xlim(0, 1.0)
    ax_bar.set_ylim(n - 0.5, -0.5)
    ax_bar.set_yticks(y, [_short(c, 14) for c in class_names] if show_ticks else [], fontsize=8)
    if n <= 30:
        for i, (value, total) in enumerate(zip(per_class, totals, strict=True)):
            text = f"{value:.0%} of {total}" if total else "no images"
            ax_bar.text(0.03, i, text, va="center", fontsize=7, color="black")
    ax_bar.set_xlabel(f"accuracy per class\n(dashed: overall, {accuracy:.1%})")
    fig.tight_layout()
    return _save(fig, path)


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """``(C, C)`` counts: row = true class, column = predicted class."""
    targets = np.asarray(targets, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    flat = np.bincount(targets * n_classes + predictions, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)
