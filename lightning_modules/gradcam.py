"""Grad-CAM: where in the image the evidence for a class lies (Selvaraju et al. 2017).

For a class score ``y`` (the pre-softmax logit) and the network's last feature map ``A`` (``K``
channels of ``h × w``), Grad-CAM weighs each channel by the spatial mean of its gradient,

    α_k = mean_ij ∂y/∂A_k[i, j],      map = ReLU(Σ_k α_k A_k),

then upsamples the ``h × w`` map bilinearly to the input's size and divides it by its maximum:
``1`` marks the strongest evidence for the class, ``0`` none. ``method="hirescam"`` (Draelos &
Carin 2020) weighs element-wise instead, ``ReLU(Σ_k ∂y/∂A_k ⊙ A_k)``: it shows exactly the
positions the score depends on, where Grad-CAM's averaged weights can also light up other places
with the same features. For the usual head (global average pooling, then a linear layer) the two
are the same map, and both equal CAM (Zhou et al. 2016).

The feature map is:
- CNNs: the output of ``forward_features`` (the input of ``forward_head``);
- ViTs: the tokens entering the last transformer block, reshaped to the patch grid. The last
  block's output cannot be used with a class-token head: the head reads only the class token, so
  every patch token's gradient there is zero.
- any stage (``layer``, e.g. ``layer3``): its output. :func:`choose_layer` picks the deepest stage
  with a useful resolution when the last map is too coarse (1×1 for a 32-pixel image).
Networks whose features have no spatial layout fail with a :class:`UserError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from datamodules.errors import UserError
from lightning_modules.feature_maps import as_spatial

METHODS = ("gradcam", "hirescam")


@dataclass
class CamResult:
    """Heatmaps and what they explain.

    Attributes:
        heatmaps: ``(N, H, W)`` in ``[0, 1]``, at the input's resolution.
        classes: ``(N,)`` the class each heatmap explains.
        logits: ``(N, C)`` the network's scores for the images.
        grid: ``(h, w)`` of the feature map the heatmaps come from.
        layer: where that feature map is taken (for titles).
    """

    heatmaps: torch.Tensor
    classes: torch.Tensor
    logits: torch.Tensor
    grid: tuple[int, int]
    layer: str


def _token_blocks(net: nn.Module) -> nn.Module | None:
    blocks = getattr(net, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0:
        return blocks[-1]
    return None


def choose_layer(net: nn.Module, image_hw: tuple[int, int], *, min_grid: int = 4) -> str | None:
    """The stage to explain: None (the last feature map) unless it has fewer than ``min_grid``
    cells on a side for this input size; then the deepest stage (timm ``feature_info``) that has.

    A 1×1 map (a 32-pixel image through a stride-32 network) gives a constant heatmap; an earlier,
    finer stage still shows where the evidence is.
    """
    info = [d for d in (getattr(net, "feature_info", None) or []) if d.get("module")]
    side = min(int(s) for s in image_hw)
    if not info or side // int(info[-1].get("reduction", 1)) >= min_grid:
        return None
    fine = [d for d in info if side // int(d.get("reduction", 1)) >= min_grid]
    return fine[-1]["module"] if fine else info[0]["module"]


def grad_cam(
    net: nn.Module,
    images: torch.Tensor,
    classes: torch.Tensor | None = None,
    *,
    select: Callable[[object], torch.Tensor] | None = None,
    method: str = "gradcam",
    layer: str | None = None,
) -> CamResult:
    """Class-activation heatmaps of a timm network for ``images``.

    Args:
        net: a timm model (``forward_features`` / ``forward_head``).
        images: ``(N, 3, H, W)``, normalised as the network expects.
        classes: the class to explain per image; ``None`` explains the predicted class.
        select: maps the network's output to logits ``(N, C)`` (default: the output itself),
            e.g. one task's head of a multi-task network.
        method: ``gradcam`` or ``hirescam`` (see the module docstring).
        layer: a module whose output is the feature map to use (e.g. a stage, ``layer3``);
            None: the last feature map (see the module docstring).
    """
    if method not in METHODS:
        raise UserError(f"Unknown CAM method '{method}': use one of {', '.join(METHODS)}.")
    select = select or (lambda out: out)
    modules = dict(net.named_modules())
    if layer is not None and layer not in modules:
        stages = [d.get("module") for d in getattr(net, "feature_info", None) or []]
        raise UserError(
            f"visualize.layer={layer} is not a module of this network: use auto, last or a "
            f"stage name ({', '.join(str(s) for s in stages)})."
        )
    handle, captured = _capture(net, modules, layer)
    was_training = net.training
    net.eval()
    try:
        found = _gradients(net, images, classes, select, layer, captured)
    finally:
        net.train(was_training)
        if handle is not None:
            handle.remove()
    heat, grid = _heatmaps(net, found, images.shape[-2:], layer=layer, method=method)
    return CamResult(
        heatmaps=heat.detach().cpu(),
        classes=found.classes.detach().cpu(),
        logits=found.logits.detach().float().cpu(),
        grid=grid,
        layer=found.where,
    )


def _capture(net: nn.Module, modules: dict[str, nn.Module], layer: str | None):
    """Hook the module whose feature map is explained: ``(the hook's handle or None, the dict
    whose ``"target"`` the hook sets in the forward pass)`` (None: the last feature map)."""
    captured: dict[str, torch.Tensor] = {}

    def keep_input(_module, args):
        captured["target"] = args[0]

    def keep_output(_module, _args, output):
        captured["target"] = output[0] if isinstance(output, (tuple, list)) else output

    last_block = _token_blocks(net)
    if layer is not None:
        handle = modules[layer].register_forward_hook(keep_output)
    elif last_block is not None:
        handle = last_block.register_forward_pre_hook(keep_input)
    else:
        handle = None
    return handle, captured


class _Gradients(NamedTuple):
    """The explained feature map ``target`` (taken at ``where``) and its gradient ``grads``."""

    logits: torch.Tensor
    classes: torch.Tensor
    target: torch.Tensor
    grads: torch.Tensor
    where: str


def _gradients(net, images, classes, select, layer: str | None, captured: dict) -> _Gradients:
    """Forward ``images`` (``net`` in eval mode, hooked by :func:`_capture`) and differentiate
    the score of ``classes`` (None: the predicted ones) with respect to the feature map."""
    # gradients even when called from Lightning's evaluation loops (inference mode)
    with torch.inference_mode(False), torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)  # a graph even if all is frozen
        features = net.forward_features(x)
        logits = select(net.forward_head(features))
        if classes is None:
            classes = logits.argmax(dim=1)
        classes = torch.as_tensor(classes, device=logits.device).long().reshape(-1).clone()
        score = logits.gather(1, classes[:, None]).sum()
        if layer is not None:
            target, where = captured["target"], f"output of {layer}"
        elif features.ndim == 3:  # tokens: the input of the last block
            if "target" not in captured:
                as_spatial(net, features, images.shape[-2:])  # raises the clear error
            target, where = captured["target"], "input of the last transformer block"
        else:
            target, where = features, "last feature map"
        (grads,) = torch.autograd.grad(score, target)
    return _Gradients(logits, classes, target, grads, where)


def _heatmaps(net, found: _Gradients, hw, *, layer: str | None, method: str):
    """``(heatmaps (N, H, W) in [0, 1] at the input's size hw, the feature map's (h, w))``."""
    channels = getattr(net, "num_features", None)
    if layer is not None:
        info = {d.get("module"): d.get("num_chs") for d in getattr(net, "feature_info", []) or []}
        channels = info.get(layer)
    acts = as_spatial(net, found.target.detach(), hw, channels=channels).float()
    grads = as_spatial(net, found.grads, hw, channels=channels).float()
    if method == "gradcam":
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * acts).sum(dim=1))
    else:
        cam = F.relu((grads * acts).sum(dim=1))
    heat = F.interpolate(cam[:, None], size=tuple(hw), mode="bilinear", align_corners=False)[:, 0]
    heat = heat.clamp_min(0)
    peak = heat.flatten(1).amax(dim=1).clamp_min(torch.finfo(heat.dtype).tiny)
    heat = heat / peak[:, None, None]
    return heat, (int(acts.shape[-2]), int(acts.shape[-1]))
