"""Train and eval image transforms (torchvision v2), built from the data and augment configs.

Both pipelines take an RGB PIL image or a uint8 tensor (3, H, W) and return a normalised float
tensor of shape (3, image_size, image_size).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    try:
        return InterpolationMode[name.upper()]
    except KeyError:
        raise ValueError(
            f"Unknown interpolation '{name}': use bilinear, bicubic or nearest."
        ) from None


def _to_float_and_normalize(mean: Sequence[float], std: Sequence[float]) -> list:
    import torch
    from torchvision.transforms import v2

    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def build_eval_transform(
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
    crop_pct: float = 1.0,
):
    """Resize the short side to ``floor(image_size / crop_pct)``, centre-crop ``image_size``.

    Deterministic: the same image always gives the same tensor.
    """
    from torchvision.transforms import v2

    resize = math.floor(image_size / crop_pct)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize, interpolation=_interpolation(interpolation), antialias=True),
            v2.CenterCrop(image_size),
            *_to_float_and_normalize(mean, std),
        ]
    )


def build_train_transform(
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
    crop_pct: float = 1.0,
    augment: Mapping | None = None,
    mirror_invariant: bool = True,
):
    """The training pipeline: random resized crop and horizontal flip, as ``augment`` says.

    With no random crop configured, images get the eval resize + centre crop. Flips are skipped
    when the data is not ``mirror_invariant`` (a mirrored digit is not the same digit).
    """
    from torchvision.transforms import v2

    augment = dict(augment or {})
    interp = _interpolation(interpolation)
    steps: list = [v2.ToImage()]
    rrc = augment.get("random_resized_crop")
    if rrc:
        steps.append(
            v2.RandomResizedCrop(
                image_size,
                scale=tuple(rrc.get("scale", (0.08, 1.0))),
                ratio=tuple(rrc.get("ratio", (3 / 4, 4 / 3))),
                interpolation=interp,
                antialias=True,
            )
        )
    else:
        steps += [
            v2.Resize(math.floor(image_size / crop_pct), interpolation=interp, antialias=True),
            v2.CenterCrop(image_size),
        ]
    hflip = float(augment.get("hflip", 0.0) or 0.0)
    if hflip > 0 and mirror_invariant:
        steps.append(v2.RandomHorizontalFlip(p=hflip))
    steps += _to_float_and_normalize(mean, std)
    return v2.Compose(steps)
