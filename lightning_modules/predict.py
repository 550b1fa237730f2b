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
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from lightning_modules.errors import UserError
from lightning_modules.tta import TestTimeAugmentation

log = logging.getLogger(__name__)


class ImageFiles(Dataset):
    """Images by path: item ``i`` is ``(transformed image, readable, i)``.

    An unreadable file gives the transform of a blank image and ``readable=False`` instead of
    stopping the run.
    """

    def __init__(self, paths: list[Path], transform, image_size: int) -> None:
        self.paths, self.transform, self.image_size = paths, transform, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        from datamodules.sources.folder import load_rgb

        try:
            return self.transform(load_rgb(self.paths[i])), True, i
        except Exception as err:  # a corrupt or non-image file: reported, not fatal
            log.debug("Cannot read %s: %s", self.paths[i], err)
            blank = Image.new("RGB", (self.image_size, self.image_size))
            return self.transform(blank), False, i


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
    from datamodules.sources.folder import IMAGE_EXTENSIONS, list_images
    from lightning_modules.data_contract import input_settings
    from lightning_modules.ensemble import find_checkpoints, load_model
    from run import instantiate, seed_run

    folder = cfg.predict.get("input")
    if not folder or not Path(folder).expanduser().is_dir():
        raise UserError(
            f"predict.input={folder!r} is not a folder: give the folder of images to classify, "
            "e.g. predict.input=~/new_photos."
        )
    folder = Path(folder).expanduser()
    files = list_images(folder)
    if not files:
        raise UserError(
            f"No images in '{folder}' ({', '.join(IMAGE_EXTENSIONS)}): point predict.input at a "
            "folder that holds some (sub-folders are searched too)."
        )
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
    )
    views = tta.image_views(
        image_size=inputs["image_size"],
        mean=inputs["mean"],
        std=inputs["std"],
        interpolation=inputs["interpolation"],
        eval_crop_pct=inputs["crop_pct"],
    )
    loader = DataLoader(
        ImageFiles(files, views, inputs["image_size"]),
        batch_size=max(1, int(data.eval_batch_size or data.batch_size) // tta.num_views),
        num_workers=int(data.num_workers),
        shuffle=False,
    )
    trainer = instantiate(cfg.trainer, callbacks=[], logger=False)
    batches = trainer.predict(Predictor(model, tta), dataloaders=loader)
    probs = torch.cat([b["probs"] for b in batches]).float()
    readable = torch.cat([b["readable"] for b in batches])
    index = torch.cat([b["index"] for b in batches])

    output = Path(cfg.predict.get("output") or Path(cfg.paths.output_dir) / "predictions.csv")
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


def write_csv(
    path: Path, files: list[Path], probs: torch.Tensor, readable: torch.Tensor, class_names
) -> int:
    """One row per readable image: path, predicted class, confidence, per-class probabilities."""
    path.parent.mkdir(parents=True, exist_ok=True)
    confidence, predicted = probs.max(1)
    count = 0
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "predicted", "confidence", *(f"prob_{c}" for c in class_names)])
        for i, file in enumerate(files):
            if not readable[i]:
                continue
            writer.writerow(
                [
                    str(file.resolve()),
                    class_names[int(predicted[i])],
                    f"{float(confidence[i]):.6f}",
                    *(f"{float(p):.6f}" for p in probs[i]),
                ]
            )
            count += 1
    return count
