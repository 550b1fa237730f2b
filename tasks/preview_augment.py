"""``python run.py task=preview_augment``: a PNG grid of training images and their augmented views.

One row per training image (one per class). Columns: the image as the network sees it at
evaluation, several views through the full training pipeline of the chosen ``augment`` preset, and
views with PCA colour jitter alone at an exaggerated ``preview.pca_sigma`` so its effect is visible.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

COLORS = {"original": "black", "view": "tab:blue", "pca": "tab:orange"}


def preview_augment(cfg) -> tuple[dict, dict]:
    """Write ``<run dir>/<preview.file>`` and print its path.

    Returns:
        ``({"preview": path}, objects)``; ``objects["panels"]`` holds the pictures as arrays
        (``original``: N x H x W x 3, ``views``: N x K x H x W x 3, ``pca``: N x P x H x W x 3,
        values in [0, 1]) and ``objects["datamodule"]`` the data module.
    """
    from tasks.instantiate import instantiate

    options = cfg.get("preview") or {}
    n_views = int(options.get("views", 6))
    n_pca, pca_sigma = int(options.get("pca_views", 3)), float(options.get("pca_sigma", 1.0))
    out_dir = Path(cfg.paths.output_dir)

    dm = instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    train = dm.datasets["train"]
    n_classes = len(np.unique(train.targets))
    n_images = options.get("images")
    if n_images is None:  # one row per class, up to a grid that is still readable
        n_images = min(n_classes, MAX_DEFAULT_ROWS)
        if n_classes > MAX_DEFAULT_ROWS:
            log.info(
                "Preview: the first %d of %d classes (set preview.images for more)",
                n_images,
                n_classes,
            )
    rows = _one_row_per_class(train.targets, int(n_images))
    eval_tf, view_tf, pca_only = _preview_transforms(dm, pca_sigma)
    panels = _draw_panels(
        train,
        rows,
        eval_tf=eval_tf,
        view_tf=view_tf,
        pca_only=pca_only,
        n_views=n_views,
        n_pca=n_pca,
        seed=0 if cfg.get("seed") is None else int(cfg.seed),
    )
    title = _title_lines(dm, pca_only.pca, seed=cfg.get("seed"), pca_sigma=pca_sigma)
    labels = [f"class {dm.class_names[int(train.targets[r])]}" for r in rows]
    path = out_dir / str(options.get("file", "augment_preview.png"))
    draw_grid(panels, row_labels=labels, title=title, pca_sigma=pca_sigma, path=path)
    log.info("Augmentation preview: %s", path)
    print(path)
    return {"preview": str(path)}, {"cfg": cfg, "datamodule": dm, "panels": panels}


def _preview_transforms(dm, pca_sigma: float):
    """``(eval view, full training pipeline, PCA jitter alone at pca_sigma)``, all in [0, 1].

    The training pipeline applies every step per image (PCA jitter too, wherever training runs
    it); the PCA jitter uses the data's colour PCA, fitted here when training has it off.
    """
    from datamodules.pca_jitter import PCAJitter

    augment = dict(dm.augment_options)
    augment["pca"] = {**augment["pca"], "where": "worker"}  # every step, applied per image
    view_tf = dm.train_transform(augment=augment, normalize=False)
    eval_tf = dm.eval_transform(normalize=False)
    color_pca = dm.color_pca or dm.resolve_color_pca()
    return eval_tf, view_tf, PCAJitter(color_pca, sigma=pca_sigma)


def _draw_panels(
    train, rows: list[int], *, eval_tf, view_tf, pca_only, n_views: int, n_pca: int, seed: int
) -> dict[str, np.ndarray]:
    """The pictures of the grid (see :func:`preview_augment`), drawn with torch seeded ``seed``."""
    import torch

    torch.manual_seed(seed)
    original, views, pca = [], [], []
    for row in rows:
        image = train.pool.load(int(train.indices[row]))
        clean = eval_tf(image)
        original.append(clean)
        views.append(torch.stack([view_tf(image) for _ in range(n_views)]))
        pca.append(torch.stack([pca_only(clean) for _ in range(n_pca)]))

    def to_numpy(t):
        return t.clamp(0, 1).movedim(-3, -1).numpy()

    return {
        "original": to_numpy(torch.stack(original)),
        "views": to_numpy(torch.stack(views)),
        "pca": to_numpy(torch.stack(pca)),
    }


def _title_lines(dm, color_pca, *, seed, pca_sigma: float) -> list[str]:
    """The grid's title: preset, data, size and seed; the training pipeline; the PCA jitter."""
    from datamodules.transforms import describe_augment

    preset = _choice("augment")
    data_name = _choice("data")
    pca_cfg = dm.augment_options["pca"]
    eig = ", ".join(f"{v:.3g}" for v in color_pca.eigval)
    if color_pca.eigval[1] <= 1e-6 * max(color_pca.eigval[0], 1e-12):
        eig += "; grey images: a single axis, brightness"
    return [
        f"augment={preset} on data={data_name}: {dm.image_size} px, seed {seed}",
        "Training pipeline: "
        + describe_augment(dm.augment_options, mirror_invariant=dm.mirror_invariant),
        f"PCA colour jitter: eigen={pca_cfg['eigen']} (eigenvalues {eig}); "
        f"training sigma={pca_cfg['sigma']:g}, orange columns sigma={pca_sigma:g}",
    ]


MAX_DEFAULT_ROWS = 16  # rows of the grid when preview.images is null and there are more classes


def _one_row_per_class(targets: np.ndarray, n: int) -> list[int]:
    """The first training image of each class, classes in order, cycling if ``n`` > classes."""
    targets = np.asarray(targets)
    by_class = [np.flatnonzero(targets == c) for c in np.unique(targets)]
    rows, depth = [], 0
    while len(rows) < n and any(depth < len(ix) for ix in by_class):
        rows += [int(ix[depth]) for ix in by_class if depth < len(ix)]
        depth += 1
    return rows[:n]


def _choice(group: str) -> str:
    """The option chosen for a config group (``light``, ``digits``, ...), when Hydra knows it."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices.get(group, "custom"))
    except Exception:
        return "custom"


def draw_grid(
    panels: dict, *, row_labels: list[str], title: list[str], pca_sigma: float, path: Path
) -> Path:
    """Original | augmented views | PCA-only views, one row per image, titled columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, k, p = len(panels["original"]), panels["views"].shape[1], panels["pca"].shape[1]
    columns = [("original", "original\n(eval view)", None)]
    columns += [("view", f"view {j + 1}", j) for j in range(k)]
    columns += [("pca", f"PCA only\nsigma={pca_sigma:g}", j) for j in range(p)]
    gap = 0.35  # a narrow empty column between the three groups
    widths = [1.0, gap, *([1.0] * k), gap, *([1.0] * p)]
    tile = 1.25
    fig = plt.figure(
        figsize=(tile * sum(widths) + 1.0, tile * n + 1.6), dpi=110, layout="constrained"
    )
    grid = fig.add_gridspec(n, len(widths), width_ratios=widths, wspace=0.04, hspace=0.04)
    slots = [0, *range(2, 2 + k), *range(3 + k, 3 + k + p)]
    for i in range(n):
        for (kind, name, j), slot in zip(columns, slots, strict=True):
            ax = fig.add_subplot(grid[i, slot])
            if kind == "original":
                image = panels["original"][i]
            else:
                image = panels["views" if kind == "view" else "pca"][i, j]
            ax.imshow(image, interpolation="nearest", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color(COLORS[kind])
                spine.set_linewidth(2.0 if kind != "view" else 1.0)
            if i == 0:
                ax.set_title(name, fontsize=9, color=COLORS[kind])
            if slot == 0:
                ax.set_ylabel(row_labels[i], fontsize=9)
    wrapped = [textwrap.fill(line, 130) for line in title]
    fig.suptitle("\n".join(wrapped), fontsize=9, ha="left", x=0.01)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
