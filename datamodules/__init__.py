"""Data: sources of labelled images, stratified splits, transforms and the DataModule."""

from datamodules.image_datamodule import ImageDataModule

__all__ = ["ImageDataModule"]
