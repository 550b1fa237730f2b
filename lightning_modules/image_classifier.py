"""ImageClassifier: any timm backbone with a new head, trained with cross-entropy."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from lightning_modules.backbone import create_backbone
from lightning_modules.metrics import ECE_BINS
from lightning_modules.optimization import configure_layer_optimizers, layer_param_groups

# the epoch metrics are computed by torchmetrics, which synchronises them across processes
warnings.filterwarnings(
    "ignore", message=r"It is recommended to use `self.log\('(train|val)/(loss|acc)'"
)


class ImageClassifier(pl.LightningModule):
    """A timm backbone (``backbone`` by name) with a new ``num_classes`` head.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``val/acc_best`` and, on test,
    ``test/acc``, ``test/nll``, ``test/ece`` (15 bins), ``test/brier`` and ``test/acc_top5`` (more
    than 5 classes).
    After ``trainer.test`` the test probabilities are in :attr:`test_outputs`.

    Args:
        backbone: timm model name.
        num_classes: number of classes (from the data).
        class_names: class names (from the data), stored in checkpoints for prediction.
        pretrained: load timm's pretrained weights.
        weights: local weights file (loaded by the fine-tuning code).
        drop_rate: dropout before the head.
        label_smoothing: label smoothing of the training loss (evaluation uses plain NLL).
        backbone_kwargs: extra arguments for ``timm.create_model``.
        optimizer: partial optimizer, called with the parameter groups.
        scheduler: partial LR schedule, called with the optimizer and ``total_steps``.
        channels_last: keep the network and its inputs in the NHWC memory layout (faster
            convolutions with bf16/fp16 on tensor-core GPUs; a speed option, not stored in
            checkpoints).
    """

    def __init__(
        self,
        *,
        backbone: str,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        pretrained: bool = False,
        weights: str | None = None,
        drop_rate: float = 0.0,
        label_smoothing: float = 0.0,
        backbone_kwargs: dict | None = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.channels_last = bool(channels_last)
        # plain python types only: checkpoints must load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "backbone": str(backbone),
                "num_classes": int(num_classes),
                "class_names": [str(c) for c in class_names] if class_names else None,
                "pretrained": bool(pretrained),
                "weights": str(weights) if weights else None,
                "drop_rate": float(drop_rate),
                "label_smoothing": float(label_smoothing),
                "backbone_kwargs": dict(backbone_kwargs or {}),
            }
        )
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        # set by callbacks.ProgressiveUnfreeze before configure_optimizers; None = all trainable
        self.finetune_plan = None
        self.net = create_backbone(
            name=backbone,
            num_classes=num_classes,
            pretrained=pretrained,
            drop_rate=drop_rate,
            **dict(backbone_kwargs or {}),
        )
        top5 = num_classes > 5
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if top5 else None
        self.test_ece = MulticlassCalibrationError(num_classes, n_bins=ECE_BINS, norm="l1")
        self.train_loss, self.val_loss, self.test_nll = MeanMetric(), MeanMetric(), MeanMetric()
        self.test_brier = MeanMetric()
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # in checkpoints: a resumed run keeps its best so far
        self.test_outputs: dict[str, torch.Tensor] | None = None
        self._test_chunks: list[tuple[torch.Tensor, ...]] = []

    # ------------------------------------------------------------------ forward
    def setup(self, stage: str) -> None:
        if self.channels_last:  # in place: the optimizer, made after this, sees the same tensors
            self.net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:  # cached pre-logit features (datamodules.feature_cache)
            x = F.dropout(x, p=self.hparams.drop_rate, training=self.training)
            return self.net.get_classifier()(x)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    # ------------------------------------------------------------------ train
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        self.train_loss.update(loss.detach(), weight=len(y))
        self.train_acc.update(logits.detach(), y)
        return loss

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train", self.train_loss, self.train_acc)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch, batch_idx: int) -> None:
        x, y, _ = batch
        logits = self(x)
        self.val_loss.update(F.cross_entropy(logits, y), weight=len(y))
        self.val_acc.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        acc = self._log_epoch("val", self.val_loss, self.val_acc)
        if self.trainer.sanity_checking:  # a few batches: not an epoch, never the best one
            return
        self.val_acc_best(acc)
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)

    def _log_epoch(self, stage: str, loss: MeanMetric, acc: MulticlassAccuracy) -> torch.Tensor:
        """Log ``<stage>/loss`` and ``<stage>/acc`` over the epoch, then reset them.

        The metrics are updated per batch and logged once per epoch: what ``self.log`` of the
        metric objects with ``on_epoch=True`` logs, without Lightning's ~1 ms per call and step.
        ``compute`` synchronises the processes under DDP (Lightning's advice to log them with
        ``sync_dist=True`` is filtered out at the top of this module: they are synchronised).
        """
        value = acc.compute()
        self.log(f"{stage}/loss", loss.compute(), prog_bar=True)
        self.log(f"{stage}/acc", value, prog_bar=True)
        loss.reset()
        acc.reset()
        return value

    # ------------------------------------------------------------------ test
    def on_test_epoch_start(self) -> None:
        self._test_chunks = []
        self.test_outputs = None

    def test_step(self, batch, batch_idx: int) -> None:
        x, y, rows = batch
        logits = self(x).float()
        probs = logits.softmax(dim=-1)
        self.test_nll(F.cross_entropy(logits, y, reduction="none"))
        self.test_acc(probs, y)
        self.test_ece(probs, y)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)
        self.log("test/nll", self.test_nll, on_step=False, on_epoch=True)
        self.log("test/ece", self.test_ece, on_step=False, on_epoch=True)
        onehot = F.one_hot(y, probs.shape[-1]).to(probs.dtype)
        self.test_brier(((probs - onehot) ** 2).sum(-1))
        self.log("test/brier", self.test_brier, on_step=False, on_epoch=True)
        if self.test_acc5 is not None:
            self.test_acc5(probs, y)
            self.log("test/acc_top5", self.test_acc5, on_step=False, on_epoch=True)
        self._test_chunks.append((probs.detach(), y.detach(), rows.detach()))

    def on_test_epoch_end(self) -> None:
        if not self._test_chunks:
            return
        chunks, self._test_chunks = self._test_chunks, []
        self.test_outputs = gather_by_row(self, *chunks)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        """The injected optimizer over :meth:`param_groups`, and the injected LR schedule.

        With a fine-tuning plan (set by ``callbacks.ProgressiveUnfreeze``), each layer group's LR
        is ``lr × its multiplier × schedule(step)``, gated to 0 until the group is unfrozen.
        """
        return configure_layer_optimizers(self, self.param_groups())

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups (``lightning_modules.optimization.layer_param_groups``)."""
        return layer_param_groups(self.net, self.finetune_plan)


def gather_by_row(
    module: pl.LightningModule, *chunks: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per-batch ``(probs, targets, rows)`` of every rank, in row order, on the CPU.

    The distributed sampler pads the last batches with repeated rows: those repeats are dropped.
    Returns ``{"probs": (N, C), "targets": (N,), "rows": (N,)}``.
    """
    probs, targets, rows = (torch.cat(parts) for parts in zip(*chunks, strict=True))
    if module.trainer.world_size > 1:  # every rank's rows (equal sizes: the sampler pads)
        probs, targets, rows = (module.all_gather(t).flatten(0, 1) for t in (probs, targets, rows))
    order = torch.argsort(rows, stable=True)
    probs, targets, rows = probs[order], targets[order], rows[order]
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]  # drop the distributed sampler's padding repeats
    return {"probs": probs[first].cpu(), "targets": targets[first].cpu(), "rows": rows[first].cpu()}
