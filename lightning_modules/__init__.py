"""LightningModules and the pieces they are built from (backbones, schedules, run outputs)."""


def __getattr__(name: str):
    # lazy: importing this package (e.g. for UserError) must not import torch or Lightning
    if name == "ImageClassifier":
        from lightning_modules.image_classifier import ImageClassifier

        return ImageClassifier
    if name == "MultiTaskModel":
        from lightning_modules.multitask import MultiTaskModel

        return MultiTaskModel
    raise AttributeError(name)


__all__ = ["ImageClassifier", "MultiTaskModel"]
