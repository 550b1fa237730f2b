"""Input size, normalisation, interpolation and eval crop: from the backbone, overridable.

A pretrained backbone must see the normalisation it was trained with, so by default these come
from timm's data config of the backbone (``timm.data.resolve_model_data_config``). timm can resolve
it from the model **name** alone, without building the model, which is what happens here: the data
is set up before the model exists (the model needs the number of classes from the data).

Local weights (``model.weights=``) may have been trained with other inputs than the name's timm
config says (EfficientNet-Lite: mean = std = 0.5). A file that records its inputs - timm's
``pretrained_cfg`` saved beside the state dict (a ``.pth`` dict's ``"pretrained_cfg"``, a
``.safetensors`` metadata entry of that name) or a checkpoint of this framework (its data
contract) - is followed; a file that records nothing gets the name's statistics and one warning.

Precedence, for each of ``image_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``:
a value set in the data config (not ``null``) > the weights file's own record > the backbone's
timm data config > timm's defaults (ImageNet mean/std, 224 px, bicubic, crop 0.875) when the
backbone is unknown to timm.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datamodules.errors import UserError

log = logging.getLogger(__name__)

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class DataConfig:
    """What the transforms need; ``origin`` says where each value came from (for the log)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    origin: dict[str, str] = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        def fmt(v):
            return "(" + ", ".join(f"{x:.4g}" for x in v) + ")" if isinstance(v, tuple) else v

        return ", ".join(
            f"{k}={fmt(getattr(self, k))} [{self.origin.get(k, '?')}]"
            for k in ("image_size", "mean", "std", "interpolation", "crop_pct")
        )


def backbone_data_config(name: str | None) -> tuple[dict, str]:
    """timm's data config for a backbone name, without creating the model.

    Returns ``(config, origin)``; ``config`` has ``input_size``, ``mean``, ``std``,
    ``interpolation``, ``crop_pct``. Names timm does not know (or ``None``) give timm's defaults.
    """
    from timm.data import (
        DEFAULT_CROP_PCT,
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        resolve_data_config,
    )
    from timm.models import get_pretrained_cfg

    pretrained_cfg = None
    if name:
        try:
            pretrained_cfg = get_pretrained_cfg(name)
        except Exception:  # hub names, malformed tags: fall back to the defaults
            pretrained_cfg = None
    if pretrained_cfg is None:
        if name:
            log.info("timm has no data config for '%s': using timm's defaults", name)
        defaults = {
            "input_size": (3, 224, 224),
            "interpolation": "bicubic",
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "crop_pct": DEFAULT_CROP_PCT,
        }
        return defaults, "timm default"
    return resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict()), f"backbone {name}"


def weights_data_config(path: str | Path) -> dict | None:
    """The inputs a weights file says it was trained with, as a timm data config (``input_size``,
    ``mean``, ``std``, ``interpolation``, ``crop_pct``; the keys it has), or None when it says
    nothing (a plain state dict) or cannot be read (the weights loader then names the problem)."""
    path = Path(str(path)).expanduser()
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get("pretrained_cfg")
            return _timm_keys(json.loads(text)) if text else None
        import torch

        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable here means "says nothing"; loading will tell
        return None
    if not isinstance(raw, dict):
        return None
    if isinstance(raw.get("pretrained_cfg"), dict):
        return _timm_keys(raw["pretrained_cfg"])
    contract = raw.get("data_contract")  # a checkpoint of this framework
    if isinstance(contract, dict) and isinstance(contract.get("input"), dict):
        given = contract["input"]
        size = given.get("image_size")
        return _timm_keys({**given, "input_size": (3, size, size) if size else None})
    return None


def _timm_keys(cfg: dict) -> dict:
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct")
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def resolve_data_config(
    *,
    backbone: str | None = None,
    weights: str | Path | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
) -> DataConfig:
    """Explicit values win; every ``None`` is filled from what the ``weights`` file records, then
    from the backbone's timm data config."""
    given = {
        "image_size": image_size,
        "mean": mean,
        "std": std,
        "interpolation": interpolation,
        "crop_pct": crop_pct,
    }
    origin = {k: "data config" for k, v in given.items() if v is not None}
    if weights and len(origin) < len(given):
        _fill_from_weights(given, origin, weights)
    if len(origin) < len(given):
        _fill_from_backbone(given, origin, backbone)
        filled = {k for k, o in origin.items() if o != "data config"}
        if weights and {"mean", "std"} & filled and origin["mean"] != "weights file":
            log.warning(
                "model.weights=%s does not record the normalisation it was trained with: "
                "using %s's mean=%s std=%s; if the weights expect others, set data.mean "
                "and data.std",
                weights,
                origin["mean"],
                _fmt(given["mean"]),
                _fmt(given["std"]),
            )
    interp = _checked_interpolation(given["interpolation"], origin["interpolation"])
    size = int(given["image_size"])
    if size < 1:
        raise UserError(f"data.image_size={size}: use a positive size in pixels (or null).")
    stats = _checked_mean_std(given["mean"], given["std"])
    crop = float(given["crop_pct"])
    if not 0 < crop <= 1:
        raise UserError(f"data.eval_crop_pct={crop}: use a fraction in (0, 1] (1 = no crop).")
    return DataConfig(
        image_size=size,
        mean=stats["mean"],
        std=stats["std"],
        interpolation=interp,
        crop_pct=crop,
        origin=origin,
    )


def _fmt(values) -> str:
    return "[" + ",".join(f"{float(v):.4g}" for v in values) + "]"


def _fill_from_weights(given: dict, origin: dict, weights) -> None:
    """Fill the ``None`` entries of ``given`` that the weights file records (in place)."""
    recorded = weights_data_config(weights) or {}
    if "input_size" in recorded:
        recorded["image_size"] = max(recorded.pop("input_size")[-2:])
    for k, v in recorded.items():
        if k in given and given[k] is None:
            given[k], origin[k] = v, "weights file"


def _fill_from_backbone(given: dict, origin: dict, backbone: str | None) -> None:
    """Fill every ``None`` of ``given`` from the backbone's timm data config (in place), and
    record in ``origin`` where it came from."""
    timm_cfg, timm_origin = backbone_data_config(backbone)
    h, w = timm_cfg["input_size"][-2:]
    from_timm = {
        "image_size": max(h, w),
        "mean": timm_cfg["mean"],
        "std": timm_cfg["std"],
        "interpolation": timm_cfg["interpolation"],
        "crop_pct": timm_cfg["crop_pct"],
    }
    for k, v in given.items():
        if v is None:
            given[k], origin[k] = from_timm[k], timm_origin


def _checked_interpolation(value, origin: str) -> str:
    """``value`` lower-cased; one we do not support is a UserError when the user set it, and
    bicubic when it came from timm."""
    interp = str(value).lower()
    if interp not in INTERPOLATIONS:  # timm may say e.g. "bicubic" or "random"
        if origin == "data config":
            raise UserError(
                f"data.interpolation={value!r} is not supported: use one of "
                f"{', '.join(INTERPOLATIONS)} (or null for the backbone's)."
            )
        interp = "bicubic"
    return interp


def _checked_mean_std(mean, std) -> dict[str, tuple[float, ...]]:
    """``{"mean": ..., "std": ...}`` as tuples of three floats; every std positive."""
    stats = {}
    for key, given in (("mean", mean), ("std", std)):
        values = tuple(float(v) for v in given)
        if len(values) != 3:
            raise UserError(f"data.{key}={list(values)}: give three values, one per RGB channel.")
        stats[key] = values
    if min(stats["std"]) <= 0:
        raise UserError(f"data.std={list(stats['std'])}: every std must be positive.")
    return stats
