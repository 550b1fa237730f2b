"""MultiTaskModel: one timm backbone shared by several task heads, trained on a weighted loss.

The network ``net`` is the timm model itself with its classifier replaced by
:class:`~lightning_modules.task_heads.TaskHeads`: ``net(x)`` returns ``{task: output}`` and
``net.get_classifier()`` is the module holding every head. Everything built on timm's structure
works unchanged: layer groups (the heads are the ``head`` group, so progressive unfreezing trains
them first), local weights (a single-task checkpoint's classifier is simply not loaded), the
frozen-feature cache (``forward_head(pre_logits=True)``) and the pictures of ``task=visualize``.

Tasks come from the data (``data=csv``: one column per task), like a classifier's classes; how
their losses are combined is set here (``loss_weighting``, ``loss_weights``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MaxMetric, MeanMetric

from datamodules.errors import UserError
from lightning_modules.backbone import create_backbone
from lightning_modules.loss_weighting import build_loss_weighting
from lightning_modules.optimization import configure_layer_optimizers, layer_param_groups
from lightning_modules.task_heads import TaskHeads, TaskSpec, parse_tasks, task_loss
from lightning_modules.task_metrics import TaskMetrics, metric_names

log = logging.getLogger(__name__)


def attach_heads(net: nn.Module, heads_for: Callable[[int], nn.Module]) -> nn.Module:
    """Replace ``net``'s linear classifier by ``heads_for(in_features)``, in place; return it."""
    classifier = net.get_classifier()
    if not isinstance(classifier, nn.Linear):
        raise UserError(
            f"The classifier of backbone '{type(net).__name__}' is a {type(classifier).__name__}, "
            "not a linear layer, so task heads cannot take its place: choose another backbone."
        )
    heads = heads_for(classifier.in_features)
    for name, module in net.named_modules():
        if module is classifier:
            parent_name, _, attr = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, attr, heads)
            break
    if net.get_classifier() is not heads:
        raise UserError(
            f"Backbone '{type(net).__name__}' does not expose its classifier as a module "
            "attribute, so task heads cannot take its place: choose another backbone."
        )
    return heads


class MultiTaskModel(pl.LightningModule):
    """A timm backbone with one head per task, trained on a weighted sum of masked losses.

    Logs per task ``<stage>/<task>/acc`` and ``<stage>/<task>/loss`` (classification, binary) or
    ``<stage>/<task>/mae``, ``rmse``, ``r2``, ``loss`` (regression), the combined ``<stage>/score``
    (mean of accuracies and R²s: rank checkpoints by ``val/score``), ``val/score_best``,
    ``<stage>/loss`` (the weighted total) and ``train/<task>/weight`` (each loss's factor).
    After ``trainer.test`` the test outputs are in :attr:`test_outputs`.

    Args:
        backbone: timm model name.
        tasks: ``{name: {type, class_names, mean, std}}`` (from the data).
        loss_weighting: ``fixed`` (``loss_weights``) or ``uncertainty`` (Kendall et al. 2018).
        loss_weights: task name → weight of its loss (default 1), for ``fixed``.
        pretrained: load timm's pretrained weights.
        weights: local weights file (loaded by the fine-tuning code).
        drop_rate: dropout before the heads.
        backbone_kwargs: extra arguments for ``timm.create_model``.
        optimizer: partial optimizer, called with the parameter groups.
        scheduler: partial LR schedule, called with the optimizer and ``total_steps``.
    """

    def __init__(
        self,
        *,
        backbone: str,
        tasks: Mapping,
        loss_weighting: str = "fixed",
        loss_weights: Mapping[str, float] | None = None,
        pretrained: bool = False,
        weights: str | None = None,
        drop_rate: float = 0.0,
        backbone_kwargs: dict | None = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
    ) -> None:
        super().__init__()
        self.tasks: dict[str, TaskSpec] = parse_tasks(tasks)
        # plain python types only: checkpoints must load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "backbone": str(backbone),
                "tasks": {name: spec.as_dict() for name, spec in self.tasks.items()},
                "loss_weighting": str(loss_weighting),
                "loss_weights": {str(k): float(v) for k, v in (loss_weights or {}).items()},
                "pretrained": bool(pretrained),
                "weights": str(weights) if weights else None,
                "drop_rate": float(drop_rate),
                "backbone_kwargs": dict(backbone_kwargs or {}),
            }
        )
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        # set by callbacks.ProgressiveUnfreeze before configure_optimizers; None = all trainable
        self.finetune_plan = None
        self.net = create_backbone(
            name=backbone,
            num_classes=1,  # a linear classifier to take the place of
            pretrained=pretrained,
            drop_rate=drop_rate,
            **dict(backbone_kwargs or {}),
        )
        attach_heads(self.net, lambda width: TaskHeads(width, self.tasks))
        self.loss_weighting = build_loss_weighting(loss_weighting, self.tasks, loss_weights)
        if loss_weighting == "uncertainty" and loss_weights:
            log.info("loss_weighting=uncertainty learns the weights: loss_weights are not used.")
        self.train_metrics, self.train_loss = TaskMetrics(self.tasks), MeanMetric()
        self.val_metrics, self.val_loss = TaskMetrics(self.tasks), MeanMetric()
        self.test_metrics, self.test_loss = TaskMetrics(self.tasks), MeanMetric()
        self.val_score_best = MaxMetric()
        self.test_outputs: dict[str, torch.Tensor] | None = None
        self._test_chunks: list[dict[str, torch.Tensor]] = []

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim == 2:  # cached pre-logit features (datamodules.feature_cache)
            x = F.dropout(x, p=self.hparams.drop_rate, training=self.training)
            return self.net.get_classifier()(x)
        out = self.net(x)
        if not isinstance(out, dict):
            raise UserError(
                f"Backbone '{self.hparams.backbone}' changes its classifier's output after the "
                "classifier, so it cannot carry task heads: choose another backbone."
            )
        return out

    def logged_metrics(self, stage: str) -> list[str]:
        """Every metric name this model logs for ``stage`` (train, val, test)."""
        names = [f"{stage}/{k}" for k in metric_names(self.tasks)] + [f"{stage}/loss"]
        if stage == "val":
            names.append("val/score_best")
        if stage == "train":
            names += [f"train/{t}/weight" for t in self.tasks]
        return names

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, labels, _ = batch
        labels = labels.float()
        out = self(x)
        losses, idle = {}, []
        for index, (name, spec) in enumerate(self.tasks.items()):
            loss, count = task_loss(spec, out[name], labels[:, index])
            if count:
                losses[name] = loss
            else:  # no label in this batch: exactly 0, yet the head stays in the graph
                idle.append(loss)
        total = sum(idle, self.loss_weighting(losses))
        getattr(self, f"{stage}_metrics").update(out, labels)
        getattr(self, f"{stage}_loss").update(total.detach(), weight=len(x))
        if stage == "test":
            self._collect(out, labels, batch[2])
        return total

    def _log_epoch(self, stage: str) -> dict[str, float]:
        metrics, loss = getattr(self, f"{stage}_metrics"), getattr(self, f"{stage}_loss")
        values = {f"{stage}/{k}": v for k, v in metrics.compute().items()}
        values[f"{stage}/loss"] = loss.compute()
        metrics.reset()
        loss.reset()
        score = values.pop(f"{stage}/score")
        self.log_dict(values)
        self.log(f"{stage}/score", score, prog_bar=True)
        return {f"{stage}/score": float(score), **{k: float(v) for k, v in values.items()}}

    # ------------------------------------------------------------------ train
    def on_fit_start(self) -> None:
        """Refuse, at once, callbacks that watch a metric this model never logs."""
        known = set(self.logged_metrics("val")) | set(self.logged_metrics("train"))
        for callback in self.trainer.callbacks:
            monitor = getattr(callback, "monitor", None)
            if monitor and monitor not in known:
                raise UserError(
                    f"{type(callback).__name__} watches '{monitor}', which a multi-task model "
                    "does not log: set its monitor to val/score (the combined score, mode max) "
                    "or a task's metric such as val/<task>/acc (e.g. "
                    "callbacks.model_checkpoint.monitor=val/score "
                    "callbacks.early_stopping.monitor=val/score), or use experiment=multitask."
                )

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")
        weights = self.loss_weighting.effective_weights()
        self.log_dict({f"train/{t}/weight": float(w) for t, w in weights.items()})

    # ------------------------------------------------------------------ validation
    def on_train_start(self) -> None:
        self.val_score_best.reset()  # the sanity check must not count as the best epoch

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        score = self._log_epoch("val")["val/score"]
        if not math.isnan(score):
            self.val_score_best(torch.tensor(score))
        self.log("val/score_best", self.val_score_best.compute(), prog_bar=True)

    # ------------------------------------------------------------------ test
    def on_test_epoch_start(self) -> None:
        self._test_chunks = []
        self.test_outputs = None

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def _collect(self, out: dict, labels: torch.Tensor, rows: torch.Tensor) -> None:
        chunk = {"rows": rows.detach(), "labels": labels.detach()}
        for name, spec in self.tasks.items():
            z = out[name].detach().float()
            if spec.type == "classification":
                chunk[name] = z.softmax(dim=-1)
            elif spec.type == "binary":
                p = torch.sigmoid(z)
                chunk[name] = torch.stack([1 - p, p], dim=-1)
            else:
                chunk[name] = z
        self._test_chunks.append(chunk)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
        if not self._test_chunks:
            return
        chunks, self._test_chunks = self._test_chunks, []
        merged = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        if self.trainer.world_size > 1:  # every rank's rows (equal sizes: the sampler pads)
            merged = {k: self.all_gather(v).flatten(0, 1) for k, v in merged.items()}
        order = torch.argsort(merged["rows"], stable=True)
        merged = {k: v[order] for k, v in merged.items()}
        rows = merged["rows"]
        first = torch.ones_like(rows, dtype=torch.bool)
        first[1:] = rows[1:] != rows[:-1]  # drop the distributed sampler's padding repeats
        self.test_outputs = {k: v[first].cpu() for k, v in merged.items()}

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        """Like ``ImageClassifier``: layer groups with their LRs (and the plan's gating)."""
        return configure_layer_optimizers(self, self.param_groups())

    def param_groups(self) -> list[dict]:
        """The network's layer groups; learned loss weights join the heads' group (no decay)."""
        groups = layer_param_groups(self.net, self.finetune_plan)
        extra = list(self.loss_weighting.parameters())
        if extra:
            head = max(g["layer_group"] for g in groups)
            groups.append(
                {
                    "params": extra,
                    "name": "loss_weights",
                    "lr_mult": next(g["lr_mult"] for g in groups if g["layer_group"] == head),
                    "layer_group": head,
                    "weight_decay": 0.0,
                }
            )
        return groups


def save_task_predictions(
    run_dir: str | Path, split: str, outputs: dict, *, ids: list[str], tasks: Mapping[str, TaskSpec]
) -> list[Path]:
    """One predictions file per task, for the images labelled for that task.

    ``predictions/<task>/<split>.npz``: classification and binary tasks in the classifier's
    format (``probs`` N×C, ``targets``, ``ids``, ``class_names``: ``load_predictions(run,
    "<task>/test")`` reads them); regression tasks with ``preds`` and ``targets`` (label units)
    and ``ids``.
    """
    from lightning_modules.run_outputs import save_predictions, save_regression_predictions

    rows = np.asarray(outputs["rows"])
    labels = np.asarray(outputs["labels"], dtype=np.float64)
    written = []
    for index, (name, spec) in enumerate(tasks.items()):
        keep = ~np.isnan(labels[:, index])
        task_ids = [ids[r] for r in rows[keep].tolist()]
        values = np.asarray(outputs[name])[keep]
        targets = labels[keep, index]
        if spec.type == "regression":
            path = save_regression_predictions(
                run_dir, f"{name}/{split}", preds=values, targets=targets, ids=task_ids
            )
        else:
            path = save_predictions(
                run_dir,
                f"{name}/{split}",
                probs=values,
                targets=targets.astype(np.int64),
                ids=task_ids,
                class_names=list(spec.class_names),
            )
        written.append(path)
    return written
