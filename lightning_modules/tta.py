"""Test-time augmentation: fixed views of a batch, classified together, softmax-averaged.

Views are made on the device from the batch the network would see anyway (the eval transform's
``size`` x ``size`` images), so single-view and TTA predictions start from the same pixels:

============ ======= ==========================================================================
mode         views   geometry
============ ======= ==========================================================================
none         1       the image
flip         2       the image, its mirror image (left-right)
five_crop    5       the image enlarged to ``floor(size / crop_pct)`` (224 -> 256, 32 -> 36),
                     cropped back to ``size`` at its top-left, top-right, bottom-left,
                     bottom-right corners and centre (torchvision's ``FiveCrop`` order)
ten_crop     10      the five crops, then the five crops of the enlarged mirror image
                     (torchvision's ``TenCrop``): view 5 is the mirror of view 1, 6 of 0,
                     7 of 3, 8 of 2, 9 (centre) of 4
multiscale   S (x2)  the image resized to ``round(size * s)`` for each ``s`` in ``scales``, each
                     also mirrored when ``flip``; needs a backbone that accepts other input
                     sizes (CNNs do; most ViTs do not)
============ ======= ==========================================================================

Views of one size are classified in one forward pass (B x V images); ``multiscale`` needs one
pass per scale. Probabilities, not logits, are averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lightning_modules.errors import UserError

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

    def __repr__(self) -> str:
        extra = (
            f", scales={list(self.scales)}, flip={self.flip}" if self.mode == "multiscale" else ""
        )
        return f"TestTimeAugmentation(mode={self.mode!r}, views={self.num_views}{extra})"

    # ------------------------------------------------------------------ views
    def view_groups(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The views of a batch ``x`` (B, C, H, W): a list of (V_g, B, C, h_g, w_g) tensors.

        All views of a group share one size; only ``multiscale`` gives more than one group.
        """
        from torchvision.transforms.v2 import functional as TF

        if self.mode in ("none", "flip"):
            views = [x, TF.horizontal_flip(x)] if self.flip else [x]
            return [torch.stack(views)]
        size = min(x.shape[-2:])
        if self.mode in ("five_crop", "ten_crop"):
            big = self._resize(x, math.floor(size / self.crop_pct))
            crops = TF.ten_crop(big, [size, size]) if self.flip else TF.five_crop(big, [size, size])
            return [torch.stack(crops)]
        groups = []
        for scale in self.scales:
            image = self._resize(x, max(1, round(size * scale)))
            groups.append(torch.stack([image, TF.horizontal_flip(image)] if self.flip else [image]))
        return groups

    def _resize(self, x: torch.Tensor, short_side: int) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        if min(x.shape[-2:]) == short_side:
            return x
        mode = InterpolationMode[self.interpolation.upper()]
        return TF.resize(x, short_side, interpolation=mode, antialias=True)

    # ------------------------------------------------------------------ prediction
    def probabilities(self, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
        """Mean over the views of ``softmax(model(view))``: (B, num_classes), float32.

        ``model`` returns logits (or log-probabilities: the softmax of those is the same
        distribution). One call per group of same-size views, on all B x V views at once.
        """
        total, count = None, 0
        for views in self.view_groups(x):
            v, b = views.shape[:2]
            probs = model(views.flatten(0, 1)).float().softmax(-1).unflatten(0, (v, b))
            part = probs.sum(0)
            total = part if total is None else total + part
            count += v
        return total / count


def no_tta() -> TestTimeAugmentation:
    return TestTimeAugmentation(mode="none")
