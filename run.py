"""Train, evaluate and ensemble image classifiers: a thin Hydra shell around pure task functions.

    python run.py                          # train one model with conf/config.yaml
    python run.py -m seed=1,2,3            # three seeds: a seed ensemble
    python run.py model.backbone=resnet50 data=folder data.root=~/pets
    python run.py --help                   # config groups and options
    python run.py --cfg job                # the composed config, without running

Only Hydra and OmegaConf are imported here at start-up: torch, Lightning and timm are imported
by the task that needs them, so ``--help`` and ``--cfg`` answer at once.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import uuid
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lightning_modules.errors import UserError

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

# A short random id in every run and sweep directory name: two runs started in the same second
# never share a directory. Cached per config, and Hydra copies the cache into every job of a
# sweep, so all jobs of one multirun agree on their sweep directory.
OmegaConf.register_new_resolver(
    "run_id", lambda: uuid.uuid4().hex[:6], use_cache=True, replace=True
)

log = logging.getLogger("run")


# ---------------------------------------------------------------------------- tasks
def train(cfg: DictConfig) -> tuple[dict, dict]:
    """Fit a model, test its best checkpoint, write ``metrics.json`` and test predictions.

    Returns:
        ``(metrics, objects)``: the final metrics (also in ``<run dir>/metrics.json``) and the
        instantiated ``cfg``, ``datamodule``, ``model`` and ``trainer``.
    """
    import pytorch_lightning as pl

    from callbacks.step_seed import StepSeed
    from lightning_modules.run_outputs import save_predictions, write_metrics

    out_dir = Path(cfg.paths.output_dir)
    seed = pl.seed_everything(cfg.seed, workers=True)  # None -> a random seed, logged

    datamodule = instantiate(cfg.data, seed=seed, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    model, finetuning = _build_model(cfg, datamodule)
    loggers = _instantiate_all(cfg.get("logger"))
    callbacks = _instantiate_all(cfg.get("callbacks"))
    callbacks.append(StepSeed(seed))
    if finetuning.callback_kwargs is not None:
        callbacks.append(finetuning.make_callback())
    if not loggers:
        callbacks = [c for c in callbacks if type(c).__name__ != "LearningRateMonitor"]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(resolved_config(cfg))

    log.info("Run directory: %s", out_dir)
    fit_data = datamodule
    if finetuning.cache_features:  # frozen backbone: train the head on features computed once
        from lightning_modules.feature_cache import FeatureDataModule, cached_features

        features = cached_features(
            model.net, datamodule, cache_dir=Path(cfg.paths.data_dir) / "cache" / "features"
        )
        fit_data, model.inputs = FeatureDataModule(features, datamodule), "features"
    trainer.fit(model, datamodule=fit_data, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    metrics = {
        "seed": seed,
        "split_seed": datamodule.split_seed,
        **_scalars(trainer.callback_metrics),
    }

    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    if best is None:
        log.warning("No best checkpoint (no ModelCheckpoint callback): testing the final weights.")
    trainer.test(model, datamodule=fit_data, ckpt_path=best, weights_only=True)
    model.inputs = "images"
    metrics.update(_scalars(trainer.callback_metrics))
    metrics["best_ckpt"] = str(Path(best).relative_to(out_dir)) if best else None
    metrics["epochs"] = trainer.current_epoch
    metrics["finetune"] = finetuning.strategy

    if trainer.is_global_zero:
        outputs = model.test_outputs
        ids = datamodule.ids("test")
        save_predictions(
            out_dir,
            "test",
            probs=outputs["probs"].numpy(),
            targets=outputs["targets"].numpy(),
            ids=[ids[r] for r in outputs["rows"].tolist()],
            class_names=datamodule.class_names,
        )
        write_metrics(out_dir, metrics)
    summary = ", ".join(
        f"{k}={metrics[k]:.4f}"
        for k in ("val/acc_best", "test/acc", "test/nll", "test/ece")
        if k in metrics
    )
    log.info("Seed %s: %s", seed, summary)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}


def _build_model(cfg: DictConfig, datamodule):
    """The model for ``datamodule``'s classes, its weights, and the fine-tuning strategy."""
    from lightning_modules.finetune import build_finetuning
    from lightning_modules.layer_groups import layer_groups
    from lightning_modules.weights import load_weights

    weights = cfg.model.get("weights")
    has_weights = bool(weights or cfg.model.get("pretrained"))
    if cfg.finetune.get("name") == "scratch" and has_weights:
        pretrained = False  # scratch means random init: don't download what won't be used
    else:
        pretrained = bool(cfg.model.get("pretrained"))
    model = instantiate(
        cfg.model,
        num_classes=datamodule.num_classes,
        class_names=datamodule.class_names,
        pretrained=pretrained,
        _convert_="all",
    )
    finetuning = build_finetuning(
        cfg.finetune,
        has_weights=has_weights,
        train_targets=datamodule.datasets["train"].targets,
        n_backbone_groups=len(layer_groups(model.net)) - 1,
    )
    log.info("Fine-tuning: %s", finetuning.reason)
    if weights and finetuning.use_weights:
        load_weights(model.net, weights)
    return model, finetuning


# task name -> "module:function"; each takes the composed cfg and returns (metrics, objects).
# Imported only when chosen, so one task's dependencies never slow down another.
TASKS = {
    "train": "run:train",
}


def run_task(cfg: DictConfig) -> tuple[dict, dict]:
    """Run ``cfg.task`` (pure: no process exit, no Hydra state needed beyond ``cfg``)."""
    import importlib

    target = TASKS.get(cfg.task)
    if target is None:
        raise UserError(f"Unknown task '{cfg.task}': choose one of {', '.join(TASKS)}.")
    module, _, name = target.partition(":")
    # in a joblib/submitit worker this function arrives pickled, without run.py's globals:
    # then `run` is imported like any other module
    task = globals().get(name) if module in ("run", "__main__") else None
    if task is None:
        task = getattr(importlib.import_module(module), name)
    return task(cfg)


# ---------------------------------------------------------------------------- helpers
def instantiate(conf, **kwargs):
    """``hydra.utils.instantiate``, re-raising a user mistake as the :class:`UserError` it is."""
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(conf, **kwargs)
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        raise user_error from err


def _instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every entry of a dict of named configs (``None`` entries are switched off)."""
    if not group:
        return []
    return [
        instantiate(conf, _convert_="all")
        for conf in group.values()
        if isinstance(conf, DictConfig) and "_target_" in conf
    ]


def resolved_config(cfg: DictConfig) -> dict:
    """The job's config as plain python, interpolations resolved, Hydra's own node left out,
    environment variables never read into it and secrets masked (what loggers record)."""
    from lightning_modules.tracking import loggable_config

    return loggable_config(cfg)


def _user_error(err: BaseException | None) -> UserError | None:
    """The UserError behind ``err`` (Hydra wraps errors raised while instantiating)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _scalars(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items()}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics, _ = run_task(cfg)
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", user_error)
        print(f"Error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None
    return objective(metrics, cfg.get("optimized_metric"))


def objective(metrics: dict, metric: str | None) -> float | None:
    """The value returned to a sweeper: ``metrics[metric]``, or None when it is missing or not
    finite. Optuna records None as a failed trial and goes on; a NaN would end the search."""
    value = metrics.get(metric) if metric else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


if __name__ == "__main__":
    main()
