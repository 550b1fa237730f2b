"""``task=predict``: classify a folder of images into a CSV, with one checkpoint or an ensemble.

    python run.py task=predict predict.input=~/new_photos ckpt_path=outputs/train/runs/<run>
    python run.py task=predict predict.input=scans ckpt_path=<sweep dir> tta=none   # an ensemble

Every image below ``predict.input`` (any depth; jpg, png, bmp, gif, tif, webp, ppm, pgm) gets a
row: ``path``, ``predicted`` (class name), ``confidence`` (its probability), then one
``prob_<class>`` column per class. Images get the input settings the checkpoint was trained with
(its data contract: size, normalisation, interpolation, crop; a ``data.*`` value given on the
command line wins, with a warning) and the test-time augmentation of ``tta``; several
checkpoints average their probabilities. Files that cannot be read as images are left out with a
warning.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from datamodules.errors import UserError
from lightning_modules.tta import TestTimeAugmentation

log = logging.getLogger(__name__)


class Predictor(pl.LightningModule):
    """Class probabilities of ``model`` (logits or log-probabilities out) with ``tta``'s views."""

    def __init__(self, model: torch.nn.Module, tta: TestTimeAugmentation) -> None:
        super().__init__()
        self.model, self.tta = model, tta

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        groups, readable, index = batch
        return {
            "probs": self.tta.probabilities(self.model, groups),
            "readable": readable,
            "index": index,
        }


def predict(cfg: DictConfig) -> tuple[dict, dict]:
    """Write the predictions CSV; returns ``({"predictions": csv path, ...}, objects)``."""
    from datamodules.image_files import image_files
    from lightning_modules.checkpoints import find_checkpoints
    from lightning_modules.data_contract import input_settings
    from lightning_modules.ensemble import load_model
    from tasks.instantiate import instantiate
    from tasks.seed import seed_run

    folder, files = image_files(cfg.predict.get("input"), option="predict.input")
    output = output_file(cfg)  # checked before any work: predictions are never lost
    seed_run(cfg.seed)
    checkpoints = find_checkpoints(cfg.get("ckpt_path"))
    model, contract = load_model(checkpoints, with_contract=True)
    class_names = list(model.hparams.get("class_names") or range(model.hparams["num_classes"]))
    data = cfg.data
    inputs = input_settings(contract, data, backbone=model.hparams.get("backbone"))
    tta = instantiate(
        cfg.tta,
        mirror_invariant=inputs["mirror_invariant"],
        interpolation=inputs["interpolation"],
    ).tta  # the views only: predict has no test step to hook into
    temperature = _temperature(cfg, checkpoints, tta)  # before predicting: refused early
    loader = _loader(files, inputs, tta, data)
    trainer = instantiate(cfg.trainer, callbacks=[], logger=False)
    batches = trainer.predict(Predictor(model, tta), dataloaders=loader)
    probs = torch.cat([b["probs"] for b in batches]).float()
    if temperature is not None:
        probs = _calibrated(probs, temperature)
    readable = torch.cat([b["readable"] for b in batches])
    index = torch.cat([b["index"] for b in batches])

    rows = write_csv(output, [files[i] for i in index.tolist()], probs, readable, class_names)
    skipped = [
        str(files[i]) for i, ok in zip(index.tolist(), readable.tolist(), strict=True) if not ok
    ]
    if skipped:
        log.warning(
            "%d file(s) could not be read as images and were left out: %s%s",
            len(skipped),
            ", ".join(skipped[:10]),
            " ..." if len(skipped) > 10 else "",
        )
    log.info("Predictions for %d images (tta=%s): %s", rows, tta.mode, output)
    metrics = {"predictions": str(output), "images": rows, "unreadable": len(skipped)}
    return metrics, {"cfg": cfg, "model": model, "trainer": trainer, "probs": probs}


def _temperature(cfg: DictConfig, checkpoints: list[Path], tta) -> float | None:
    """``calibrate=true``: the temperature stored for these checkpoints and this TTA."""
    if not cfg.get("calibrate"):
        return None
    from lightning_modules.calibration import calibration_source, temperature_for, tta_setting

    return temperature_for(
        checkpoints,
        tta=tta_setting(tta),
        file=calibration_source(cfg.calibrate),
    )


def _loader(files: list[Path], inputs: dict, tta, data) -> DataLoader:
    """The files with ``tta``'s views of each, in the checkpoint's input settings."""
    from datamodules.image_files import ImageFiles

    views = tta.image_views(
        image_size=inputs["image_size"],
        mean=inputs["mean"],
        std=inputs["std"],
        interpolation=inputs["interpolation"],
        eval_crop_pct=inputs["crop_pct"],
    )
    decode = _decode(inputs, tta, on=data.get("draft_decode", True))
    return DataLoader(
        ImageFiles(files, views, blank_size=inputs["image_size"], min_short_side=decode),
        batch_size=max(1, int(data.eval_batch_size or data.batch_size) // tta.num_views),
        num_workers=int(data.num_workers),
        shuffle=False,
    )


def _decode(inputs: dict, tta, *, on: bool) -> int | None:
    """The short side a photo must keep when decoded for these views (JPEG draft decoding,
    ``data.draft_decode``), as the data module's eval splits do."""
    from datamodules.image_datamodule import keep_short_side

    if not on:
        return None
    factor = max(1.0, tta.resize_factor(float(inputs["crop_pct"])))
    return keep_short_side(int(inputs["image_size"]) * factor)


def _calibrated(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    from lightning_modules.calibration import apply_temperature

    log.info("Probabilities calibrated with temperature %.4f.", temperature)
    return torch.from_numpy(apply_temperature(probs.numpy(), temperature)).float()


def output_file(cfg: DictConfig) -> Path:
    """Where the CSV goes (``predict.output``, else ``<run dir>/predictions.csv``), refused
    before predicting when it cannot be written: a folder, or a folder that cannot be made."""
    given = cfg.predict.get("output")
    path = (
        Path(str(given)).expanduser() if given else Path(cfg.paths.output_dir) / "predictions.csv"
    )
    if path.is_dir():
        raise UserError(
            f"predict.output={str(given)!r} is a folder: give a file name, e.g. "
            f"predict.output={path / 'predictions.csv'}."
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"Cannot write predictions to '{path}' ({err.strerror}): set predict.output to a "
            "file in a folder you can write to."
        ) from err
    if not os.access(path.parent, os.W_OK):
        raise UserError(
            f"Cannot write predictions to '{path}' (the folder is not writable): set "
            "predict.output to a file in a folder you can write to."
        )
    return path


def write_csv(
    path: Path, files: list[Path], probs: torch.Tensor, readable: torch.Tensor, class_names
) -> int:
    """One row per readable image: path, predicted class, confidence, per-class probabilities;
    written atomically (``run_outputs.atomic_write``), so ``path`` is never half-written."""
    from lightning_modules.run_outputs import atomic_write

    confidence, predicted = probs.max(1)
    rows = [
        [
            str(file.resolve()),
            class_names[int(predicted[i])],
            f"{float(confidence[i]):.6f}",
            *(f"{float(p):.6f}" for p in probs[i]),
        ]
        for i, file in enumerate(files)
        if readable[i]
    ]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(
                ["path", "predicted", "confidence", *(f"prob_{c}" for c in class_names)]
            )
            writer.writerows(rows)

    atomic_write(path, write)
    return len(rows)
