"""``task=eval``: test one checkpoint, or several as an ensemble, like the end of a training run.

    python run.py task=eval ckpt_path=outputs/train/runs/<run>          # its best checkpoint
    python run.py task=eval ckpt_path=outputs/train/multiruns/<sweep>   # all members: an ensemble
    python run.py task=eval ckpt_path='[a.ckpt,b.ckpt]' tta=ten_crop seed=3

Seeded (``seed``), on the test set the checkpoint was trained for: its data contract holds the
training run's data config, so no data option needs repeating; a ``data.*`` value given on the
command line is applied on top (one warning names what differs from training). Checkpoints
written before contracts existed are tested on ``data`` as composed (a warning says where the
training run's data settings differ). Writes ``metrics.json``
(``test/*``, ``test_tta/*``, ``checkpoints``) and ``predictions/test.npz`` (``test_tta.npz``) in
its run directory, so its output is read like a training run's and can be an ensemble member.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from datamodules.errors import UserError
from tasks.outcome import summary

log = logging.getLogger(__name__)

# data keys that decide which images are tested and which pixels the network sees
DATA_KEYS = (
    "source",
    "root",
    "classes",
    "split_seed",
    "val_fraction",
    "test_fraction",
    "image_size",
    "mean",
    "std",
    "interpolation",
    "eval_crop_pct",
)


def evaluate(cfg: DictConfig) -> tuple[dict, dict]:
    """Test ``cfg.ckpt_path`` (one checkpoint or an ensemble); returns ``(metrics, objects)``."""
    from lightning_modules.checkpoints import find_checkpoints
    from lightning_modules.ensemble import load_model
    from tasks.instantiate import instantiate, instantiate_all, tta_callback
    from tasks.seed import seed_run
    from tasks.tracking import loggable_config

    out_dir = Path(cfg.paths.output_dir)
    seed = seed_run(cfg.seed)
    checkpoints = find_checkpoints(cfg.get("ckpt_path"))
    model, contract = load_model(checkpoints, with_contract=True, same_test_set=True)
    if contract is None:
        warn_if_data_differs(checkpoints, cfg)
    datamodule_config, datamodule = _test_datamodule(cfg, contract, model)

    tta = tta_callback(cfg, datamodule)
    temperatures = _temperatures(cfg, checkpoints, tta)  # calibrate=true: refused before testing
    loggers = instantiate_all(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=[tta] if tta else [], logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(loggable_config(cfg))
    log.info("Run directory: %s", out_dir)
    trainer.test(model, datamodule=datamodule)

    metrics = {
        "seed": seed,
        "split_seed": datamodule.split_seed,
        "checkpoints": [str(p) for p in checkpoints],
        **{k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    if trainer.is_global_zero:
        _write_outputs(out_dir, metrics, datamodule, model, tta, datamodule_config)
        metrics.update(_calibrated(out_dir, temperatures, datamodule))
        if temperatures:
            from lightning_modules.run_outputs import write_metrics

            write_metrics(out_dir, metrics)
    log.info("%s: %s", "Ensemble" if len(checkpoints) > 1 else "Checkpoint", summary(metrics))
    return metrics, {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}


def _temperatures(cfg: DictConfig, checkpoints: list[Path], tta) -> dict[str, float]:
    """``calibrate=true``: the stored temperature per prediction file (``test``, and
    ``test_tta`` with TTA) of these checkpoints (:func:`lightning_modules.calibration.temperature_for`)."""
    if not cfg.get("calibrate"):
        return {}
    from lightning_modules.calibration import calibration_source, temperature_for, tta_setting

    out = {"test": temperature_for(checkpoints, tta=None, file=calibration_source(cfg.calibrate))}
    if tta is not None:
        out["test_tta"] = temperature_for(
            checkpoints, tta=tta_setting(tta.tta), file=calibration_source(cfg.calibrate)
        )
    log.info("Calibrated with the stored temperature(s): %s", out)
    return out


def _calibrated(out_dir: Path, temperatures: dict[str, float], datamodule) -> dict[str, float]:
    """``predictions/<split>_calibrated.npz`` and ``<split>_calibrated/*`` metrics of the saved
    predictions scaled by their temperature (``calibration/temperature``, ``_tta``)."""
    from lightning_modules import metrics as M
    from lightning_modules.calibration import apply_temperature
    from lightning_modules.run_outputs import load_predictions, save_predictions

    out = {}
    for split, temperature in temperatures.items():
        saved = load_predictions(out_dir, split)
        probs = apply_temperature(saved["probs"], temperature)
        save_predictions(
            out_dir,
            f"{split}_calibrated",
            probs=probs,
            targets=saved["targets"],
            ids=saved["ids"].tolist(),
            class_names=saved["class_names"].tolist(),
        )
        suffix = "" if split == "test" else "_tta"
        out[f"calibration/temperature{suffix}"] = temperature
        out.update(
            {f"{split}_calibrated/{k}": v for k, v in M.summarize(probs, saved["targets"]).items()}
        )
    return out


def _test_datamodule(cfg: DictConfig, contract, model):
    """``(data config, datamodule)`` of the test set: the training run's (``contract``) with the
    command line's ``data.*`` on top, set up; a UserError when its classes are not the model's."""
    from lightning_modules.data_contract import data_config_for, warn_if_split_differs
    from tasks.instantiate import instantiate

    datamodule_config = data_config_for(cfg, contract)
    datamodule = instantiate(datamodule_config, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("test")
    warn_if_split_differs(contract, datamodule)
    trained_on = list(model.hparams.get("class_names") or [])
    if trained_on and trained_on != datamodule.class_names:
        raise UserError(
            f"The checkpoint(s) predict classes {trained_on[:20]} but data has "
            f"{datamodule.class_names[:20]}: evaluate on the data the model was trained on."
        )
    return datamodule_config, datamodule


def _write_outputs(out_dir: Path, metrics: dict, datamodule, model, tta, datamodule_config) -> None:
    """Predictions, ``metrics.json`` and the data contract of what was tested, in ``out_dir``."""
    from lightning_modules.data_contract import build_contract, write_run_contract
    from lightning_modules.run_outputs import save_test_results, write_metrics

    save_test_results(out_dir, metrics, datamodule=datamodule, model=model, tta=tta)
    write_metrics(out_dir, metrics)
    # what was tested: an eval run's directory is read like a training run's
    tested = build_contract(
        datamodule, backbone=model.hparams["backbone"], data_config=datamodule_config
    )
    write_run_contract(out_dir, tested, datamodule)


def warn_if_data_differs(checkpoints: list[Path], cfg: DictConfig) -> None:
    """Warn when a checkpoint's training run used other test data or eval pixels than ``cfg``."""
    from omegaconf import OmegaConf

    from tasks.ensemble import flat_setting

    now = _data_setting(flat_setting(cfg))
    for ckpt in checkpoints:
        run_config = ckpt.parent.parent / ".hydra" / "config.yaml"  # <run>/checkpoints/x.ckpt
        if not run_config.is_file():
            continue
        then = _data_setting(flat_setting(OmegaConf.load(run_config)))
        changed = [k for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
        if changed:
            log.warning(
                "%s was trained with other data settings: %s. Pass the training run's data "
                "overrides to test it on the same images and pixels.",
                ckpt,
                "; ".join(f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in changed[:6]),
            )


def _data_setting(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if k.startswith("data.") and k.split(".")[1] in DATA_KEYS}
