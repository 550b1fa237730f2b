"""Data: sources of labelled images, stratified splits, transforms, caches and the DataModules.

The bottom layer: it imports nothing from ``lightning_modules``, ``callbacks`` or ``tasks``, and
its :mod:`datamodules.errors` is what every package raises a user's mistake with.
"""


def __getattr__(name: str):
    # lazy: importing this package (e.g. for UserError) must not import torch or Lightning
    if name == "ImageDataModule":
        from datamodules.image_datamodule import ImageDataModule

        return ImageDataModule
    if name == "MultiTaskDataModule":
        from datamodules.multitask_datamodule import MultiTaskDataModule

        return MultiTaskDataModule
    raise AttributeError(name)


__all__ = ["ImageDataModule", "MultiTaskDataModule"]
