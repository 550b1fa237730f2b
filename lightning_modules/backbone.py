"""Create a timm backbone with a new classification head, with clear errors for bad names."""

from __future__ import annotations

import difflib

from lightning_modules.errors import UserError


def create_backbone(
    *,
    name: str,
    num_classes: int,
    pretrained: bool = False,
    drop_rate: float = 0.0,
    **kwargs,
):
    """``timm.create_model`` with a fresh head of ``num_classes`` outputs.

    ``drop_rate`` is the dropout before the classifier. Unknown names fail with the closest
    timm model names.
    """
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UserError(
            f"Unknown backbone '{name}' for model.backbone.{hint} "
            "List them with: python -c \"import timm; print(timm.list_models('*resnet*'))\""
        )
    return timm.create_model(
        name, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate, **kwargs
    )
