"""Fine-tuning strategies, and the `auto` policy that picks one from the situation.

- ``scratch``: random initialisation, everything trainable at one LR (weights are not loaded).
- ``linear_probe``: backbone frozen for the whole run; only the new head trains (feature
  extraction). Its features can be cached (``cache_features``).
- ``progressive``: head first, then timm layer groups unfrozen from the top on a schedule, each
  with its own LR (``callbacks.progressive_unfreeze``). The head-only stage can train on cached
  features (``cache_features``).
- ``full``: everything trainable from the pretrained init, with discriminative LRs.
- ``auto``: the policy measured in docs/which-strategy-when.md (thresholds are training images
  per class):

  ============================================  ===================================================
  situation                                     strategy
  ============================================  ===================================================
  no pretrained weights                         scratch
  fewer than ``few_per_class``                  linear_probe (too few images to adapt the backbone)
  fewer than ``lots_per_class``                 progressive, every group
  otherwise                                     full (lots of data: fine-tune everything)
  ============================================  ===================================================

  The seeds' rule of thumb had a tier in between (progressive over the top half of the groups);
  measured with ImageNet weights on the digits it loses to unfreezing every group at 50 labels
  per class and is gone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from datamodules.errors import UserError

STRATEGIES = ("scratch", "linear_probe", "progressive", "full", "auto")


@dataclass
class Finetuning:
    """The strategy a run uses, why, and what it needs (a callback, weights, a feature cache)."""

    strategy: str
    reason: str
    # the unfreeze callback's config (``finetune.callback`` with the policy's overrides), which
    # the task instantiates like any other callback; None = everything trainable from the start
    callback: dict | None
    use_weights: bool
    cache_features: bool = False


def choose_strategy(
    *,
    has_weights: bool,
    images_per_class: float,
    few_per_class: int = 5,
    lots_per_class: int = 1000,
) -> tuple[str, dict, str]:
    """The ``auto`` policy: (strategy, callback overrides, one-line reason)."""
    if not 0 <= few_per_class <= lots_per_class:
        raise UserError(
            "finetune thresholds must satisfy 0 <= few_per_class <= lots_per_class "
            f"(got {few_per_class}, {lots_per_class})."
        )
    n = f"{images_per_class:.0f} training images per class"
    if not has_weights:
        return "scratch", {}, "no pretrained weights (model.pretrained=false, model.weights=null)"
    if images_per_class < few_per_class:
        return "linear_probe", {"max_unfrozen": 0}, f"pretrained, {n} < {few_per_class}"
    if images_per_class < lots_per_class:
        return (
            "progressive",
            {"max_unfrozen": None},
            f"pretrained, {few_per_class} <= {n} < {lots_per_class}",
        )
    return (
        "full",
        {"every": 0, "milestones": None, "max_unfrozen": None},
        f"pretrained, {n} >= {lots_per_class}",
    )


def build_finetuning(
    conf: Mapping,
    *,
    has_weights: bool,
    train_targets: np.ndarray,
) -> Finetuning:
    """Resolve the ``finetune`` config (``auto`` included) for this model and data."""
    conf = dict(conf)
    name = conf.get("name")
    if name not in STRATEGIES:
        raise UserError(f"Unknown finetune strategy '{name}': use one of {', '.join(STRATEGIES)}.")
    callback = dict(conf.get("callback") or {})
    cache = bool(conf.get("cache_features", False))
    counts = np.bincount(np.asarray(train_targets))
    per_class = float(counts[counts > 0].mean()) if counts.size else 0.0
    if name == "auto":
        name, overrides, reason = choose_strategy(
            has_weights=has_weights,
            images_per_class=per_class,
            few_per_class=int(conf.get("few_per_class", 5)),
            lots_per_class=int(conf.get("lots_per_class", 1000)),
        )
        reason = f"auto chose {name}: {reason}"
        callback.update(overrides)
    else:
        reason = f"finetune={name}"
        if not has_weights and name != "scratch":
            reason += " on a randomly initialised backbone (no model.weights or model.pretrained)"
    if name == "scratch":
        if has_weights:
            reason += " (weights not loaded: scratch trains from random init)"
        return Finetuning("scratch", reason, None, use_weights=False)
    return Finetuning(
        name,
        reason,
        callback,
        use_weights=True,
        # auto caches for linear_probe only; progressive's head stage when asked for explicitly
        cache_features=cache and (name == "linear_probe" or name == conf.get("name")),
    )
