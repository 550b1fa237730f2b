"""scikit-learn's handwritten digits, rendered as RGB images: real data that needs no download."""

from __future__ import annotations

import numpy as np

from datamodules.sources.base import Pool, SourceData


class DigitsSource:
    """1,797 handwritten digits (8x8, 17 grey levels, 10 classes) from ``sklearn.datasets``.

    Each image is upsampled with bilinear interpolation to ``image_size`` and repeated over three
    channels, white digit on black, as uint8. Ids are ``"digits/<index>"`` in sklearn's order.
    """

    def __init__(self, *, image_size: int = 32) -> None:
        self.image_size = int(image_size)

    def load(self) -> SourceData:
        import torch
        import torch.nn.functional as F
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # N,1,8,8
        images = F.interpolate(
            images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
        images = images.contiguous()
        targets = digits.target.astype(np.int64)
        pool = Pool(
            load=images.__getitem__,
            targets=targets,
            ids=[f"digits/{i}" for i in range(len(targets))],
        )
        return SourceData(class_names=[str(c) for c in digits.target_names], train=pool)
