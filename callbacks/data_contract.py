"""Lightning callback: every checkpoint of a run carries the run's data contract.

The contract (:mod:`lightning_modules.data_contract`) says what the checkpoint is for: backbone,
classes in order, input settings, mirror invariance, data source and split. It goes into every
checkpoint under ``data_contract`` (with a key per training sample id, for the leak check of a
later fine-tuning run), and into the run directory as ``contract.json`` and ``splits.npz`` when
fitting starts.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from lightning_modules.data_contract import (
    CONTRACT_KEY,
    build_contract,
    checkpoint_contract,
    write_run_contract,
)


class DataContract(pl.Callback):
    """Writes ``contract`` into ``run_dir`` at fit start and into every checkpoint saved.

    Args:
        contract: the run's contract (:func:`lightning_modules.data_contract.build_contract`).
        datamodule: the run's data (its split ids).
        run_dir: where ``contract.json`` and ``splits.npz`` go.
    """

    def __init__(self, contract: dict, *, datamodule, run_dir: str | Path) -> None:
        self.contract = contract
        self.datamodule = datamodule
        self.run_dir = Path(run_dir)
        self._in_checkpoint = checkpoint_contract(contract, datamodule)

    @classmethod
    def of_run(cls, cfg, datamodule, run_dir: str | Path, *, model=None) -> DataContract:
        """The contract of a training run of ``cfg`` on ``datamodule`` (after ``setup``); with
        ``model`` (before training) also the digest of its initial backbone weights."""
        contract = build_contract(datamodule, backbone=cfg.model.backbone, data_config=cfg.data)
        if model is not None:
            from lightning_modules.soup import backbone_digest

            contract["initial_weights"] = backbone_digest(model.net)
        return cls(contract, datamodule=datamodule, run_dir=run_dir)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            write_run_contract(self.run_dir, self.contract, self.datamodule)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CONTRACT_KEY] = self._in_checkpoint
