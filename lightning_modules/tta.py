"""Test-time augmentation: fixed views of every image, classified together, softmax-averaged.

Views are cut from the image itself (in the data-loading workers, like the eval transform), so
crops reach the image's border and every pixel is interpolated once:

============ ======= ==========================================================================
mode         views   geometry
============ ======= ==========================================================================
none         1       the eval view (resize to ``floor(size / data crop_pct)``, centre crop)
flip         2       the eval view and its mirror image (left-right)
five_crop    5       the whole image resized so its short side is ``floor(size / crop_pct)``
                     (224 -> 256, 32 -> 36), cropped to ``size`` at its top-left, top-right,
                     bottom-left, bottom-right corners and centre: torchvision's ``FiveCrop``
ten_crop     10      the five crops, then the five crops of the mirrored resized image
                     (torchvision's ``TenCrop``): view 5 is the mirror of view 1, 6 of 0,
                     7 of 3, 8 of 2, 9 (centre) of 4
multiscale   S (x2)  the eval view at ``round(size * s)`` for each ``s`` in ``scales``, each
                     also mirrored when ``flip``; needs a backbone that accepts other input
                     sizes (CNNs do; most ViTs do not)
============ ======= ==========================================================================

:meth:`TestTimeAugmentation.image_views` is the per-image transform: an image becomes a list of
view groups ``(V_g, 3, h_g, w_g)``, one per view size, which a DataLoader batches into
``(B, V_g, 3, h_g, w_g)``. :meth:`~TestTimeAugmentation.probabilities` classifies all views of
one size in one forward pass (B x V images); ``multiscale`` needs one pass per scale.
Probabilities, not logits, are averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from datamodules.errors import UserError

MODES = ("none", "flip", "five_crop", "ten_crop", "multiscale")


class TestTimeAugmentation:
    """A fixed set of views and their averaged class probabilities.

    Args:
        mode: ``none``, ``flip``, ``five_crop``, ``ten_crop`` or ``multiscale``.
        crop_pct: five/ten crop: the crop's share of the enlarged image's side.
        scales: multiscale: sizes as multiples of the input size.
        flip: multiscale: add the mirror image at every scale.
        interpolation: resize interpolation (``bilinear``, ``bicubic``, ``nearest``).
        mirror_invariant: whether a mirrored image keeps its class (``data.mirror_invariant``);
            modes that mirror are refused when it does not (mirrored digits are other digits).
    """

    __test__ = False  # a class named Test* that pytest must not collect

    def __init__(
        self,
        *,
        mode: str = "none",
        crop_pct: float = 0.875,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        interpolation: str = "bilinear",
        mirror_invariant: bool = True,
    ) -> None:
        if mode not in MODES:
            raise UserError(f"Unknown tta '{mode}': choose one of {', '.join(MODES)}.")
        if not 0 < float(crop_pct) <= 1:
            raise UserError(f"tta.crop_pct={crop_pct}: use a crop share in (0, 1], e.g. 0.875.")
        self.scales = tuple(float(s) for s in scales)
        if mode == "multiscale" and (not self.scales or min(self.scales) <= 0):
            raise UserError(f"tta.scales={list(scales)}: give one or more positive scales.")
        self.mode, self.crop_pct, self.interpolation = mode, float(crop_pct), interpolation
        self.flip = bool(flip) if mode == "multiscale" else mode in ("flip", "ten_crop")
        if self.flip and not mirror_invariant:
            raise UserError(
                f"tta={mode}{' with flip' if mode == 'multiscale' else ''} mirrors images, but "
                "data.mirror_invariant=false (a mirrored sample may be another class, like a "
                "mirrored digit): use tta=five_crop or multiscale without flip, or set "
                "data.mirror_invariant=true if mirroring keeps every class."
            )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def num_views(self) -> int:
        per_image = {"none": 1, "flip": 2, "five_crop": 5, "ten_crop": 10}
        if self.mode == "multiscale":
            return len(self.scales) * (2 if self.flip else 1)
        return per_image[self.mode]

    def resize_factor(self, eval_crop_pct: float) -> float:
        """The largest short side its views resize an image to, as a multiple of the input size:
        ``1 / tta.crop_pct`` for the crop modes, ``max(scales) / eval_crop_pct`` for multiscale,
        ``1 / eval_crop_pct`` for ``none`` and ``flip`` (how large a decoded image must stay)."""
        if self.mode in ("five_crop", "ten_crop"):
            return 1.0 / self.crop_pct
        scale = max(self.scales) if self.mode == "multiscale" else 1.0
        return scale / eval_crop_pct

    def __repr__(self) -> str:
        extra = (
            f", scales={list(self.scales)}, flip={self.flip}" if self.mode == "multiscale" else ""
        )
        return f"TestTimeAugmentation(mode={self.mode!r}, views={self.num_views}{extra})"

    # ------------------------------------------------------------------ views
    def image_views(
        self,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str | None = None,
        eval_crop_pct: float = 1.0,
    ) -> ImageViews:
        """The per-image transform: image -> list of view groups ``(V_g, 3, h_g, w_g)``.

        ``eval_crop_pct`` is the data's eval crop (for ``none``, ``flip`` and ``multiscale``);
        the crop modes use ``tta.crop_pct``.
        """
        return ImageViews(
            self,
            image_size=int(image_size),
            mean=[float(v) for v in mean],
            std=[float(v) for v in std],
            interpolation=interpolation or self.interpolation,
            eval_crop_pct=float(eval_crop_pct),
        )

    # ------------------------------------------------------------------ prediction
    def probabilities(
        self, model: Callable[[torch.Tensor], torch.Tensor], groups: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Mean over the views of ``softmax(model(view))``: (B, num_classes), float32.

        ``groups`` are the batched view groups ``(B, V_g, C, h_g, w_g)`` of :meth:`image_views`.
        ``model`` returns logits (or log-probabilities: the softmax of those is the same
        distribution). One call per group of same-size views, on all B x V views at once.
        """
        total, count = None, 0
        for views in groups:
            b, v = views.shape[:2]
            probs = model(views.flatten(0, 1)).float().softmax(-1).unflatten(0, (b, v))
            part = probs.sum(1)
            total = part if total is None else total + part
            count += v
        return total / count


class ImageViews:
    """One image (PIL, or a uint8 tensor (C, H, W)) -> its TTA view groups, normalised float.

    Picklable (it runs in data-loader workers). See :class:`TestTimeAugmentation`.
    """

    def __init__(
        self,
        tta: TestTimeAugmentation,
        *,
        image_size: int,
        mean: list[float],
        std: list[float],
        interpolation: str,
        eval_crop_pct: float,
    ) -> None:
        from datamodules.transforms import build_eval_transform

        self.mode, self.flip, self.crop_pct = tta.mode, tta.flip, tta.crop_pct
        self.size, self.mean, self.std = image_size, mean, std
        self.interpolation = interpolation
        sizes = [image_size]
        if self.mode == "multiscale":
            sizes = [max(1, round(image_size * s)) for s in tta.scales]
        # the eval view at each size (none, flip, multiscale)
        self.eval_views = [
            build_eval_transform(
                image_size=size,
                mean=mean,
                std=std,
                interpolation=interpolation,
                crop_pct=eval_crop_pct,
            )
            for size in sizes
        ]

    def __call__(self, image) -> list[torch.Tensor]:
        from torchvision.transforms.v2 import functional as TF

        if self.mode in ("five_crop", "ten_crop"):
            return [self._crops(image)]
        groups = []
        for transform in self.eval_views:
            view = transform(image)
            groups.append(torch.stack([view, TF.horizontal_flip(view)] if self.flip else [view]))
        return groups

    def _crops(self, image) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        from datamodules.transforms import ToRGB

        x = TF.to_image(ToRGB()(image))
        mode = InterpolationMode[self.interpolation.upper()]
        x = TF.resize(x, math.floor(self.size / self.crop_pct), interpolation=mode, antialias=True)
        size = [self.size, self.size]
        crops = TF.ten_crop(x, size) if self.flip else TF.five_crop(x, size)
        views = TF.to_dtype(torch.stack(crops), torch.float32, scale=True)
        return TF.normalize(views, mean=self.mean, std=self.std)

    def __repr__(self) -> str:
        return f"ImageViews(mode={self.mode!r}, size={self.size}, crop_pct={self.crop_pct})"
