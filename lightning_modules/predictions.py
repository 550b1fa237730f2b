"""A trained classifier's probabilities on a whole split, outside a Trainer loop.

Used for the validation predictions every training run writes (``predictions/val.npz``, and
``val_tta.npz`` with test-time augmentation), on which temperatures are fitted and soups are
chosen; and by the ensemble report to score soups. One process, every row of the split in data
order, in eval mode, without gradients: the validation loop of a Trainer may be limited
(``limit_val_batches``) or distributed, and logs metrics, neither of which a saved prediction
file may depend on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch


@torch.no_grad()
def predict_split(
    model: torch.nn.Module,
    datamodule,
    split: str,
    *,
    tta=None,
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    rows: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """``{"probs": (N, C) float32, "targets": (N,), "rows": (N,)}`` of ``split`` on the CPU.

    Args:
        model: returns logits (or log-probabilities) for a batch of images.
        datamodule: an image data module (``eval_dataloader``, ``views_dataloader``).
        split: ``"val"`` or ``"test"``.
        tta: a :class:`~lightning_modules.tta.TestTimeAugmentation`: the mean of its views'
            softmaxes instead of the single view.
        forward_context: e.g. a Trainer's ``precision_plugin.forward_context`` (autocast).
        rows: only these rows of the split (those another model was tested on), else all.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    context = forward_context or contextlib.nullcontext
    chunks = []
    try:
        if tta is not None and tta.enabled:
            for groups, y, batch_rows in datamodule.views_dataloader(split, tta, rows=rows):
                with context():
                    probs = tta.probabilities(model, [g.to(device) for g in groups])
                chunks.append((probs.float().cpu(), y, batch_rows))
        else:
            for x, y, batch_rows in datamodule.eval_dataloader(split, rows=rows):
                with context():
                    probs = model(x.to(device)).float().softmax(-1)
                chunks.append((probs.cpu(), y, batch_rows))
    finally:
        model.train(was_training)
    probs, targets, rows = (torch.cat(parts) for parts in zip(*chunks, strict=True))
    order = torch.argsort(rows, stable=True)
    return {"probs": probs[order], "targets": targets[order], "rows": rows[order]}
