"""``task=visualize``: pictures of what a trained network learned, from a checkpoint.

    python run.py task=visualize ckpt_path=outputs/train/runs/<run>/checkpoints/best.ckpt
    python run.py task=visualize ckpt_path=outputs/train/runs/<run>      # its best checkpoint
    python run.py task=visualize ckpt_path=<run> visualize.images=~/pictures/cats_vs_dogs

Writes into the run directory (and logs as images to the active loggers):
- ``gradcam.png``: Grad-CAM heatmaps for the predicted and the true class of a few images;
- ``first_conv_filters.png``: the first convolution's filters;
- ``activations.png``: the most active channels of every stage for one image;
- ``confusion_matrix.png``: confusion matrix and per-class accuracy over all labelled images;
- ``metrics.json``: the ``checkpoint``, and ``acc``, ``images`` (their number) and
  ``acc/<class>`` over the same images.

The images are the data set's ``visualize.split`` (the same ``data`` options as in training) or
the image files in ``visualize.images``: sub-folders named like the model's classes give true
labels (and a confusion matrix), other files are explained for their predicted class only.
The pictures are drawn by ``lightning_modules/figures/pictures.py``; the ``visualize`` callback
(``callbacks/visualize.py``) draws the same ones at the end of a training run, from the best
checkpoint on the test set.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from datamodules.errors import UserError
from lightning_modules.figures.pictures import (
    Head,
    draw_pictures,
    folder_images,
    head_of,
    log_pictures,
    split_images,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the model
def find_checkpoint(path: str | Path | None) -> Path:
    """The one checkpoint ``ckpt_path`` names (the resolver of every task): a file, or a run
    directory's best checkpoint. Pictures explain one model, so several are refused."""
    from lightning_modules.checkpoints import find_checkpoints

    if not path:
        raise UserError(
            "task=visualize needs a checkpoint: ckpt_path=outputs/train/runs/<run> (its best "
            "checkpoint) or a checkpoint file."
        )
    found = find_checkpoints(path)
    if len(found) != 1:
        raise UserError(
            f"task=visualize explains one model, and ckpt_path names {len(found)} checkpoints: "
            "give one run directory or checkpoint file."
        )
    return found[0]


def model_from_checkpoint(path: str | Path):
    """Rebuild a trained model from its checkpoint, or a run directory's best one, in eval mode."""
    from lightning_modules import checkpoints

    return checkpoints.model_from_checkpoint(find_checkpoint(path))


# ---------------------------------------------------------------------------- the task
def visualize(cfg: DictConfig) -> tuple[dict, dict]:
    """Draw the pictures of ``cfg.ckpt_path`` into the run directory; ``(metrics, objects)``."""
    from datamodules.transforms import build_eval_transform
    from lightning_modules.data_contract import data_config_for, input_settings
    from lightning_modules.run_outputs import write_metrics
    from tasks.instantiate import instantiate, instantiate_all

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
    log_pictures(instantiate_all(cfg.get("logger")), paths)
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
