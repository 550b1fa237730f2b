"""Draw what the network learned at the end of a run, from the weights it was tested with.

After ``trainer.test`` (the best checkpoint, in a training run) the callback writes the pictures
of ``task=visualize`` into the run directory - ``gradcam.png``, ``first_conv_filters.png``,
``activations.png``, ``confusion_matrix.png`` - for the data module's ``split`` (test) and logs
them as images to the trainer's loggers (W&B, TensorBoard). Enable it with
``python run.py 'callbacks=[default,visualize]'``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class Visualize(pl.Callback):
    """Pictures of the tested model (options as in ``conf/visualize/default.yaml``).

    Args:
        split: the data module's split to score and explain.
        num_images: images in the Grad-CAM figure.
        task: multi-task models: the head to explain (None: the first classification task).
        method: ``gradcam`` or ``hirescam``.
        layer: Grad-CAM's feature map: ``auto``, ``last`` or a stage's module name.
        activation_image: which of those images shows its stage activations.
        channels: channels per stage in the activations figure.
        max_filters: first-convolution filters shown.
        dirpath: where the PNGs go (default: the trainer's ``default_root_dir``, the run dir).
    """

    def __init__(
        self,
        *,
        split: str = "test",
        num_images: int = 8,
        task: str | None = None,
        method: str = "gradcam",
        layer: str = "auto",
        activation_image: int = 0,
        channels: int = 6,
        max_filters: int = 64,
        dirpath: str | None = None,
    ) -> None:
        super().__init__()
        self.split, self.num_images, self.task, self.method = split, num_images, task, method
        self.layer = layer
        self.activation_image, self.channels = activation_image, channels
        self.max_filters, self.dirpath = max_filters, dirpath
        self.paths: dict[str, Path] = {}

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_modules.visualize import draw_pictures, head_of, log_pictures, split_images

        if not trainer.is_global_zero:
            return
        data = trainer.datamodule
        data = getattr(data, "dm", data)  # trained on cached features: the images behind them
        head = head_of(pl_module, self.task)
        self.paths, _ = draw_pictures(
            pl_module.net,
            head,
            split_images(data, self.split, head),
            Path(self.dirpath or trainer.default_root_dir),
            mean=data.mean,
            std=data.std,
            title=str(pl_module.hparams.backbone),
            num_images=self.num_images,
            method=self.method,
            layer=self.layer,
            channels=self.channels,
            max_filters=self.max_filters,
            activation_image=self.activation_image,
            batch_size=data.eval_batch_size,
        )
        log_pictures(trainer.loggers, self.paths, step=trainer.global_step)
        log.info("Pictures: %s", ", ".join(str(p) for p in self.paths.values()))
