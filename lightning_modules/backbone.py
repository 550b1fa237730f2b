"""Create a timm backbone with a new classification head, with clear errors for bad names."""

from __future__ import annotations

import difflib

from datamodules.errors import UserError


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
    try:
        return timm.create_model(
            name, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate, **kwargs
        )
    except Exception as err:
        if not pretrained or isinstance(err, (TypeError, UserError)):
            raise
        # no network, no cached copy, or the hub refused: say how to use a local file instead
        raise UserError(
            f"Could not fetch pretrained weights for '{name}' ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:160] if str(err) else 'no details'}). Offline, download "
            "the weights once elsewhere and pass the file: model.pretrained=false "
            "model.weights=/path/to/model.safetensors (a timm state dict or a checkpoint of "
            "this framework)."
        ) from err
