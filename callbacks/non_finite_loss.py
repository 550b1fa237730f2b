"""Lightning callback: a run whose training loss is NaN or infinite stops, with one clear line.

A diverged run (an LR far too high, a bad loss weight) otherwise trains on to the end, tests at
chance level and exits 0, and its checkpoint can become an ensemble member. This callback raises
:class:`~datamodules.errors.UserError` at the first non-finite training loss: the run ends with
exit status 2 (``failed.json`` in a multirun), before any later checkpoint is written, and it
never writes ``metrics.json``, so no report takes it as a member. Under DDP the ranks agree on
the decision, so none is left waiting.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from datamodules.errors import UserError


class StopOnNonFiniteLoss(pl.Callback):
    """Stop training at the first NaN or infinite training loss, or validation loss (weights
    that have blown up after the last training step), before a checkpoint is saved."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        # a skipped batch (None) counts as finite, but this rank still joins the DDP decision
        self._check(trainer, "training", 0.0 if loss is None else loss)

    def on_validation_end(self, trainer, pl_module) -> None:
        # the epoch's val/loss is logged by then (models log it in on_validation_epoch_end), and
        # Lightning runs every ModelCheckpoint's on_validation_end after the other callbacks':
        # a diverged model is never a "best"
        loss = trainer.callback_metrics.get("val/loss")
        if not trainer.sanity_checking:
            self._check(trainer, "validation", 0.0 if loss is None else loss)

    @staticmethod
    def _check(trainer, which: str, loss) -> None:
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        bad = not math.isfinite(value)
        if trainer.world_size > 1:  # every rank takes the same decision
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise UserError(
                f"The {which} loss became {value} at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step} (learning rate {_learning_rates(trainer)}): the run "
                "diverged. Lower model.optimizer.lr (e.g. by 10x) or check the loss weights; "
                "nothing of this run counts as a result."
            )


def _learning_rates(trainer) -> str:
    rates = sorted({g["lr"] for opt in trainer.optimizers for g in opt.param_groups})
    return ", ".join(f"{r:.3g}" for r in rates[:3]) or "unknown"
