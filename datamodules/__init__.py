"""Data: sources of labelled images, stratified splits, transforms and the DataModules."""

from datamodules.image_datamodule import ImageDataModule
from datamodules.multitask_datamodule import MultiTaskDataModule

__all__ = ["ImageDataModule", "MultiTaskDataModule"]
