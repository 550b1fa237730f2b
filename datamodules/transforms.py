"""Train and eval image transforms (torchvision v2), built from the data and augment configs.

Both pipelines take a PIL image of any mode (RGB, grey, RGBA, palette, ...) or a uint8 tensor
(C, H, W) and return a normalised float tensor of shape (3, image_size, image_size).

Training, in this order (each step as ``augment`` says; see ``conf/augment/none.yaml``)::

    to RGB -> random resized crop | ResNet scale jitter | resize + centre crop
           -> h-flip, v-flip -> affine -> elastic / perspective warp      (uint8, final size)
           -> to float [0, 1] -> colour jitter -> PCA colour jitter -> Normalize

Geometry runs first, on uint8 at the output size (cheap); colour runs on float [0, 1], where the
PCA offset has its intended size. With ``augment.pca.where=device`` the PCA step is not in the
per-image pipeline: :class:`~datamodules.pca_jitter.BatchPCAJitter` applies it to the whole
batch after it reached the device (see ``ImageDataModule.on_after_batch_transfer``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

from datamodules.errors import UserError

# Every augmentation option and its "off" value; conf/augment/none.yaml mirrors this exactly.
AUGMENT_DEFAULTS: dict = {
    "random_resized_crop": None,  # {scale: [lo, hi], ratio: [lo, hi]}
    "scale_jitter": None,  # [lo, hi] x image_size: shorter side, then a random crop
    "hflip": 0.0,
    "vflip": 0.0,
    "color_jitter": {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0},
    "affine": {"p": 0.0, "degrees": 0.0, "translate": 0.0, "shear": 0.0},
    "elastic": {"p": 0.0, "alpha": 30.0, "sigma": 4.0},
    "perspective": {"p": 0.0, "distortion": 0.3},
    "pca": {"sigma": 0.0, "eigen": "fit", "fit_images": 2000, "where": "device", "cache_dir": None},
}
PCA_EIGEN = ("fit", "imagenet")
PCA_WHERE = ("device", "worker")


# ---------------------------------------------------------------------------- options
def augment_options(augment: Mapping | None) -> dict:
    """``augment`` merged over :data:`AUGMENT_DEFAULTS` and checked: a UserError for any mistake.

    A ``null`` block (``color_jitter: null``) means off. Unknown keys are rejected, so a typo
    never silently switches an augmentation off.
    """
    options = copy.deepcopy(AUGMENT_DEFAULTS)
    for key, value in dict(augment or {}).items():
        if key not in options:
            raise UserError(
                f"augment.{key} is not an augmentation option: use one of "
                f"{', '.join(AUGMENT_DEFAULTS)} (conf/augment/none.yaml explains each)."
            )
        default = AUGMENT_DEFAULTS[key]
        if isinstance(default, dict):
            if value is None:
                continue  # null block = off
            if not isinstance(value, Mapping):
                raise UserError(f"augment.{key}={value!r}: give a mapping like {default}.")
            unknown = set(value) - set(default)
            if unknown:
                raise UserError(
                    f"augment.{key} has unknown keys {sorted(unknown)}: use {sorted(default)}."
                )
            options[key].update(value)
        else:
            options[key] = value
    _check(options)
    return options


def _range(name: str, value, *, low: float, high: float | None) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"augment.{name}={value!r}: give two numbers [min, max].") from None
    if not (low <= lo <= hi and (high is None or hi <= high)) or (low == 0 and lo <= 0):
        bound = f"{low} < min <= max" + (f" <= {high}" if high is not None else "")
        raise UserError(f"augment.{name}={[lo, hi]}: use {bound}.")
    return lo, hi


def _probability(name: str, value) -> float:
    p = float(value or 0.0)
    if not 0.0 <= p <= 1.0:
        raise UserError(f"augment.{name}={value}: a probability must be in [0, 1].")
    return p


def _non_negative(name: str, value, *, high: float | None = None) -> float:
    v = float(value or 0.0)
    if v < 0 or (high is not None and v > high):
        top = f", at most {high}" if high is not None else ""
        raise UserError(f"augment.{name}={value}: use a value >= 0{top}.")
    return v


def _check(o: dict) -> None:
    rrc = o["random_resized_crop"]
    if rrc is not None:
        if not isinstance(rrc, Mapping) or set(rrc) - {"scale", "ratio"}:
            raise UserError(
                f"augment.random_resized_crop={rrc!r}: give {{scale: [lo, hi], ratio: [lo, hi]}} "
                "or null."
            )
        o["random_resized_crop"] = {
            "scale": _range(
                "random_resized_crop.scale", rrc.get("scale", (0.08, 1.0)), low=0, high=1
            ),
            "ratio": _range(
                "random_resized_crop.ratio", rrc.get("ratio", (3 / 4, 4 / 3)), low=0, high=None
            ),
        }
    if o["scale_jitter"] is not None:
        o["scale_jitter"] = _range("scale_jitter", o["scale_jitter"], low=1.0, high=None)
        if rrc is not None:
            raise UserError(
                "augment.random_resized_crop and augment.scale_jitter are both set: they are "
                "two ways to crop, set one of them to null."
            )
    o["hflip"], o["vflip"] = _probability("hflip", o["hflip"]), _probability("vflip", o["vflip"])
    cj = o["color_jitter"]
    for k in ("brightness", "contrast", "saturation"):
        cj[k] = _non_negative(f"color_jitter.{k}", cj[k])
    cj["hue"] = _non_negative("color_jitter.hue", cj["hue"], high=0.5)
    af = o["affine"]
    af["p"] = _probability("affine.p", af["p"])
    af["degrees"] = _non_negative("affine.degrees", af["degrees"], high=180)
    af["translate"] = _non_negative("affine.translate", af["translate"], high=1)
    af["shear"] = _non_negative("affine.shear", af["shear"], high=89)
    el = o["elastic"]
    el["p"] = _probability("elastic.p", el["p"])
    el["alpha"] = _non_negative("elastic.alpha", el["alpha"])
    el["sigma"] = _non_negative("elastic.sigma", el["sigma"])
    if el["p"] > 0 and el["sigma"] <= 0:
        raise UserError("augment.elastic.sigma must be > 0: it is the smoothness of the warp.")
    pe = o["perspective"]
    pe["p"] = _probability("perspective.p", pe["p"])
    pe["distortion"] = _non_negative("perspective.distortion", pe["distortion"], high=1)
    pca = o["pca"]
    pca["sigma"] = _non_negative("pca.sigma", pca["sigma"])
    if pca["eigen"] not in PCA_EIGEN:
        raise UserError(
            f"augment.pca.eigen={pca['eigen']!r}: use fit (your training images) or imagenet."
        )
    if pca["where"] not in PCA_WHERE:
        raise UserError(
            f"augment.pca.where={pca['where']!r}: use device (batched after transfer) or worker."
        )
    if int(pca["fit_images"]) < 1:
        raise UserError(f"augment.pca.fit_images={pca['fit_images']}: use at least 1 image.")


def describe_augment(options: Mapping, *, mirror_invariant: bool = True) -> str:
    """One line naming the active training augmentations and their strengths."""
    parts = []
    if rrc := options["random_resized_crop"]:
        parts.append(
            "random resized crop (scale {}-{}, ratio {:.3g}-{:.3g})".format(
                *rrc["scale"], *rrc["ratio"]
            )
        )
    elif sj := options["scale_jitter"]:
        parts.append("scale jitter (short side {:.3g}-{:.3g} x size, random crop)".format(*sj))
    if options["hflip"] and mirror_invariant:
        parts.append(f"h-flip p={options['hflip']:g}")
    if options["vflip"]:
        parts.append(f"v-flip p={options['vflip']:g}")
    cj = {k: v for k, v in options["color_jitter"].items() if v}
    if cj:
        parts.append("colour jitter (" + ", ".join(f"{k} {v:g}" for k, v in cj.items()) + ")")
    if (af := options["affine"])["p"]:
        parts.append(
            f"affine p={af['p']:g} (rot {af['degrees']:g} deg, shift {af['translate']:g}, "
            f"shear {af['shear']:g} deg)"
        )
    if (el := options["elastic"])["p"]:
        parts.append(f"elastic p={el['p']:g} (alpha {el['alpha']:g}, sigma {el['sigma']:g})")
    if (pe := options["perspective"])["p"]:
        parts.append(f"perspective p={pe['p']:g} (distortion {pe['distortion']:g})")
    if (pca := options["pca"])["sigma"]:
        parts.append(
            f"PCA colour jitter sigma={pca['sigma']:g} ({pca['eigen']}, on {pca['where']})"
        )
    return ", ".join(parts) if parts else "none (eval resize + centre crop)"


# ---------------------------------------------------------------------------- steps
class ToRGB:
    """Any image to 3-channel RGB: grey repeated, palette expanded, alpha composited on black.

    Accepts PIL images of any mode and image tensors with 1 (grey), 2 (grey + alpha), 3 or 4
    (RGBA) channels; black is the background, as in the folder source's loader.
    """

    def __call__(self, img):
        import torch
        from PIL import Image

        if isinstance(img, Image.Image):
            if img.mode == "RGB":
                return img
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                img = Image.alpha_composite(black, rgba)
            return img.convert("RGB")
        if not isinstance(img, torch.Tensor) or img.ndim < 3:
            raise TypeError(f"expected a PIL image or a (C, H, W) tensor, got {type(img)}")
        channels = img.shape[-3]
        if channels == 3:
            return img
        if channels in (2, 4):
            color, alpha = img[..., :-1, :, :], img[..., -1:, :, :]
            if img.dtype == torch.uint8:
                color = (color.float() * alpha.float() / 255).round().to(torch.uint8)
            else:
                color = color * alpha
            img = color
        if img.shape[-3] == 1:
            return img.expand(*img.shape[:-3], 3, *img.shape[-2:]).clone()
        if img.shape[-3] == 3:
            return img
        raise ValueError(f"cannot make an RGB image from {channels} channels")

    def __repr__(self) -> str:
        return "ToRGB()"


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    try:
        return InterpolationMode[name.upper()]
    except KeyError:
        raise UserError(
            f"Unknown interpolation '{name}': use bilinear, bicubic or nearest."
        ) from None


class ResizeCenterCrop:
    """Resize the short side to ``floor(image_size / crop_pct)``, then centre-crop ``image_size``:
    torchvision's ``Resize`` + ``CenterCrop``, skipped for an image tensor that is already
    ``image_size`` square when the resize target is ``image_size`` too (both steps would return it
    unchanged; their dispatch alone costs ~20 us per image, most of an in-memory image's cost)."""

    def __init__(self, image_size: int, crop_pct: float, interp) -> None:
        from torchvision.transforms import v2

        self.size, self.resize = int(image_size), math.floor(image_size / crop_pct)
        self.steps = v2.Compose(
            [
                v2.Resize(self.resize, interpolation=interp, antialias=True),
                v2.CenterCrop(self.size),
            ]
        )

    def __call__(self, img):
        import torch

        if (
            self.resize == self.size
            and isinstance(img, torch.Tensor)
            and tuple(img.shape[-2:]) == (self.size, self.size)
        ):
            return img
        return self.steps(img)

    def __repr__(self) -> str:  # names the interpolation: the feature cache keys on it
        return f"ResizeCenterCrop({self.steps!r})"


class ToTensor:
    """A PIL image or a tensor (C, H, W) as a plain uint8 tensor, the pixels untouched: what
    torchvision's ``ToImage`` does, without its ``tv_tensors.Image`` wrapper, whose every later
    operation pays ~10 us of dispatch (torchvision's v2 transforms take a lone plain tensor as the
    image, with the same kernels)."""

    def __call__(self, img):
        import torch

        if isinstance(img, torch.Tensor):
            return img.as_subclass(torch.Tensor) if type(img) is not torch.Tensor else img
        from torchvision.transforms.v2 import functional as TF

        return TF.pil_to_tensor(img)

    def __repr__(self) -> str:
        return "ToTensor()"


class ToFloat:
    """An image tensor to float32 in [0, 1]: the operations of torchvision's
    ``ToDtype(torch.float32, scale=True)`` (bit for bit), as a plain call."""

    def __call__(self, img):
        import torch

        if type(img) is not torch.Tensor:  # a tv_tensors wrapper: plain ops are much cheaper
            img = img.as_subclass(torch.Tensor)
        if img.dtype == torch.float32:
            return img
        if img.is_floating_point() or img.dtype == torch.bool:  # bool: 1 is the maximum
            return img.to(torch.float32)
        return img.to(torch.float32).mul_(1.0 / torch.iinfo(img.dtype).max)

    def __repr__(self) -> str:
        return "ToFloat()"


class Normalize:
    """``(img - mean) / std`` per channel: the operations of torchvision's ``Normalize`` (bit for
    bit) with the constants made once, as a plain call."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        import torch

        if not all(std):
            raise ValueError(f"std {list(std)} has a zero: division by zero")
        self.mean_values, self.std_values = [float(m) for m in mean], [float(s) for s in std]
        self.mean = torch.tensor(self.mean_values, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(self.std_values, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img):
        if not img.is_floating_point():
            raise TypeError(f"Normalize expects a float image tensor, got {img.dtype}")
        mean, std = self.mean, self.std
        if img.dtype != mean.dtype or img.device != mean.device:
            mean, std = mean.to(img), std.to(img)
        return img.sub(mean).div_(std)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean_values}, std={self.std_values})"


# torchvision v2 transforms pay ~10-20 us of dispatch per call and image: the steps that every
# image takes (resize + crop when already sized, to float, normalise) are plain calls instead
def _resize_center_crop(image_size: int, crop_pct: float, interp) -> list:
    return [ResizeCenterCrop(image_size, crop_pct, interp)]


def _to_float() -> list:
    return [ToFloat()]


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list:
    return [Normalize(mean, std)]


# ---------------------------------------------------------------------------- pipelines
def build_eval_transform(
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
    crop_pct: float = 1.0,
    normalize: bool = True,
):
    """Resize the short side to ``floor(image_size / crop_pct)``, centre-crop ``image_size``.

    Deterministic: the same image always gives the same tensor. ``normalize=False`` stops at
    float [0, 1] (for fitting colour statistics and for pictures).
    """
    from torchvision.transforms import v2

    steps = [
        ToRGB(),
        ToTensor(),
        *_resize_center_crop(image_size, crop_pct, _interpolation(interpolation)),
        *_to_float(),
    ]
    if normalize:
        steps += _normalize(mean, std)
    return v2.Compose(steps)


def build_train_transform(
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
    crop_pct: float = 1.0,
    augment: Mapping | None = None,
    mirror_invariant: bool = True,
    color_pca=None,
    normalize: bool = True,
):
    """The per-image training pipeline, as ``augment`` (see :func:`augment_options`) says.

    Without a random crop (``random_resized_crop`` and ``scale_jitter`` both null) images get the
    eval resize + centre crop. Horizontal flips are skipped when the data is not
    ``mirror_invariant`` (a mirrored digit is not the same digit). PCA colour jitter is a step
    here only with ``augment.pca.where=worker``; it uses ``color_pca`` (a
    :class:`~datamodules.pca_jitter.ColorPCA`; the ImageNet constants when ``None`` and
    ``eigen=imagenet``).
    """
    from torchvision.transforms import v2

    o = augment_options(augment)
    steps: list = [ToRGB(), ToTensor()]
    steps += _crop_steps(o, image_size, crop_pct, _interpolation(interpolation))
    steps += _flip_steps(o, mirror_invariant)
    steps += _warp_steps(o)
    steps += _to_float()
    steps += _colour_steps(o, color_pca)
    if normalize:
        steps += _normalize(mean, std)
    return v2.Compose(steps)


def _crop_steps(o: Mapping, image_size: int, crop_pct: float, interp) -> list:
    """Random resized crop, ResNet scale jitter, or (neither set) the eval resize + centre crop."""
    from torchvision.transforms import v2

    if rrc := o["random_resized_crop"]:
        return [
            v2.RandomResizedCrop(
                image_size,
                scale=rrc["scale"],
                ratio=rrc["ratio"],
                interpolation=interp,
                antialias=True,
            )
        ]
    if sj := o["scale_jitter"]:
        lo, hi = (max(image_size, round(f * image_size)) for f in sj)
        return [
            v2.RandomResize(lo, hi + 1, interpolation=interp, antialias=True),
            v2.RandomCrop(image_size, pad_if_needed=True),
        ]
    return _resize_center_crop(image_size, crop_pct, interp)


def _flip_steps(o: Mapping, mirror_invariant: bool) -> list:
    """Horizontal (only for ``mirror_invariant`` data) and vertical flips."""
    from torchvision.transforms import v2

    steps = []
    if o["hflip"] > 0 and mirror_invariant:
        steps.append(v2.RandomHorizontalFlip(p=o["hflip"]))
    if o["vflip"] > 0:
        steps.append(v2.RandomVerticalFlip(p=o["vflip"]))
    return steps


def _warp_steps(o: Mapping) -> list:
    """Affine, elastic and perspective warps, each applied with its probability ``p``."""
    from torchvision.transforms import v2

    warp_interp = v2.InterpolationMode.BILINEAR  # affine/elastic/perspective support no bicubic
    steps = []
    if (af := o["affine"])["p"] > 0:
        affine = v2.RandomAffine(
            degrees=af["degrees"],
            translate=(af["translate"], af["translate"]) if af["translate"] else None,
            shear=af["shear"] or None,
            interpolation=warp_interp,
        )
        steps.append(v2.RandomApply([affine], p=af["p"]))
    if (el := o["elastic"])["p"] > 0:
        elastic = v2.ElasticTransform(
            alpha=el["alpha"], sigma=el["sigma"], interpolation=warp_interp
        )
        steps.append(v2.RandomApply([elastic], p=el["p"]))
    if (pe := o["perspective"])["p"] > 0:
        steps.append(
            v2.RandomPerspective(
                distortion_scale=pe["distortion"], p=pe["p"], interpolation=warp_interp
            )
        )
    return steps


def _colour_steps(o: Mapping, color_pca) -> list:
    """Colour jitter, then PCA colour jitter when it runs in the workers (``where=worker``)."""
    from torchvision.transforms import v2

    from datamodules.pca_jitter import ColorPCA, PCAJitter

    steps = []
    cj = o["color_jitter"]
    if any(cj.values()):
        steps.append(v2.ColorJitter(**{k: (v or None) for k, v in cj.items()}))
    pca = o["pca"]
    if pca["sigma"] > 0 and pca["where"] == "worker":
        if color_pca is None:
            if pca["eigen"] != "imagenet":
                raise ValueError("augment.pca.eigen=fit needs the fitted ColorPCA (color_pca=...)")
            color_pca = ColorPCA.imagenet()
        steps.append(PCAJitter(color_pca, sigma=pca["sigma"]))
    return steps
