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

    from lightning_modules.run_outputs import save_predictions, write_metrics

    out_dir = Path(cfg.paths.output_dir)
    seed = pl.seed_everything(cfg.seed, workers=True)  # None -> a random seed, logged

    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(
        cfg.model,
        num_classes=datamodule.num_classes,
        class_names=datamodule.class_names,
        _convert_="all",
    )
    loggers = _instantiate_all(cfg.get("logger"))
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not loggers:
        callbacks = [c for c in callbacks if type(c).__name__ != "LearningRateMonitor"]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(resolved_config(cfg))

    log.info("Run directory: %s", out_dir)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    metrics = {
        "seed": seed,
        "split_seed": datamodule.split_seed,
        **_scalars(trainer.callback_metrics),
    }

    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    if best is None:
        log.warning("No best checkpoint (no ModelCheckpoint callback): testing the final weights.")
    trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
    metrics.update(_scalars(trainer.callback_metrics))
    metrics["best_ckpt"] = str(Path(best).relative_to(out_dir)) if best else None
    metrics["epochs"] = trainer.current_epoch

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


# task name -> "module:function"; each takes the composed cfg and returns (metrics, objects).
# Imported only when chosen, so one task's dependencies never slow down another.
TASKS = {
    "train": "run:train",
    "preview_augment": "datamodules.preview:preview_augment",
}


def run_task(cfg: DictConfig) -> tuple[dict, dict]:
    """Run ``cfg.task`` (pure: no process exit, no Hydra state needed beyond ``cfg``)."""
    import importlib

    target = TASKS.get(cfg.task)
    if target is None:
        raise UserError(f"Unknown task '{cfg.task}': choose one of {', '.join(TASKS)}.")
    module, _, name = target.partition(":")
    task = globals()[name] if module in ("run", "__main__") else None
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
    """The job's config as plain python, interpolations resolved, Hydra's own node left out."""
    return {
        key: OmegaConf.to_container(cfg[key], resolve=True)
        if OmegaConf.is_config(cfg[key])
        else cfg[key]
        for key in cfg
        if key != "hydra"
    }


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
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()
