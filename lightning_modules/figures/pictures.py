"""The pictures of what a trained network learned, for ``task=visualize`` and the ``visualize``
callback: which images to explain, their scores, and the PNGs drawn from them.

:func:`draw_pictures` writes, for a set of images (a data split, or image files) and one head of
the network (the classifier, or one task of a multi-task model):

- ``gradcam.png``: Grad-CAM (or HiResCAM) heatmaps of a few images, up to half of them mistakes:
  for the predicted class and, when the image has a label, for the true class (a regression
  head: one map, for the predicted value);
- ``first_conv_filters.png``: the first convolution's filters;
- ``activations.png``: the most active channels of every stage for one of those images;
- ``confusion_matrix.png``: confusion matrix and per-class accuracy over every labelled image
  (classification heads), with ``acc`` and ``acc/<class>`` as metrics.

:func:`log_pictures` logs the PNGs as images to the loggers that take them (W&B, TensorBoard).
The numbers come from ``lightning_modules.gradcam`` and ``lightning_modules.feature_maps``, the
drawing from ``lightning_modules.figures.model_figures``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datamodules.errors import UserError

log = logging.getLogger(__name__)

# the pictures draw_pictures writes (``<name>.png``, the key in its paths)
PICTURES = ("gradcam", "first_conv_filters", "activations", "confusion_matrix")


# ---------------------------------------------------------------------------- the head
@dataclass
class Head:
    """What to explain: logits ``(N, C)`` from the network's output, with class names.

    For a multi-task network, one task's head: a binary head's logit ``z`` becomes the pair
    ``(-z/2, z/2)`` (its softmax is ``(1 - σ(z), σ(z))``); a regression head has one "class", the
    predicted value, and no confusion matrix.
    """

    select: Callable[[object], torch.Tensor]
    class_names: list[str]
    column: int | None = None  # the task's column in multi-task label vectors
    name: str = ""
    kind: str = "classification"

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """Class index per sample (-1: no label) from a batch's targets."""
        if self.column is None:
            return y.long()
        col = y[:, self.column]
        return torch.where(torch.isnan(col), torch.full_like(col, -1), col).long()


def _identity(out):
    return out


class _TaskSelect:
    def __init__(self, task: str, binary: bool) -> None:
        self.task, self.binary = task, binary

    def __call__(self, out) -> torch.Tensor:
        z = out[self.task]
        if self.binary:
            z = z.reshape(-1, 1)
            return torch.cat([-z / 2, z / 2], dim=1)
        return z.reshape(len(z), -1)


def head_of(model, task: str | None = None) -> Head:
    """The head to explain: the classifier, or a multi-task model's ``task`` (default: the first
    classification or binary task)."""
    tasks = model.hparams.get("tasks")
    if not tasks:
        names = model.hparams.get("class_names") or [
            str(i) for i in range(model.hparams.num_classes)
        ]
        if task:
            raise UserError(
                f"visualize.task={task} applies to multi-task models; this checkpoint is a "
                "single-task classifier: leave visualize.task=null."
            )
        return Head(_identity, list(names))
    names = list(tasks)
    if task is None:
        task = next((n for n in names if tasks[n]["type"] != "regression"), names[0])
    if task not in tasks:
        raise UserError(f"visualize.task={task} is not a task of this model: use one of {names}.")
    spec = tasks[task]
    kind = spec["type"]
    class_names = list(spec.get("class_names") or ([task] if kind == "regression" else []))
    return Head(_TaskSelect(task, kind == "binary"), class_names, names.index(task), task, kind)


# ---------------------------------------------------------------------------- images
@dataclass
class ImageSet:
    """Images to explain (normalised tensors, loaded lazily) with ids and targets (-1: none)."""

    load: Callable[[int], torch.Tensor]
    ids: list[str]
    targets: torch.Tensor | None  # per image: class index, -1 = unlabelled; None = no labels
    values: torch.Tensor | None = None  # regression heads: the label per image, NaN = none

    def __len__(self) -> int:
        return len(self.ids)


class _SplitImages:
    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __call__(self, i: int) -> torch.Tensor:
        return self.dataset[i][0]


def split_images(datamodule, split: str, head: Head) -> ImageSet:
    """A split of the data set (eval transform), its ids and targets for ``head``."""
    dataset = datamodule.datasets.get(split)
    if dataset is None:
        raise UserError(f"visualize.split={split}: the data has no such split (train, val, test).")
    # the eval transform for every split: training images are shown without augmentation
    dataset = type(dataset)(
        dataset.pool, dataset.indices, dataset.targets, datamodule.eval_transform()
    )
    rows = torch.as_tensor(
        np.asarray(dataset.labels if head.column is not None else dataset.targets)
    )
    ids = list(datamodule.ids(split))
    if head.kind == "regression":
        return ImageSet(_SplitImages(dataset), ids, None, rows[:, head.column].float())
    return ImageSet(_SplitImages(dataset), ids, head.targets(rows))


def folder_images(folder: str | Path, transform, class_names: Sequence[str]) -> ImageSet:
    """Image files below ``folder``; a first-level sub-folder named like a class labels them.
    Unreadable files (empty, not an image, corrupt) are skipped and named in one warning."""
    from datamodules.image_files import ImageFiles, folder_targets, image_files
    from datamodules.sources.folder import check_images

    root, paths = image_files(folder, option="visualize.images")
    paths, skipped = check_images(paths)
    if skipped:
        log.warning(
            "Skipped %d unreadable file(s) in '%s': %s%s",
            len(skipped),
            root,
            ", ".join(str(p.relative_to(root)) for p in skipped[:10]),
            " ..." if len(skipped) > 10 else "",
        )
    if not paths:
        raise UserError(f"visualize.images='{root}' holds no readable images.")
    targets = folder_targets(root, paths, class_names)
    labelled = any(t >= 0 for t in targets)
    return ImageSet(
        ImageFiles(paths, transform).image,
        [p.relative_to(root).as_posix() for p in paths],
        torch.tensor(targets) if labelled else None,
    )


def pick_images(targets: torch.Tensor | None, predicted: torch.Tensor, n: int) -> list[int]:
    """Up to ``n`` images to explain: up to half of them mistakes, the rest one per class in turn.

    Mistakes come first (one per true class in turn), then correct images in class order, then
    unlabelled ones; without labels, the first ``n`` images.
    """
    if targets is None or not bool((targets >= 0).any()):
        return list(range(min(n, len(predicted))))

    def round_robin(mask: torch.Tensor, k: int) -> list[int]:
        queues = {
            int(c): torch.nonzero(mask & (targets == c)).flatten().tolist()
            for c in torch.unique(targets[mask])
        }
        out: list[int] = []
        while len(out) < k and any(queues.values()):
            for c in sorted(queues):
                if queues[c] and len(out) < k:
                    out.append(queues[c].pop(0))
        return out

    labelled = targets >= 0
    wrong = round_robin(labelled & (predicted != targets), n // 2)
    right = round_robin(labelled & (predicted == targets), n - len(wrong))
    unlabelled = torch.nonzero(~labelled).flatten().tolist()
    return wrong + right + unlabelled[: n - len(wrong) - len(right)]


class _Loading(torch.utils.data.Dataset):
    def __init__(self, images: ImageSet) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images.load(i)


@torch.no_grad()
def predict_all(
    net, head: Head, images: ImageSet, *, batch_size: int = 256, num_workers: int = 0
) -> torch.Tensor:
    """Probabilities ``(N, C)`` (regression: the predicted values ``(N, 1)``) of every image."""
    device = next(net.parameters()).device
    loader = torch.utils.data.DataLoader(
        _Loading(images), batch_size=batch_size, num_workers=num_workers
    )
    out = []
    for x in loader:
        logits = head.select(net(x.to(device))).float()
        out.append((logits if head.kind == "regression" else logits.softmax(dim=1)).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------- the pictures
def _to_display(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    mean_t = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x.cpu() * std_t + mean_t).clamp(0, 1).permute(1, 2, 0).numpy()


def draw_pictures(
    net,
    head: Head,
    images: ImageSet,
    out_dir: str | Path,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    title: str,
    num_images: int = 8,
    method: str = "gradcam",
    layer: str = "auto",
    channels: int = 6,
    max_filters: int = 64,
    activation_image: int = 0,
    batch_size: int = 256,
    num_workers: int = 0,
) -> tuple[dict[str, Path], dict]:
    """Draw every picture for ``images`` into ``out_dir``; returns ``(paths, metrics)``.

    ``layer``: the feature map Grad-CAM uses: ``last``, a stage's module name, or ``auto`` (the
    last, unless it is coarser than 4×4: then the deepest stage that is not).
    ``metrics`` holds ``acc`` and ``acc/<class>`` over the labelled images (classification).
    The Grad-CAM figure shows up to ``num_images`` images, up to half of them mistakes.
    """
    out_dir = Path(out_dir)
    was_training = net.training
    net.eval()
    what = f", task '{head.name}'" if head.name else ""
    try:
        scores = predict_all(net, head, images, batch_size=batch_size, num_workers=num_workers)
        s = _scored(net, head, images, scores, num_images, mean=mean, std=std)
        paths = {
            "gradcam": _draw_gradcam(
                s, out_dir / "gradcam.png", title=f"{title}{what}", method=method, layer=layer
            ),
            "first_conv_filters": _draw_filters(
                net, out_dir / "first_conv_filters.png", title=title, max_filters=max_filters
            ),
            "activations": _draw_activations(
                s,
                out_dir / "activations.png",
                title=title,
                channels=channels,
                image=activation_image,
            ),
        }
        confusion, metrics = _draw_confusion(
            s, out_dir / "confusion_matrix.png", title=f"{title}{what}"
        )
        if confusion is not None:
            paths["confusion_matrix"] = confusion
        else:
            log.info("No labelled images for a classification head: no confusion matrix.")
    finally:
        net.train(was_training)
    return paths, metrics


@dataclass
class _Scored:
    """What the pictures are drawn from: the network (in eval mode), the head, the image set and
    every image's scores (:func:`predict_all`); and the images shown: their indices in the set
    (``picked``), their batch on the network's device, their RGB ``(H, W, 3)`` pictures."""

    net: torch.nn.Module
    head: Head
    images: ImageSet
    scores: torch.Tensor
    picked: list[int]
    x: torch.Tensor
    pictures: list[np.ndarray]


def _scored(net, head: Head, images: ImageSet, scores: torch.Tensor, n: int, *, mean, std):
    """The :class:`_Scored` images, showing up to ``n`` of them (see :func:`pick_images`)."""
    device = next(net.parameters()).device
    regression = head.kind == "regression"
    predicted = scores.argmax(dim=1) if not regression else torch.zeros(len(scores))
    picked = pick_images(images.targets, predicted.long(), n)
    x = torch.stack([images.load(i) for i in picked]).to(device)
    pictures = [_to_display(img, mean, std) for img in x]
    return _Scored(net, head, images, scores, picked, x, pictures)


def _draw_gradcam(s: _Scored, path: Path, *, title: str, method: str, layer: str | None) -> Path:
    """``gradcam.png``: one row per shown image, heatmaps from the feature map ``layer``."""
    from lightning_modules.figures.model_figures import plot_gradcam
    from lightning_modules.gradcam import choose_layer

    if layer == "auto":
        layer = choose_layer(s.net, tuple(s.x.shape[-2:]))
    layer = None if layer in (None, "last") else layer
    cam = {"select": s.head.select, "method": method, "layer": layer}
    rows, cam_pred = _gradcam_rows(s, cam)
    h, w = cam_pred.grid
    method_name = {"gradcam": "Grad-CAM", "hirescam": "HiResCAM"}[method]
    return plot_gradcam(
        path,
        rows,
        title=f"{title}: {method_name} on the {cam_pred.layer} ({h}×{w})",
        regression=s.head.kind == "regression",
    )


def _gradcam_rows(s: _Scored, cam: dict):
    """The Grad-CAM figure's rows and the predicted class's ``CamResult``: per image, the map
    of its predicted class (regression: value) and, when it has a label, of its true class."""
    from lightning_modules.figures.model_figures import CamRow
    from lightning_modules.gradcam import grad_cam

    names, regression, images = s.head.class_names, s.head.kind == "regression", s.images
    zeros = torch.zeros(len(s.picked), dtype=torch.long)
    cam_pred = grad_cam(s.net, s.x, zeros if regression else None, **cam)
    rows_true = images.targets[s.picked] if images.targets is not None else None
    cam_true = None
    if rows_true is not None and bool((rows_true >= 0).any()) and not regression:
        explain = torch.where(rows_true >= 0, rows_true, cam_pred.classes)
        cam_true = grad_cam(s.net, s.x, explain, **cam)
    rows = []
    for k, i in enumerate(s.picked):
        if regression:
            predicted, prob = f"{float(s.scores[i, 0]):.3g}", float("nan")
        else:
            c = int(cam_pred.classes[k])
            predicted, prob = names[c], float(s.scores[i, c])
        true = None
        if rows_true is not None and int(rows_true[k]) >= 0:
            true = names[int(rows_true[k])]
        if regression and images.values is not None and not torch.isnan(images.values[i]):
            true = f"{float(images.values[i]):.3g}"
        rows.append(
            CamRow(
                image=s.pictures[k],
                predicted=predicted,
                probability=prob,
                cam_predicted=cam_pred.heatmaps[k].numpy(),
                true=true,
                cam_true=None if cam_true is None or true is None else cam_true.heatmaps[k].numpy(),
                label=images.ids[i],
            )
        )
    return rows, cam_pred


def _draw_filters(net, path: Path, *, title: str, max_filters: int) -> Path:
    """``first_conv_filters.png``: the first convolution's filters."""
    from lightning_modules.feature_maps import first_conv
    from lightning_modules.figures.model_figures import plot_filters

    conv_name, weight = first_conv(net)
    return plot_filters(
        path,
        weight.numpy(),
        title=f"{title}: first convolution '{conv_name}' ({weight.shape[0]} filters "
        f"{weight.shape[2]}×{weight.shape[3]}×{weight.shape[1]})",
        max_filters=max_filters,
    )


def _draw_activations(s: _Scored, path: Path, *, title: str, channels: int, image: int) -> Path:
    """``activations.png``: every stage's most active channels for the shown image ``image``."""
    from lightning_modules.feature_maps import stage_activations
    from lightning_modules.figures.model_figures import plot_activations

    j = min(max(0, image), len(s.picked) - 1)
    stages = stage_activations(s.net, s.x[j : j + 1])
    return plot_activations(
        path,
        s.pictures[j],
        [(n, a[0].cpu().numpy()) for n, a in stages],
        title=f"{title}: activations for '{s.images.ids[s.picked[j]]}'",
        channels=channels,
    )


def _draw_confusion(s: _Scored, path: Path, *, title: str) -> tuple[Path | None, dict]:
    """``confusion_matrix.png`` and the metrics ``acc``, ``images``, ``acc/<class>`` over the
    labelled images of a classification head; ``(None, {})`` when there are none."""
    from lightning_modules.figures.model_figures import confusion_matrix, plot_confusion

    targets, names = s.images.targets, s.head.class_names
    if targets is None or s.head.kind == "regression" or not bool((targets >= 0).any()):
        return None, {}
    has = targets >= 0
    predicted = s.scores.argmax(dim=1)
    matrix = confusion_matrix(targets[has].numpy(), predicted[has].numpy(), len(names))
    drawn = plot_confusion(path, matrix, names, title=f"{title}: confusion matrix")
    totals = matrix.sum(axis=1)
    metrics = {"acc": float(np.trace(matrix) / matrix.sum()), "images": int(matrix.sum())}
    for c, name in enumerate(names):
        if totals[c]:
            metrics[f"acc/{name}"] = float(matrix[c, c] / totals[c])
    return drawn, metrics


def log_pictures(loggers: Sequence, paths: dict[str, Path], *, step: int | None = None) -> None:
    """Log the PNGs as images to every logger that takes images (W&B, TensorBoard)."""
    for logger in loggers:
        if hasattr(logger, "log_image"):  # WandbLogger and loggers with its API
            for key, path in paths.items():
                logger.log_image(key=f"pictures/{key}", images=[str(path)], step=step)
            continue
        writer = getattr(logger, "experiment", None)
        if hasattr(writer, "add_image"):  # TensorBoard's SummaryWriter
            import matplotlib.image as mpimg

            for key, path in paths.items():
                pixels = mpimg.imread(str(path))[..., :3]
                writer.add_image(
                    f"pictures/{key}", pixels, global_step=step or 0, dataformats="HWC"
                )
