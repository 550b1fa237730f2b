"""Spatial feature maps of timm networks: any layout to (N, C, h, w), stage activations, filters.

timm networks give their feature maps in one of three layouts: ``NCHW`` (CNNs), ``NHWC``
(``output_fmt == "NHWC"``: MambaOut, Swin, ...) or a token sequence ``(N, T, C)`` (ViTs: prefix
tokens such as the class token, then one token per image patch, row by row).
:func:`as_spatial` turns each into ``(N, C, h, w)``; a token sequence needs the patch grid
(``patch_embed``), and a network without one cannot show where it looks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from datamodules.errors import UserError


def _name(net: nn.Module) -> str:
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(net).__name__)


def patch_grid(net: nn.Module, image_hw: Sequence[int]) -> tuple[int, int] | None:
    """The (rows, columns) of patch tokens for an input of ``image_hw``, or None (no patches)."""
    embed = getattr(net, "patch_embed", None)
    if embed is None:
        return None
    if hasattr(embed, "dynamic_feat_size"):
        rows, cols = embed.dynamic_feat_size(tuple(int(s) for s in image_hw))
        return int(rows), int(cols)
    patch = getattr(embed, "patch_size", None)
    if patch is None:
        return None
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return int(image_hw[0]) // ph, int(image_hw[1]) // pw


def as_spatial(
    net: nn.Module, x: torch.Tensor, image_hw: Sequence[int], *, channels: int | None = None
) -> torch.Tensor:
    """A feature map of ``net`` as ``(N, C, h, w)``, whatever its layout.

    Args:
        x: ``(N, C, h, w)``, ``(N, h, w, C)`` or tokens ``(N, T, C)``.
        image_hw: the input's height and width (to find the patch grid of tokens).
        channels: the map's channel count when known (tells NHWC from NCHW).
    """
    if x.ndim == 4:
        nhwc = getattr(net, "output_fmt", "NCHW") == "NHWC"
        if channels is not None and x.shape[1] != channels and x.shape[-1] == channels:
            nhwc = True
        elif channels is not None and x.shape[1] == channels:
            nhwc = False
        return x.permute(0, 3, 1, 2) if nhwc else x
    if x.ndim == 3:
        grid = patch_grid(net, image_hw)
        prefix = int(getattr(net, "num_prefix_tokens", 0) or 0)
        if grid is None or grid[0] * grid[1] != x.shape[1] - prefix:
            raise UserError(
                f"'{_name(net)}' gives a token sequence of {x.shape[1]} tokens without a known "
                "patch grid, so there is no spatial map to show: use a CNN or a ViT-style "
                "backbone (patch_embed + blocks) for Grad-CAM and activation maps."
            )
        tokens = x[:, prefix:]
        return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
    raise UserError(
        f"'{_name(net)}' gives features of shape {tuple(x.shape)}, not a spatial map: use a CNN "
        "or a ViT-style backbone for Grad-CAM and activation maps."
    )


def stage_names(net: nn.Module) -> list[str]:
    """Names of the modules whose outputs are the network's stages (timm ``feature_info``)."""
    info = getattr(net, "feature_info", None)
    names = [d["module"] for d in info if d.get("module")] if isinstance(info, list) else []
    if not names:
        raise UserError(
            f"'{_name(net)}' does not describe its stages (no timm feature_info): activation "
            "maps need a timm backbone that does (CNNs, ViTs, ConvNeXt, EfficientNet, ...)."
        )
    return names


@torch.no_grad()
def stage_activations(
    net: nn.Module, images: torch.Tensor, *, names: Sequence[str] | None = None
) -> list[tuple[str, torch.Tensor]]:
    """Each stage's output for ``images`` as ``(name, (N, C, h, w))``, via forward hooks.

    The network runs once, in eval mode (its mode is restored afterwards).
    """
    names = list(names or stage_names(net))
    modules = dict(net.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise UserError(f"'{_name(net)}' has no module(s) {missing}: check the stage names.")
    info = {d.get("module"): d.get("num_chs") for d in getattr(net, "feature_info", []) or []}
    captured: dict[str, torch.Tensor] = {}

    def hook(name):
        def store(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            captured[name] = output.detach()

        return store

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    was_training = net.training
    net.eval()
    try:
        net(images)
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    hw = images.shape[-2:]
    return [(n, as_spatial(net, captured[n], hw, channels=info.get(n)).float()) for n in names]


def first_conv(net: nn.Module) -> tuple[str, torch.Tensor]:
    """The first 2-D convolution (the stem or the ViT patch embedding): its name and weights."""
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module.weight.detach().float().cpu()
    raise UserError(f"'{_name(net)}' has no 2-D convolution, so there are no filters to show.")
