"""Progressive unfreezing: freeze-then-finetune over timm layer groups, discriminative LRs.

The backbone is split into timm's layer groups (stem → top stage, then the new head; see
``lightning_modules.layer_groups``). Training starts with the head alone; then, on a schedule of
epochs, one more group is unfrozen from the top down. Each group has its own LR multiplier (layer
decay, or the rule of thumb head / upper lr÷10 / rest lr÷100) and warms up when it is unfrozen.

Designed to avoid the known failure modes of freeze/unfreeze callbacks:
- every parameter group exists in the optimizer from the first step (no ``add_param_group``), so
  every LR scheduler covers every group; a frozen group's LR is gated to exactly 0 by the schedule,
  a pure function of the optimizer step;
- which groups are frozen is a pure function of the epoch, re-applied at the start of every epoch,
  so resuming from any checkpoint restores exactly the same state (nothing is re-frozen by mistake);
- frozen groups' BatchNorm layers stay in eval mode (running statistics untouched), including
  across validation and the sanity check;
- single process: frozen parameters get ``requires_grad=False`` (no backward through frozen
  stages). Distributed: every parameter keeps ``requires_grad=True`` (so DDP registers them all
  when wrapping) and the gradients of frozen groups are dropped before each optimizer step, so all
  ranks stay identical after an unfreeze.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from datamodules.errors import UserError
from lightning_modules.layer_groups import LayerGroup, layer_groups

log = logging.getLogger(__name__)

LR_POLICIES = ("layer_decay", "seeds", "uniform")
BN_EVAL = ("frozen", "all", "none")


@dataclass
class UnfreezePlan:
    """Per layer group (stem → head): LR multiplier and the epoch it starts training (None: never)."""

    groups: list[LayerGroup]
    lr_mults: list[float]
    unfreeze_epochs: list[int | None]
    group_warmup_epochs: float = 0.0

    def trainable(self, epoch: int) -> list[bool]:
        return [e is not None and epoch >= e for e in self.unfreeze_epochs]

    def starts(self, steps_per_epoch: int) -> list[tuple[int, int]]:
        """(start step, warm-up steps) per group, for ``lightning_modules.schedules``."""
        from lightning_modules.schedules import NEVER

        ramp = round(self.group_warmup_epochs * steps_per_epoch)
        return [
            (NEVER, 0) if e is None else (e * steps_per_epoch, ramp if e > 0 else 0)
            for e in self.unfreeze_epochs
        ]


def lr_multipliers(
    n_groups: int, *, policy: str, layer_decay: float = 0.5, upper_groups: int = 2
) -> list[float]:
    """Multipliers stem → head (the head, last, always 1).

    ``layer_decay``: ``decay**d`` for the group ``d`` levels below the head.
    ``seeds``: the top ``upper_groups`` backbone groups ÷10, the others ÷100.
    ``uniform``: 1 everywhere.
    """
    depth = [n_groups - 1 - i for i in range(n_groups)]  # head 0, top backbone group 1, ...
    if policy == "layer_decay":
        return [layer_decay**d for d in depth]
    if policy == "seeds":
        return [1.0 if d == 0 else 0.1 if d <= upper_groups else 0.01 for d in depth]
    if policy == "uniform":
        return [1.0] * n_groups
    raise UserError(f"Unknown lr_policy '{policy}': use one of {', '.join(LR_POLICIES)}.")


class ProgressiveUnfreeze(pl.Callback):
    """Freeze-then-finetune schedule over the model's layer groups.

    Args:
        every: unfreeze the next backbone group, top down, every ``every`` epochs (the top group
            at epoch ``every``); ``0`` unfreezes everything from the start (full fine-tuning).
        milestones: explicit epochs instead of ``every``: entry ``j`` unfreezes the ``j``-th group
            from the top. Sorted, non-negative, fewer than the training's epochs.
        max_unfrozen: unfreeze at most this many backbone groups (top ones); ``0`` = linear probe
            (head only, backbone frozen for the whole run); ``None`` = all.
        lr_policy: ``layer_decay``, ``seeds`` or ``uniform`` (see :func:`lr_multipliers`).
        lr_mults: explicit multipliers, one per group stem → head (overrides ``lr_policy``).
        layer_decay: factor per level below the head (``layer_decay`` policy).
        upper_groups: groups at lr/10 under the ``seeds`` policy.
        group_warmup_epochs: linear LR warm-up of a group after it is unfrozen, in epochs.
        bn_eval: which BatchNorm layers stay in eval mode (running statistics unchanged, affine
            parameters still trained where the group trains): ``frozen`` groups' only, ``all``
            of them (the pretrained statistics normalise throughout, so unfreezing a group does
            not change the features the head was trained on), or ``none``.
    """

    def __init__(
        self,
        *,
        every: int | None = 1,
        milestones: Sequence[int] | None = None,
        max_unfrozen: int | None = None,
        lr_policy: str = "uniform",
        lr_mults: Sequence[float] | None = None,
        layer_decay: float = 0.5,
        upper_groups: int = 2,
        group_warmup_epochs: float = 0.5,
        bn_eval: str = "frozen",
    ) -> None:
        super().__init__()
        if milestones is not None:
            milestones = [int(m) for m in milestones]
            if any(m < 0 for m in milestones) or milestones != sorted(milestones):
                raise UserError(
                    f"finetune milestones {milestones} must be non-negative epochs in "
                    "increasing order, e.g. [1, 3, 5]."
                )
        elif every is None or int(every) < 0:
            raise UserError(
                "finetune: give `every` (epochs between unfreezes, >= 0) or `milestones`."
            )
        if lr_policy not in LR_POLICIES and lr_mults is None:
            raise UserError(
                f"Unknown lr_policy '{lr_policy}': use one of {', '.join(LR_POLICIES)}."
            )
        if not 0 < layer_decay <= 1:
            raise UserError(f"layer_decay={layer_decay}: use a factor in (0, 1], e.g. 0.5.")
        self.every = None if every is None else int(every)
        self.milestones = milestones
        self.max_unfrozen = max_unfrozen
        self.lr_policy, self.layer_decay, self.upper_groups = lr_policy, layer_decay, upper_groups
        self.lr_mults = list(lr_mults) if lr_mults is not None else None
        self.group_warmup_epochs = float(group_warmup_epochs)
        if bn_eval not in BN_EVAL:
            raise UserError(f"Unknown bn_eval '{bn_eval}': use one of {', '.join(BN_EVAL)}.")
        self.bn_eval = bn_eval
        self.plan: UnfreezePlan | None = None
        self._applied: list[bool] | None = None

    # ------------------------------------------------------------------ the plan
    def make_plan(self, model: torch.nn.Module, *, max_epochs: int | None = None) -> UnfreezePlan:
        groups = layer_groups(model)
        n_backbone = len(groups) - 1
        if self.milestones is not None:
            if len(self.milestones) > n_backbone:
                raise UserError(
                    f"finetune milestones has {len(self.milestones)} entries but the backbone has "
                    f"{n_backbone} layer groups ({', '.join(g.name for g in groups[:-1])}): "
                    "give at most one milestone per group."
                )
            top_down = list(self.milestones)
        else:
            top_down = [self.every * (j + 1) if self.every else 0 for j in range(n_backbone)]
        if self.max_unfrozen is not None:
            top_down = top_down[: max(0, int(self.max_unfrozen))]
        if max_epochs is not None and max_epochs > 0:
            late = [m for m in top_down if m >= max_epochs]
            if late and self.milestones is not None:
                raise UserError(
                    f"finetune milestones {late} are at or after trainer.max_epochs={max_epochs}: "
                    "those groups would never train; lower them or raise trainer.max_epochs."
                )
            top_down = [m for m in top_down if m < max_epochs]  # `every` past the end: not reached
        epochs: list[int | None] = [None] * n_backbone
        for j, epoch in enumerate(top_down):
            epochs[n_backbone - 1 - j] = epoch
        if self.lr_mults is not None:
            if len(self.lr_mults) != len(groups):
                raise UserError(
                    f"finetune lr_mults has {len(self.lr_mults)} values but the model has "
                    f"{len(groups)} layer groups ({', '.join(g.name for g in groups)}): give one "
                    "per group, stem first, head last."
                )
            mults = [float(m) for m in self.lr_mults]
        else:
            mults = lr_multipliers(
                len(groups),
                policy=self.lr_policy,
                layer_decay=self.layer_decay,
                upper_groups=self.upper_groups,
            )
        return UnfreezePlan(
            groups=groups,
            lr_mults=mults,
            unfreeze_epochs=[*epochs, 0],  # the head trains from the start
            group_warmup_epochs=self.group_warmup_epochs,
        )

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.plan = self.make_plan(pl_module.net, max_epochs=trainer.max_epochs)
        pl_module.finetune_plan = self.plan  # read by configure_optimizers
        self._applied = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.world_size > 1:  # requires_grad stayed True: drop frozen groups' gradients
            for group, on in zip(self.plan.groups, self._applied, strict=True):
                if not on:
                    for p in group.parameters(pl_module.net):
                        p.grad = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and trainer.lr_scheduler_configs and self.plan is not None:
            path = Path(trainer.default_root_dir) / "lr_schedule.png"
            plot_lr_schedule(trainer, path, plan=self.plan)
            log.info("LR of every layer group over training: %s", path)

    def state_dict(self) -> dict:
        plan = self.plan
        return {
            "unfreeze_epochs": list(plan.unfreeze_epochs) if plan else None,
            "lr_mults": list(plan.lr_mults) if plan else None,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("unfreeze_epochs")
        if self.plan is not None and saved is not None and saved != self.plan.unfreeze_epochs:
            log.warning(
                "Resuming with another unfreeze schedule than the checkpoint's (%s, now %s): "
                "the run will not match an uninterrupted one.",
                saved,
                self.plan.unfreeze_epochs,
            )

    # ------------------------------------------------------------------ the state at an epoch
    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Set requires_grad and BatchNorm modes for ``trainer.current_epoch`` (idempotent)."""
        if self.plan is None:
            return
        on = self.set_state(
            pl_module.net,
            trainer.current_epoch,
            training=pl_module.training,
            distributed=trainer.world_size > 1,
        )
        if on != self._applied:
            self._applied = on
            self._log_stage(trainer, pl_module, on)

    def set_state(
        self, net: torch.nn.Module, epoch: int, *, training: bool, distributed: bool = False
    ) -> list[bool]:
        """Freeze/unfreeze ``net``'s groups and set BatchNorm modes as the plan has them at
        ``epoch``; returns which groups train."""
        on = self.plan.trainable(epoch)
        for group, trainable in zip(self.plan.groups, on, strict=True):
            for p in group.parameters(net):
                p.requires_grad_(trainable or distributed)
            if self.bn_eval == "none":
                continue
            bn_trains = trainable and self.bn_eval == "frozen"
            for module in group.modules(net):
                if isinstance(module, _BatchNorm):
                    module.train(bn_trains and training)
        return on

    def _log_stage(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, on: list[bool]
    ) -> None:
        net = pl_module.net
        counts = [sum(p.numel() for p in g.parameters(net)) for g in self.plan.groups]
        trainable = sum(c for c, t in zip(counts, on, strict=True) if t)
        base_lr = _base_lr(pl_module)
        parts = [
            f"{g.name}{'' if t else ' (frozen)'} lr={base_lr * m if t else 0:.2e}"
            for g, m, t in zip(self.plan.groups, self.plan.lr_mults, on, strict=True)
        ]
        log.info(
            "Epoch %d: %d/%d layer groups trainable, %s/%s parameters: %s",
            trainer.current_epoch,
            sum(on),
            len(on),
            f"{trainable:,}",
            f"{sum(counts):,}",
            "; ".join(parts),
        )


def plot_lr_schedule(trainer: pl.Trainer, path: Path, *, plan: UnfreezePlan) -> None:
    """Plot each layer group's LR at every optimizer step (the schedule is a pure function)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scheduler = trainer.lr_scheduler_configs[0].scheduler
    optimizer = scheduler.optimizer
    from lightning_modules.optimization import steps_per_epoch

    total = int(trainer.estimated_stepping_batches)
    epoch_steps = steps_per_epoch(trainer)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    seen = set()
    colours = plt.get_cmap("viridis")
    n = len(plan.groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        index = group.get("layer_group", 0)
        if index in seen:  # the no-decay half of a layer group has the same LR
            continue
        seen.add(index)
        lrs = [group["initial_lr"] * factor(s) for s in range(total)]
        ax.plot(
            range(total), lrs, color=colours(index / max(1, n - 1)), label=plan.groups[index].name
        )
    for epoch in sorted({e for e in plan.unfreeze_epochs if e}):
        ax.axvline(epoch * epoch_steps, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("optimizer step (dashed: a group is unfrozen)")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning rate per layer group")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _base_lr(pl_module: pl.LightningModule) -> float:
    factory = getattr(pl_module, "optimizer_factory", None)
    return float(getattr(factory, "keywords", {}).get("lr", math.nan))
