"""Lightning callback: test with test-time augmentation too, logged as ``test_tta/*``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pytorch_lightning as pl
import torch

from lightning_modules import metrics
from lightning_modules.image_classifier import gather_by_row
from lightning_modules.tta import TestTimeAugmentation

# the scores are computed from every rank's gathered outputs, the same on each: Lightning's advice
# to log them with sync_dist=True does not apply
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('test_tta/")


class TestTimeAugmentationCallback(pl.Callback):
    """After the test epoch, classifies the test images again with ``tta``'s views.

    The views are cut from each test image the test step saw (``datamodule.views_dataloader``,
    in the loader's workers, so a crop reaches the image's border), not from the single view. Logs ``test_tta/acc``, ``test_tta/nll``, ``test_tta/ece`` (15 bins),
    ``test_tta/brier`` and ``test_tta/acc_top5`` (more than 5 classes), computed from all ranks'
    probabilities, so they compare one to one with ``test/*``. After ``trainer.test`` the
    probabilities are in :attr:`outputs` (``probs``, ``targets``, ``rows``, as
    ``ImageClassifier.test_outputs``).

    Works with any module whose forward returns logits or log-probabilities (an
    ``EnsembleClassifier`` too), tested on an :class:`~datamodules.ImageDataModule`.

    __test__ = False  # a class named Test* that pytest must not collect

    Args:
        mode, crop_pct, scales, flip, interpolation, mirror_invariant: the views, as
            :class:`~lightning_modules.tta.TestTimeAugmentation` (``conf/tta/*.yaml``).
        prefix: the logged metrics' prefix.
    """

    def __init__(
        self,
        *,
        mode: str = "five_crop",
        crop_pct: float = 0.875,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        interpolation: str = "bilinear",
        mirror_invariant: bool = True,
        prefix: str = "test_tta",
    ) -> None:
        self.tta = TestTimeAugmentation(
            mode=mode,
            crop_pct=crop_pct,
            scales=scales,
            flip=flip,
            interpolation=interpolation,
            mirror_invariant=mirror_invariant,
        )
        self.prefix = prefix
        self.outputs: dict[str, torch.Tensor] | None = None
        self._rows: list[int] = []

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.outputs, self._rows = None, []

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._rows += batch[2].tolist()  # the rows this rank's test step saw

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # exactly the images of test/* (limit_test_batches; under DDP this rank's share, with
        # the sampler's padding repeats, so every rank gathers as many rows)
        loader = trainer.datamodule.views_dataloader("test", self.tta, rows=self._rows)
        chunks = []
        device = pl_module.device
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for groups, y, rows in loader:
                groups = [g.to(device, non_blocking=True) for g in groups]
                probs = self.tta.probabilities(pl_module, groups)
                chunks.append((probs.detach(), y.to(device), rows.to(device)))
        if not chunks:
            return
        self.outputs = gather_by_row(pl_module, *chunks)
        scores = metrics.summarize(self.outputs["probs"].numpy(), self.outputs["targets"].numpy())
        # identical on every rank (computed from the gathered outputs): no further sync needed
        pl_module.log_dict({f"{self.prefix}/{k}": v for k, v in scores.items()}, on_epoch=True)
