"""Train, evaluate and ensemble image classifiers: a thin Hydra shell around pure task functions.

    python run.py                          # train one model with conf/config.yaml
    python run.py -m seed=1,2,3            # three seeds, then the seed ensemble's report
    python run.py task=eval ckpt_path=<run or sweep dir, checkpoint(s)>   # test (an ensemble)
    python run.py task=predict predict.input=<image folder> ckpt_path=...  # -> predictions.csv
    python run.py task=ensemble ensemble.runs=<sweep dir or run dirs>      # report on old runs
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
    from callbacks.data_contract import DataContract
    from callbacks.step_seed import StepSeed
    from lightning_modules.config_checks import check_config
    from lightning_modules.data_contract import check_resume
    from lightning_modules.run_outputs import write_metrics

    check_config(cfg)  # before any data is loaded
    out_dir = Path(cfg.paths.output_dir)
    seed = seed_run(cfg.seed)

    datamodule = instantiate(cfg.data, seed=seed, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    model, finetuning = _build_model(cfg, datamodule)
    loggers = _instantiate_all(cfg.get("logger"))
    callbacks = _instantiate_all(cfg.get("callbacks"))
    callbacks.append(StepSeed(seed))
    contract = DataContract.of_run(cfg, datamodule, out_dir)
    if cfg.get("ckpt_path"):  # resuming: the checkpoint must be of this very setting
        check_resume(cfg.ckpt_path, contract.contract)
    callbacks.append(contract)
    unfreeze = finetuning.make_callback()  # ProgressiveUnfreeze, or None for scratch
    callbacks += [unfreeze] if unfreeze else []
    if not loggers:
        callbacks = [c for c in callbacks if type(c).__name__ != "LearningRateMonitor"]
    tta = tta_callback(cfg, datamodule)
    callbacks += [tta] if tta else []
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(resolved_config(cfg))

    log.info("Run directory: %s", out_dir)
    fit_data = datamodule
    if finetuning.cache_features:  # frozen backbone: train the head on features computed once
        from lightning_modules.feature_cache import feature_data

        fit_data = feature_data(
            model,
            datamodule,
            unfreeze=unfreeze,
            trainer=trainer,
            cache_dir=Path(cfg.paths.data_dir) / "cache" / "features",
        )
    trainer.fit(model, datamodule=fit_data, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    metrics = {
        "seed": seed,
        "split_seed": datamodule.split_seed,
        **_scalars(trainer.callback_metrics),
    }

    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    if best is None:
        log.warning("No best checkpoint (no ModelCheckpoint callback): testing the final weights.")
    # on images (with TTA) even when the head trained on features
    trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
    metrics.update(_scalars(trainer.callback_metrics))
    metrics["best_ckpt"] = str(Path(best).relative_to(out_dir)) if best else None
    metrics["epochs"] = trainer.current_epoch
    metrics["finetune"] = finetuning.strategy

    if trainer.is_global_zero:
        if getattr(datamodule, "tasks", None) is not None:  # multi-task: a file per task
            from lightning_modules.multitask import save_task_predictions

            ids = datamodule.ids("test")
            save_task_predictions(out_dir, "test", model.test_outputs, ids=ids, tasks=model.tasks)
        else:
            save_test_results(out_dir, metrics, datamodule=datamodule, model=model, tta=tta)
        write_metrics(out_dir, metrics)
    summary = ", ".join(
        f"{k}={metrics[k]:.4f}"
        for k in (
            "val/acc_best",
            "test/acc",
            "test/nll",
            "test/ece",
            "test_tta/acc",
            "val/score_best",
            "test/score",
        )
        if k in metrics
    )
    log.info("Seed %s: %s", seed, summary)
    return metrics, {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}


def _build_model(cfg: DictConfig, datamodule):
    """The model for ``datamodule``'s classes, its weights, and the fine-tuning strategy."""
    from lightning_modules.data_contract import check_no_leak
    from lightning_modules.finetune import build_finetuning
    from lightning_modules.layer_groups import layer_groups
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
        n_backbone_groups=len(layer_groups(model.net)) - 1,
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
    return {
        "num_classes": datamodule.num_classes,
        "class_names": datamodule.class_names,
        "_convert_": "all",
    }


# task name -> "module:function"; each takes the composed cfg and returns (metrics, objects).
# Imported only when chosen, so one task's dependencies never slow down another.
TASKS = {
    "train": "run:train",
    "eval": "lightning_modules.evaluate:evaluate",
    "predict": "lightning_modules.predict:predict",
    "ensemble": "lightning_modules.ensemble_report:ensemble_task",
    "preview_augment": "datamodules.preview:preview_augment",
    "visualize": "lightning_modules.visualize:visualize",
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
SEED_RANGE = (0, 2**32 - 1)  # what NumPy accepts


def seed_run(seed: int | None) -> int:
    """Seed python, numpy, torch and data-loader workers; ``None`` draws a seed (and logs it)."""
    import pytorch_lightning as pl

    if seed is not None and not (isinstance(seed, int) and SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise UserError(
            f"seed={seed} is not a valid seed: use an integer from {SEED_RANGE[0]} to "
            f"{SEED_RANGE[1]}, or seed=null for a random one."
        )
    return pl.seed_everything(seed, workers=True)


def tta_callback(cfg: DictConfig, datamodule):
    """The callback that tests with ``cfg.tta`` as well, or None for ``tta=none``."""
    if not cfg.get("tta"):
        return None
    if getattr(datamodule, "tasks", None) is not None:
        log.info("Test-time augmentation averages class probabilities: multi-task runs skip it.")
        return None
    tta = instantiate(
        cfg.tta,
        mirror_invariant=datamodule.mirror_invariant,
        interpolation=datamodule.interpolation,  # resolved (the backbone's when data says null)
    )
    if not tta.enabled:
        return None
    from callbacks.test_time_augmentation import TestTimeAugmentationCallback

    return TestTimeAugmentationCallback(tta)


def save_test_results(out_dir: Path, metrics: dict, *, datamodule, model, tta=None) -> None:
    """Write ``predictions/test.npz`` (and ``test_tta.npz``); add ``test/brier`` to ``metrics``."""
    from lightning_modules.metrics import brier
    from lightning_modules.run_outputs import save_test_outputs

    ids, names = datamodule.ids("test"), datamodule.class_names
    outputs = model.test_outputs
    save_test_outputs(out_dir, "test", outputs, ids=ids, class_names=names)
    metrics["test/brier"] = brier(outputs["probs"].numpy(), outputs["targets"].numpy())
    if tta is not None and tta.outputs is not None:
        save_test_outputs(out_dir, "test_tta", tta.outputs, ids=ids, class_names=names)
        metrics["tta"] = tta.tta.mode


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


def _completed_member(cfg: DictConfig) -> dict | None:
    """In a re-launched multirun, the metrics of a member that already finished (else None)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.get("force") or cfg.task != "train" or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    done = Path(cfg.paths.output_dir) / "metrics.json"
    last = done.parent / "checkpoints" / "last.ckpt"
    if not done.is_file():
        if last.is_file() and not cfg.get("ckpt_path"):  # interrupted: continue where it stopped
            import time

            from omegaconf import open_dict

            log.info("Resuming the interrupted member %s from %s", done.parent, last)
            with open_dict(cfg):
                cfg.ckpt_path = str(last)
                if cfg.get("logger") and cfg.logger.get("csv"):  # keep the earlier metrics.csv
                    cfg.logger.csv.version = time.strftime("resume-%Y-%m-%d_%H-%M-%S")
        return None
    import json

    log.info("Skipping %s: already complete (force=true re-runs it)", done.parent)
    return json.loads(done.read_text())


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


def resume_argv(argv: list[str]) -> list[str]:
    """Turn ``resume=<run dir>`` into the overrides that continue that run where it stopped.

    The run's own overrides (``.hydra/overrides.yaml``) come first, so the composed config is
    the original one; overrides given now come after them and win. The run continues in its own
    directory from ``checkpoints/last.ckpt``; nothing already written is replaced: this launch's
    Hydra files go to ``.hydra/resume-<time>/``, its CSV metrics to ``csv/resume-<time>/``.
    """
    given = [a for a in argv[1:] if a.startswith("resume=")]
    if not given:
        return argv
    import time

    import yaml

    run_dir = Path(given[-1].split("=", 1)[1]).expanduser().resolve()
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file() or not last.is_file():
        raise UserError(
            f"Cannot resume '{run_dir}': it needs .hydra/overrides.yaml and "
            "checkpoints/last.ckpt. Give the directory of a training run that saved a checkpoint."
        )
    fixed = ("resume=", "ckpt_path=", "hydra.run.dir=", "hydra.output_subdir=")
    original = [o for o in yaml.safe_load(saved.read_text()) or [] if not o.startswith(fixed)]
    now = [a for a in argv[1:] if not a.startswith(fixed)]
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    extra = [
        f"hydra.run.dir={run_dir}",
        f"hydra.output_subdir=.hydra/resume-{stamp}",
        f"ckpt_path={last}",
    ]
    if (run_dir / "csv").is_dir():
        extra.append(f"logger.csv.version=resume-{stamp}")
    log.info("Resuming %s from %s", run_dir, last)
    return [argv[0], *original, *now, *extra]


def _record_failure(cfg: DictConfig, err: Exception) -> None:
    """A job of a multirun failed: log why, mark its run directory, let the sweep go on.

    The sweep's end (``callbacks/failed_jobs.py``) names the failed jobs and exits non-zero.
    """
    import traceback

    from lightning_modules.run_outputs import write_failure

    user_error = _user_error(err)
    if user_error is not None:
        log.error("Job failed: %s", user_error)
        write_failure(cfg.paths.output_dir, user_error)
    else:
        log.exception("Job failed: %s: %s", type(err).__name__, err)
        write_failure(cfg.paths.output_dir, err, traceback_text=traceback.format_exc())


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    done = _completed_member(cfg)
    if done is not None:
        return objective(done, cfg.get("optimized_metric"))
    try:
        metrics, _ = run_task(cfg)
    except Exception as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            _record_failure(cfg, err)
            return None  # a failed trial for a sweeper, not the end of the sweep
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
    try:
        sys.argv = resume_argv(sys.argv)
    except UserError as err:
        print(f"Error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    main()
