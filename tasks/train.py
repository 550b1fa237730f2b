"""``task=train`` (the default): fit a model, test its best checkpoint, write the run's files.

python run.py                          # one model with conf/config.yaml
python run.py -m seed=1,2,3            # three seeds, then the seed ensemble's report
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from datamodules.errors import UserError
from tasks.instantiate import instantiate, instantiate_all, tta_callback
from tasks.lr_find import resolve_auto_lr
from tasks.outcome import summary
from tasks.seed import seed_run

log = logging.getLogger("run")


def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Fit a model, test its best checkpoint, write ``metrics.json`` and test predictions.

    Returns:
        ``(metrics, objects)``: the final metrics (also in ``<run dir>/metrics.json``) and the
        instantiated ``cfg``, ``datamodule``, ``model`` and ``trainer``.
    """
    from tasks.config_checks import check_config

    check_config(cfg)  # before any data is loaded
    out_dir = Path(cfg.paths.output_dir)
    seed = seed_run(cfg.seed)
    datamodule = instantiate(cfg.data, seed=seed, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    lr = resolve_auto_lr(cfg, datamodule, out_dir)  # model.optimizer.lr=auto: the range test
    if lr is not None:
        seed_run(seed)  # then train exactly as with model.optimizer.lr=<that value>
    model, finetuning = build_model(cfg, datamodule)
    unfreeze = instantiate(finetuning.callback) if finetuning.callback else None
    tta = tta_callback(cfg, datamodule)
    trainer = _trainer(cfg, datamodule, seed, extra=[unfreeze, tta], model=model)

    log.info("Run directory: %s", out_dir)
    warn_if_few_steps(cfg, datamodule)
    fit_data = datamodule
    if finetuning.cache_features:  # frozen backbone: train the head on features computed once
        from datamodules.feature_cache import feature_data
        from lightning_modules.layer_groups import layer_groups

        fit_data = feature_data(
            model,
            datamodule,
            head=layer_groups(model.net)[-1].param_names,
            unfreeze=unfreeze,
            trainer=trainer,
            cache_dir=Path(cfg.paths.data_dir) / "cache" / "features",
        )
    trainer.fit(model, datamodule=fit_data, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    metrics = {"seed": seed, "split_seed": datamodule.split_seed, **_scalars(trainer)}
    if lr is not None:
        metrics["lr"] = lr

    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    if best is None and not trainer.fast_dev_run:  # fast_dev_run turns checkpointing off by design
        log.warning("No best checkpoint (no ModelCheckpoint callback): testing the final weights.")
    # on images (with TTA) even when the head trained on features
    trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
    metrics.update(_scalars(trainer))
    metrics["best_ckpt"] = str(Path(best).relative_to(out_dir)) if best else None
    metrics["epochs"] = trainer.current_epoch
    metrics["finetune"] = finetuning.strategy
    plan = getattr(unfreeze, "plan", None)
    metrics["unfreeze_epochs"] = list(plan.unfreeze_epochs) if plan is not None else None
    if trainer.is_global_zero:
        _write_outputs(
            out_dir, metrics, datamodule=datamodule, model=model, tta=tta, trainer=trainer
        )
    log.info("Seed %s: %s", seed, summary(metrics))
    return metrics, {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}


# fewer optimizer steps than this in a whole run: a head has hardly converged. Measured: 30
# steps (100 images, batch 64, 15 epochs) left probes at 7-34 %; 60 (the ImageNet study at 10
# labels, batch 16) and 100 (the default job) train well
FEW_STEPS = 50


def warn_if_few_steps(cfg: DictConfig, datamodule) -> int | None:
    """One warning when the whole run makes fewer than ``FEW_STEPS`` optimizer steps: with a
    small training set, steps, not epochs, decide whether a head converges (100 images in
    batches of 64 for 15 epochs are 30 steps). Returns the step count (None when the trainer
    limits batches or steps, which is then deliberate)."""
    import math

    t = cfg.trainer
    if t.get("fast_dev_run") or t.get("limit_train_batches", 1.0) not in (1.0, None):
        return None
    if t.get("max_steps", -1) not in (-1, None) or int(t.get("max_epochs") or -1) < 1:
        return None
    n, batch = len(datamodule.datasets["train"]), datamodule.batch_size
    per_epoch = math.ceil(n / batch) // max(1, int(t.get("accumulate_grad_batches") or 1))
    steps = max(1, per_epoch) * int(t.max_epochs)
    if steps < FEW_STEPS:
        smaller = max(8, 2 ** int(math.log2(max(1, n * int(t.max_epochs) / FEW_STEPS))))
        log.warning(
            "This run makes only %d optimizer steps (%d training images, data.batch_size=%d, "
            "trainer.max_epochs=%d): too few for a new head to converge. Lower data.batch_size "
            "(e.g. data.batch_size=%d) or raise trainer.max_epochs.",
            steps,
            n,
            batch,
            int(t.max_epochs),
            min(smaller, batch // 2) if batch > 8 else batch,
        )
    return steps


def _trainer(cfg: DictConfig, datamodule, seed: int, *, extra: list, model=None):
    """The Trainer with the run's loggers and callbacks: the configured ones, the step seed, the
    stop on a non-finite loss, the data contract (with the digest of ``model``'s initial
    backbone weights, which tells whether members can be souped), and ``extra`` (the unfreeze
    and TTA callbacks, None when not used)."""
    from callbacks.data_contract import DataContract
    from callbacks.non_finite_loss import StopOnNonFiniteLoss
    from callbacks.step_seed import StepSeed
    from lightning_modules.data_contract import check_resume
    from tasks.tracking import loggable_config

    loggers = instantiate_all(cfg.get("logger"))
    callbacks = instantiate_all(cfg.get("callbacks"))
    callbacks += [StepSeed(seed), StopOnNonFiniteLoss()]
    contract = DataContract.of_run(cfg, datamodule, Path(cfg.paths.output_dir), model=model)
    if cfg.get("ckpt_path") and Path(str(cfg.ckpt_path)).expanduser().is_dir():
        raise UserError(
            f"ckpt_path={cfg.ckpt_path} is a folder: training resumes from a checkpoint file "
            "(<run>/checkpoints/last.ckpt); to continue a run in its own directory use "
            f"resume={cfg.ckpt_path}."
        )
    if cfg.get("ckpt_path"):  # resuming: the checkpoint must be of this very setting
        # into a new directory, a finished checkpoint would be tested and reported as this run;
        # in its own directory (resume=), a run stopped after its last epoch is finished off
        ckpt = Path(str(cfg.ckpt_path)).expanduser().resolve()
        elsewhere = not ckpt.is_relative_to(Path(cfg.paths.output_dir).resolve())
        max_epochs = cfg.trainer.get("max_epochs") if elsewhere else None
        check_resume(cfg.ckpt_path, contract.contract, max_epochs=max_epochs)
    callbacks += [contract, *(c for c in extra if c is not None)]
    if not loggers:
        callbacks = [c for c in callbacks if type(c).__name__ != "LearningRateMonitor"]
    extra_kwargs = {}
    if cfg.trainer.get("plugins") is None:  # checkpoints written in one pass, atomically
        from lightning_modules.checkpoint_io import FileCheckpointIO

        extra_kwargs["plugins"] = [FileCheckpointIO()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra_kwargs)
    for logger in loggers:
        logger.log_hyperparams(loggable_config(cfg))
    return trainer


def _write_outputs(out_dir: Path, metrics: dict, *, datamodule, model, tta, trainer) -> None:
    """Test predictions (a file per task for multi-task data); for a classifier also its
    validation predictions and the temperatures fitted on them (next to the best checkpoint);
    then ``metrics.json``."""
    from lightning_modules.run_outputs import save_test_results, write_metrics

    if getattr(datamodule, "tasks", None) is not None:
        from lightning_modules.multitask import save_task_predictions

        ids = datamodule.ids("test")
        save_task_predictions(out_dir, "test", model.test_outputs, ids=ids, tasks=model.tasks)
    else:
        save_test_results(out_dir, metrics, datamodule=datamodule, model=model, tta=tta)
        if not trainer.fast_dev_run:  # a smoke test: one batch, nothing to calibrate on
            metrics.update(_calibrate(out_dir, metrics, datamodule, model, tta, trainer))
    write_metrics(out_dir, metrics)


def _calibrate(out_dir: Path, metrics: dict, datamodule, model, tta, trainer) -> dict:
    """Validation predictions of the tested model (on the training device: testing ended by
    moving it to the CPU) and the temperatures fitted on them. A failure here is logged and
    leaves the run finished, without them (the ensemble report then says so)."""
    from lightning_modules.calibration import calibrate_run, tta_setting
    from lightning_modules.run_outputs import save_val_results

    best = metrics.get("best_ckpt")
    try:
        model.to(trainer.strategy.root_device)
        save_val_results(
            out_dir,
            datamodule=datamodule,
            model=model,
            tta=tta.tta if tta is not None else None,
            forward_context=trainer.precision_plugin.forward_context,
        )
        return calibrate_run(
            out_dir,
            checkpoint=out_dir / best if best else None,
            tta=tta_setting(tta.tta if tta is not None else None),
        )
    except Exception:  # noqa: BLE001 - the trained, tested run stands without them
        log.exception("Validation predictions or calibration failed: the run has none")
        return {}
    finally:
        model.cpu()


def build_model(cfg: DictConfig, datamodule):
    """The model for ``datamodule``'s classes, its weights, and the fine-tuning strategy."""
    from lightning_modules.data_contract import check_no_leak
    from lightning_modules.finetune import build_finetuning
    from lightning_modules.weights import load_weights, renew_hub_head

    weights = cfg.model.get("weights")
    has_weights = bool(weights or cfg.model.get("pretrained"))
    if cfg.finetune.get("name") == "scratch" and has_weights:
        pretrained = False  # scratch means random init: don't download what won't be used
    else:
        pretrained = bool(cfg.model.get("pretrained"))
    data_kwargs = _data_kwargs(cfg, datamodule)
    model = instantiate(cfg.model, **data_kwargs, pretrained=pretrained)
    head = {"class_names": data_kwargs.get("class_names"), "tasks": data_kwargs.get("tasks")}
    if pretrained and head["tasks"] is None:
        renew_hub_head(model.net, head["class_names"])
    finetuning = build_finetuning(
        cfg.finetune,
        has_weights=has_weights,
        train_targets=datamodule.datasets["train"].targets,
    )
    log.info("Fine-tuning: %s", finetuning.reason)
    if weights and finetuning.use_weights:
        report = load_weights(model.net, weights, **head)
        check_no_leak(
            report.contract,
            datamodule,
            allow=bool(cfg.get("allow_split_overlap")),
            weights=weights,
        )
    return model, finetuning


def _data_kwargs(cfg: DictConfig, datamodule) -> dict:
    """What the model learns from the data: classes, or the tasks of multi-task data."""
    import inspect

    from hydra.utils import get_class

    tasks = getattr(datamodule, "tasks", None)
    takes_tasks = "tasks" in inspect.signature(get_class(cfg.model._target_)).parameters
    if takes_tasks and tasks is None:
        raise UserError(
            "A multi-task model needs a label column per task: use data=csv (or "
            "experiment=multitask), or model=classifier for this data."
        )
    if tasks is not None and not takes_tasks:
        raise UserError(
            f"This data has several tasks ({', '.join(tasks)}): use model=multitask, whose "
            "heads and losses follow them."
        )
    if tasks is not None:
        return {"tasks": tasks, "_convert_": "all"}
    if datamodule.num_classes < 2:
        raise UserError(
            f"The data has {datamodule.num_classes} class ({datamodule.class_names}): a "
            "classifier needs at least two. Check data.classes, or data.root's class folders."
        )
    return {
        "num_classes": datamodule.num_classes,
        "class_names": datamodule.class_names,
        "_convert_": "all",
    }


def _scalars(trainer) -> dict:
    return {k: float(v) for k, v in trainer.callback_metrics.items()}
