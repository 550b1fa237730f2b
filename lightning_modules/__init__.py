"""The LightningModules (``ImageClassifier``, ``MultiTaskModel``, ``EnsembleClassifier``) and
their parts: backbone, layer groups, heads, losses, optimisation, schedules, weights,
checkpoints and the data contract they carry, metrics, test-time augmentation, figures.

It imports nothing from ``callbacks``, ``tasks`` or ``run.py``.
"""


def __getattr__(name: str):
    # lazy: importing this package must not import torch or Lightning
    if name == "ImageClassifier":
        from lightning_modules.image_classifier import ImageClassifier

        return ImageClassifier
    if name == "MultiTaskModel":
        from lightning_modules.multitask import MultiTaskModel

        return MultiTaskModel
    if name == "EnsembleClassifier":
        from lightning_modules.ensemble import EnsembleClassifier

        return EnsembleClassifier
    raise AttributeError(name)


__all__ = ["EnsembleClassifier", "ImageClassifier", "MultiTaskModel"]
