"""``task=visualize``: pictures of what a trained network learned, from a checkpoint.

    python run.py task=visualize ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt
    python run.py task=visualize ckpt_path=outputs/train/runs/<run>      # its best checkpoint
    python run.py task=visualize ckpt_path=<run> visualize.images=~/pictures/cats_vs_dogs

Writes into the run directory (and logs as images to the active loggers):
- ``gradcam.png``: Grad-CAM heatmaps for the predicted and the true class of a few images;
- ``first_conv_filters.png``: the first convolution's filters;
- ``activations.png``: the most active channels of every stage for one image;
- ``confusion_matrix.png``: confusion matrix and per-class accuracy over all scored images;
- ``metrics.json``: ``acc`` and ``acc/<class>`` over the same images.

The images are the data set's ``visualize.split`` (the same ``data`` options as in training) or
the image files in ``visualize.images``: sub-folders named like the model's classes give true
labels (and a confusion matrix), other files are explained for their predicted class only.
The ``visualize`` callback (``callbacks/visualize.py``) draws the same pictures at the end of a
training run, from the best checkpoint on the test set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from lightning_modules.errors import UserError

log = logging.getLogger(__name__)

PICTURES = ("gradcam", "first_conv_filters", "activations", "confusion_matrix")


# ---------------------------------------------------------------------------- the model
def find_checkpoint(path: str | Path | None) -> Path:
    """A checkpoint file, or a run directory's ``checkpoints/best.ckpt`` (else ``last.ckpt``)."""
    if not path:
        raise UserError(
            "task=visualize needs a checkpoint: ckpt_path=outputs/train/runs/<run>/checkpoints/"
            "best.ckpt (or the run directory)."
        )
    path = Path(str(path)).expanduser()
    if path.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise UserError(f"'{path}' holds no checkpoints/best.ckpt: give the checkpoint file.")
    if not path.is_file():
        raise UserError(f"Checkpoint '{path}' does not exist: set ckpt_path to a .ckpt file.")
    return path


def model_from_checkpoint(path: str | Path):
    """Rebuild a trained model from its checkpoint, or a run directory's best one, in eval mode."""
    from lightning_modules import checkpoints

    return checkpoints.model_from_checkpoint(find_checkpoint(path))


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


class _FileImages:
    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __call__(self, i: int) -> torch.Tensor:
        from datamodules.sources.folder import load_rgb

        return self.transform(load_rgb(self.paths[i]))


def folder_images(folder: str | Path, transform, class_names: Sequence[str]) -> ImageSet:
    """Image files below ``folder``; a first-level sub-folder named like a class labels them."""
    from datamodules.sources.folder import IMAGE_EXTENSIONS, list_images

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"visualize.images='{root}' is not a folder: give a folder of images.")
    paths = list_images(root)
    if not paths:
        raise UserError(
            f"visualize.images='{root}' holds no images ({', '.join(IMAGE_EXTENSIONS)})."
        )
    index = {name: i for i, name in enumerate(class_names)}
    rel = [p.relative_to(root) for p in paths]
    targets = [index.get(r.parts[0], -1) if len(r.parts) > 1 else -1 for r in rel]
    labelled = any(t >= 0 for t in targets)
    return ImageSet(
        _FileImages(paths, transform),
        [r.as_posix() for r in rel],
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
    from lightning_modules.feature_maps import first_conv, stage_activations
    from lightning_modules.gradcam import choose_layer, grad_cam
    from lightning_modules.model_figures import (
        CamRow,
        confusion_matrix,
        plot_activations,
        plot_confusion,
        plot_filters,
        plot_gradcam,
    )

    out_dir = Path(out_dir)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    paths: dict[str, Path] = {}
    metrics: dict = {}
    names = head.class_names
    regression = head.kind == "regression"
    try:
        scores = predict_all(net, head, images, batch_size=batch_size, num_workers=num_workers)
        targets = images.targets
        predicted = scores.argmax(dim=1) if not regression else torch.zeros(len(scores))
        picked = pick_images(targets, predicted.long(), num_images)
        x = torch.stack([images.load(i) for i in picked]).to(device)
        shown = [_to_display(img, mean, std) for img in x]
        zeros = torch.zeros(len(picked), dtype=torch.long)
        if layer == "auto":
            layer = choose_layer(net, tuple(x.shape[-2:]))
        layer = None if layer in (None, "last") else layer
        cam = {"select": head.select, "method": method, "layer": layer}
        cam_pred = grad_cam(net, x, zeros if regression else None, **cam)
        rows_true = targets[picked] if targets is not None else None
        cam_true = None
        if rows_true is not None and bool((rows_true >= 0).any()) and not regression:
            explain = torch.where(rows_true >= 0, rows_true, cam_pred.classes)
            cam_true = grad_cam(net, x, explain, **cam)
        rows = []
        for k, i in enumerate(picked):
            if regression:
                predicted, prob = f"{float(scores[i, 0]):.3g}", float("nan")
            else:
                c = int(cam_pred.classes[k])
                predicted, prob = names[c], float(scores[i, c])
            true = None
            if rows_true is not None and int(rows_true[k]) >= 0:
                true = names[int(rows_true[k])]
            if regression and images.values is not None and not torch.isnan(images.values[i]):
                true = f"{float(images.values[i]):.3g}"
            rows.append(
                CamRow(
                    image=shown[k],
                    predicted=predicted,
                    probability=prob,
                    cam_predicted=cam_pred.heatmaps[k].numpy(),
                    true=true,
                    cam_true=None
                    if cam_true is None or true is None
                    else cam_true.heatmaps[k].numpy(),
                    label=images.ids[i],
                )
            )
        h, w = cam_pred.grid
        what = f", task '{head.name}'" if head.name else ""
        method_name = {"gradcam": "Grad-CAM", "hirescam": "HiResCAM"}[method]
        paths["gradcam"] = plot_gradcam(
            out_dir / "gradcam.png",
            rows,
            title=f"{title}{what}: {method_name} on the {cam_pred.layer} ({h}×{w})",
            regression=regression,
        )
        conv_name, weight = first_conv(net)
        paths["first_conv_filters"] = plot_filters(
            out_dir / "first_conv_filters.png",
            weight.numpy(),
            title=f"{title}: first convolution '{conv_name}' ({weight.shape[0]} filters "
            f"{weight.shape[2]}×{weight.shape[3]}×{weight.shape[1]})",
            max_filters=max_filters,
        )
        j = min(max(0, activation_image), len(picked) - 1)
        stages = stage_activations(net, x[j : j + 1])
        paths["activations"] = plot_activations(
            out_dir / "activations.png",
            shown[j],
            [(n, a[0].cpu().numpy()) for n, a in stages],
            title=f"{title}: activations for '{images.ids[picked[j]]}'",
            channels=channels,
        )
        if targets is not None and not regression:
            has = targets >= 0
            if bool(has.any()):
                predicted = scores.argmax(dim=1)
                matrix = confusion_matrix(targets[has].numpy(), predicted[has].numpy(), len(names))
                paths["confusion_matrix"] = plot_confusion(
                    out_dir / "confusion_matrix.png",
                    matrix,
                    names,
                    title=f"{title}{what}: confusion matrix",
                )
                totals = matrix.sum(axis=1)
                metrics["acc"] = float(np.trace(matrix) / matrix.sum())
                metrics["images"] = int(matrix.sum())
                for c, name in enumerate(names):
                    if totals[c]:
                        metrics[f"acc/{name}"] = float(matrix[c, c] / totals[c])
        if "confusion_matrix" not in paths:
            log.info("No labelled images for a classification head: no confusion matrix.")
    finally:
        net.train(was_training)
    return paths, metrics


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


# ---------------------------------------------------------------------------- the task
def visualize(cfg: DictConfig) -> tuple[dict, dict]:
    """Draw the pictures of ``cfg.ckpt_path`` into the run directory; ``(metrics, objects)``."""
    from datamodules.transforms import build_eval_transform
    from lightning_modules.data_contract import data_config_for, input_settings
    from lightning_modules.run_outputs import write_metrics
    from run import _instantiate_all, instantiate

    options = cfg.get("visualize") or {}
    out_dir = Path(cfg.paths.output_dir)
    checkpoint = find_checkpoint(cfg.get("ckpt_path"))
    model = model_from_checkpoint(checkpoint)
    contract = model.data_contract
    head = head_of(model, options.get("task"))
    if options.get("images"):  # the checkpoint's input settings, whatever data says
        inputs = input_settings(contract, cfg.data, backbone=model.hparams.get("backbone"))
        transform = build_eval_transform(
            image_size=inputs["image_size"],
            mean=inputs["mean"],
            std=inputs["std"],
            interpolation=inputs["interpolation"],
            crop_pct=inputs["crop_pct"],
        )
        images = folder_images(options["images"], transform, head.class_names)
        mean, std = inputs["mean"], inputs["std"]
        batch_size, workers = int(cfg.data.eval_batch_size or 64), int(cfg.data.num_workers)
    else:  # a split of the checkpoint's own data
        datamodule = instantiate(data_config_for(cfg, contract), _convert_="all")
        datamodule.prepare_data()
        datamodule.setup("test")
        _check_same_classes(model, head, datamodule)
        images = split_images(datamodule, options.get("split", "test"), head)
        mean, std = datamodule.mean, datamodule.std
        batch_size, workers = datamodule.eval_batch_size, datamodule.num_workers
    backbone = model.hparams.backbone
    paths, metrics = draw_pictures(
        model.net,
        head,
        images,
        out_dir,
        mean=mean,
        std=std,
        title=backbone,
        num_images=int(options.get("num_images", 8)),
        method=str(options.get("method", "gradcam")),
        layer=str(options.get("layer") or "auto"),
        channels=int(options.get("channels", 6)),
        max_filters=int(options.get("max_filters", 64)),
        activation_image=int(options.get("activation_image", 0)),
        batch_size=batch_size,
        num_workers=workers,
    )
    log_pictures(_instantiate_all(cfg.get("logger")), paths)
    metrics = {"checkpoint": str(checkpoint), **metrics}
    write_metrics(out_dir, metrics)
    log.info("Pictures in %s: %s", out_dir, ", ".join(p.name for p in paths.values()))
    if "acc" in metrics:
        log.info("Accuracy on the %d labelled images: %.4f", metrics["images"], metrics["acc"])
    return metrics, {"model": model, "paths": paths}


def _check_same_classes(model, head: Head, datamodule) -> None:
    tasks = model.hparams.get("tasks")
    data_tasks = getattr(datamodule, "tasks", None)
    if tasks:
        if not data_tasks or list(data_tasks) != list(tasks):
            raise UserError(
                f"The checkpoint's tasks {list(tasks)} differ from the data's "
                f"{list(data_tasks or [])}: pass the data options the model was trained with."
            )
        return
    if list(head.class_names) != list(datamodule.class_names):
        raise UserError(
            f"The checkpoint predicts classes {head.class_names[:12]} but the data has "
            f"{datamodule.class_names[:12]}: pass the data options the model was trained with "
            "(e.g. data.classes=...)."
        )
