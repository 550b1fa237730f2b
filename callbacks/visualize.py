"""Draw what the network learned at the end of a run, from the weights it was tested with.

After ``trainer.test`` (the best checkpoint, in a training run) the callback writes the pictures
of ``task=visualize`` into the run directory - ``gradcam.png``, ``first_conv_filters.png``,
``activations.png``, ``confusion_matrix.png`` - for the data module's ``visualize.split`` (test)
and logs them as images to the trainer's loggers (W&B, TensorBoard). The drawing is
``lightning_modules/figures/pictures.py``'s. Enable it with
``python run.py 'callbacks=[default,visualize]'``; its options are the ``visualize`` group's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pytorch_lightning as pl

from datamodules.errors import UserError

log = logging.getLogger(__name__)

# the keys of the `visualize` group (conf/visualize/default.yaml) the callback uses, with the
# defaults they have there; its `images` (a folder for task=visualize) does not apply here
OPTIONS = {
    "split": "test",
    "num_images": 8,
    "task": None,
    "method": "gradcam",
    "layer": "auto",
    "activation_image": 0,
    "channels": 6,
    "max_filters": 64,
}


class Visualize(pl.Callback):
    """Pictures of the tested model.

    Args:
        options: the ``visualize`` group (``conf/visualize/default.yaml``; missing keys take
            the defaults there): ``split`` (the data module's split to score and explain),
            ``num_images`` (images in the Grad-CAM figure), ``task`` (multi-task models: the
            head to explain; None: the first classification task), ``method`` (``gradcam`` or
            ``hirescam``), ``layer`` (Grad-CAM's feature map: ``auto``, ``last`` or a stage's
            module name), ``activation_image`` (which of those images shows its stage
            activations), ``channels`` (per stage in the activations figure), ``max_filters``
            (first-convolution filters shown). ``images`` must be null: the callback draws the
            data module's split, a folder of images is for ``task=visualize``.
        dirpath: where the PNGs go (default: the trainer's ``default_root_dir``, the run dir).
    """

    def __init__(self, *, options: Mapping | None = None, dirpath: str | None = None) -> None:
        super().__init__()
        options = dict(options or {})
        if options.pop("images", None) is not None:
            raise UserError(
                "visualize.images is for task=visualize: the visualize callback draws the "
                "data module's visualize.split at the end of a run. Leave visualize.images=null."
            )
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise UserError(
                f"Unknown visualize options {unknown}: the callback takes {', '.join(OPTIONS)}."
            )
        self.options = {**OPTIONS, **options}
        self.dirpath = dirpath
        self.paths: dict[str, Path] = {}

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_modules.figures.pictures import (
            draw_pictures,
            head_of,
            log_pictures,
            split_images,
        )

        if not trainer.is_global_zero:
            return
        data = trainer.datamodule
        data = getattr(data, "dm", data)  # trained on cached features: the images behind them
        drawing = dict(self.options)
        split, task = drawing.pop("split"), drawing.pop("task")
        head = head_of(pl_module, task)
        self.paths, _ = draw_pictures(
            pl_module.net,
            head,
            split_images(data, split, head),
            Path(self.dirpath or trainer.default_root_dir),
            mean=data.mean,
            std=data.std,
            title=str(pl_module.hparams.backbone),
            batch_size=data.eval_batch_size,
            num_workers=data.num_workers,
            **drawing,  # num_images, method, layer, activation_image, channels, max_filters
        )
        log_pictures(trainer.loggers, self.paths, step=trainer.global_step)
        log.info("Pictures: %s", ", ".join(str(p) for p in self.paths.values()))
