"""Lightning callback: test with test-time augmentation too, logged as ``test_tta/*``."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from lightning_modules import metrics
from lightning_modules.image_classifier import gather_by_row
from lightning_modules.tta import TestTimeAugmentation


class TestTimeAugmentationCallback(pl.Callback):
    """Classifies every test batch again with ``tta``'s views, next to the module's own test step.

    Logs ``test_tta/acc``, ``test_tta/nll``, ``test_tta/ece`` (15 bins), ``test_tta/brier`` and
    ``test_tta/acc_top5`` (more than 5 classes), computed from all ranks' probabilities, so they
    compare one to one with ``test/*``. After ``trainer.test`` the probabilities are in
    :attr:`outputs` (``probs``, ``targets``, ``rows``, as ``ImageClassifier.test_outputs``).

    Works with any module whose forward returns logits or log-probabilities (an
    ``EnsembleClassifier`` too) and whose test batches are ``(x, y, rows)``.
    """

    __test__ = False  # a class named Test* that pytest must not collect

    def __init__(self, tta: TestTimeAugmentation, *, prefix: str = "test_tta") -> None:
        self.tta, self.prefix = tta, prefix
        self.outputs: dict[str, torch.Tensor] | None = None
        self._chunks: list[tuple[torch.Tensor, ...]] = []

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._chunks, self.outputs = [], None

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        x, y, rows = batch
        with trainer.precision_plugin.forward_context():
            probs = self.tta.probabilities(pl_module, x)
        self._chunks.append((probs.detach(), y.detach(), rows.detach()))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._chunks:
            return
        chunks, self._chunks = self._chunks, []
        self.outputs = gather_by_row(pl_module, *chunks)
        scores = metrics.summarize(self.outputs["probs"].numpy(), self.outputs["targets"].numpy())
        # identical on every rank (computed from the gathered outputs): no further sync needed
        pl_module.log_dict({f"{self.prefix}/{k}": v for k, v in scores.items()}, on_epoch=True)
