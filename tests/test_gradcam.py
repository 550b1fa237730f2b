"""Grad-CAM and feature maps: the heatmaps point where the evidence is, on timm layouts too."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from datamodules.errors import UserError
from lightning_modules.feature_maps import first_conv, stage_activations
from lightning_modules.gradcam import choose_layer, grad_cam

S = 32  # input side; the toy networks below have stride 4: 8x8 feature maps


class ToyCNN(nn.Module):
    """timm's interface (forward_features / forward_head) on a hand-set network.

    Features: the input's red and green channels, rectified and average-pooled by 4 (stride 4),
    optionally multiplied by a spatial ``feature_mask``. Head: global average pool of the
    (optionally ``pool_mask``-ed) map, then the identity as the linear layer: logit 0 = red,
    logit 1 = green.
    """

    def __init__(self, feature_mask=None, pool_mask=None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0  # red
            self.conv.weight[1, 1] = 1.0  # green
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(2))
        self.feature_mask, self.pool_mask = feature_mask, pool_mask

    def forward_features(self, x):
        a = F.avg_pool2d(F.relu(self.conv(x)), 4)
        return a if self.feature_mask is None else a * self.feature_mask

    def forward_head(self, a, pre_logits: bool = False):
        if self.pool_mask is not None:
            pooled = (a * self.pool_mask).sum((2, 3)) / self.pool_mask.sum()
        else:
            pooled = a.mean((2, 3))
        return pooled if pre_logits else self.fc(pooled)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def top_left_mask(n: int = S // 4) -> torch.Tensor:
    mask = torch.zeros(n, n)
    mask[: n // 2, : n // 2] = 1
    return mask


def quadrant_mass(heat: torch.Tensor) -> torch.Tensor:
    """Share of each heatmap's mass per quadrant: (N, 4) as TL, TR, BL, BR."""
    h, w = heat.shape[-2:]
    parts = [heat[:, : h // 2, : w // 2], heat[:, : h // 2, w // 2 :]]
    parts += [heat[:, h // 2 :, : w // 2], heat[:, h // 2 :, w // 2 :]]
    mass = torch.stack([p.sum((1, 2)) for p in parts], dim=1)
    return mass / mass.sum(1, keepdim=True)


def assert_zero_beyond_top_left(heat: torch.Tensor) -> None:
    """Exactly 0 outside the top-left quadrant, but for the bilinear upsampling's half cell."""
    edge = S // 2 + 2  # half a feature cell (stride 4) past the quadrant's edge
    assert (heat[:, edge:, :] == 0).all() and (heat[:, :, edge:] == 0).all()


def argmax_yx(heat: torch.Tensor) -> tuple[int, int]:
    index = int(heat.flatten().argmax())
    return index // heat.shape[-1], index % heat.shape[-1]


def test_gradcam_peaks_where_the_logit_looks():
    """A network whose features (and so its logit) exist only in the top-left quadrant."""
    torch.manual_seed(0)
    net = ToyCNN(feature_mask=top_left_mask())
    images = torch.rand(3, 3, S, S)
    # the logit really depends on the top-left quadrant only
    changed = images.clone()
    changed[:, :, S // 2 :, :] = torch.rand_like(changed[:, :, S // 2 :, :])
    changed[:, :, :, S // 2 :] = torch.rand_like(changed[:, :, :, S // 2 :])
    assert torch.equal(net(images), net(changed))
    result = grad_cam(net, images, torch.tensor([0, 1, 0]))
    assert result.heatmaps.shape == (3, S, S) and result.grid == (S // 4, S // 4)
    assert float(result.heatmaps.min()) >= 0 and float(result.heatmaps.max()) == pytest.approx(1)
    assert (quadrant_mass(result.heatmaps)[:, 0] > 0.9).all()
    assert_zero_beyond_top_left(result.heatmaps)
    for heat in result.heatmaps:
        y, x = argmax_yx(heat)
        assert y < S // 2 and x < S // 2


def test_gradcam_is_class_discriminative():
    """Red square top-left, green square bottom-right: each class's map finds its own square."""
    net = ToyCNN()
    image = torch.zeros(1, 3, S, S)
    image[0, 0, 2:12, 2:12] = 1.0  # red
    image[0, 1, 20:30, 20:30] = 1.0  # green
    red = grad_cam(net, image, torch.tensor([0]))
    green = grad_cam(net, image, torch.tensor([1]))
    assert quadrant_mass(red.heatmaps)[0, 0] > 0.95
    assert quadrant_mass(green.heatmaps)[0, 3] > 0.95
    predicted = grad_cam(net, image)  # no class given: the predicted one (equal areas: red)
    assert int(predicted.classes[0]) == int(predicted.logits.argmax())


def test_hirescam_is_faithful_where_gradcam_averages():
    """The head pools only the top-left quadrant, the image shows the same square everywhere.

    HiResCAM (gradients × activations, element-wise) shows only the positions the score depends
    on; Grad-CAM weighs channels by their mean gradient, so it lights up all four identical
    squares alike: the difference is the definition of Grad-CAM, which this checks exactly.
    """
    net = ToyCNN(pool_mask=top_left_mask())
    image = torch.zeros(1, 3, S, S)
    for y0 in (4, 20):
        for x0 in (4, 20):
            image[0, 0, y0 : y0 + 8, x0 : x0 + 8] = 1.0
    hires = grad_cam(net, image, torch.tensor([0]), method="hirescam")
    assert quadrant_mass(hires.heatmaps)[0, 0] > 0.9
    assert_zero_beyond_top_left(hires.heatmaps)
    grad = grad_cam(net, image, torch.tensor([0]), method="gradcam")
    assert torch.allclose(quadrant_mass(grad.heatmaps)[0], torch.full((4,), 0.25), atol=1e-5)
    with pytest.raises(UserError, match="Unknown CAM method"):
        grad_cam(net, image, method="cam++")


def test_gradcam_on_a_timm_cnn_equals_cam_from_the_classifier_weights():
    """GAP + linear head: Grad-CAM's map is Σ_k w_ck A_k (CAM, Zhou et al. 2016), up to scale."""
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=4).eval()
    x = torch.randn(3, 3, 128, 128)
    classes = torch.tensor([0, 1, 3])
    result = grad_cam(net, x, classes)
    with torch.no_grad():
        a = net.forward_features(x)
        cam = torch.einsum("ck,nkhw->nchw", net.fc.weight, a)[torch.arange(3), classes]
        cam = F.interpolate(cam.clamp_min(0)[:, None], size=(128, 128), mode="bilinear")[:, 0]
        cam = cam / cam.flatten(1).amax(1).clamp_min(1e-30)[:, None, None]
    assert result.grid == tuple(a.shape[-2:]) == (4, 4)
    assert torch.allclose(result.heatmaps, cam, atol=1e-5)
    assert net.training is False  # mode restored
    # HiResCAM equals Grad-CAM for this head: the gradient is the same at every position
    hires = grad_cam(net, x, classes, method="hirescam")
    assert torch.allclose(hires.heatmaps, result.heatmaps, atol=1e-5)


@pytest.mark.parametrize(
    "name, side, grid",
    [
        ("test_efficientnet", 96, (3, 3)),
        ("test_convnext", 96, (3, 3)),
        ("test_mambaout", 96, (3, 3)),  # NHWC feature maps
        ("test_vit", 64, (4, 4)),  # class token: tokens entering the last block, 16 px patches
        ("test_vit2", 64, (4, 4)),  # average-pooled tokens
    ],
)
def test_gradcam_on_timm_layouts(name, side, grid):
    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=3)
    x = torch.randn(2, 3, side, side)
    result = grad_cam(net, x)
    assert result.heatmaps.shape == (2, side, side)
    assert result.grid == grid
    assert torch.isfinite(result.heatmaps).all()
    assert float(result.heatmaps.min()) >= 0
    # not degenerate: some evidence (a zero gradient, e.g. behind a class token, gives all zeros)
    assert torch.allclose(result.heatmaps.flatten(1).amax(1), torch.ones(2))
    assert torch.equal(result.classes, net.eval()(x).argmax(1))


def test_gradcam_works_inside_inference_mode():
    """Lightning runs test hooks under torch.inference_mode(): the callback draws from there."""
    net = ToyCNN(feature_mask=top_left_mask())
    with torch.inference_mode():
        images = torch.rand(2, 3, S, S)
        result = grad_cam(net, images, torch.tensor([0, 1]))
    assert quadrant_mass(result.heatmaps)[:, 0].min() > 0.9


def test_token_sequence_without_a_patch_grid_is_a_clear_error():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 8)
            self.fc = nn.Linear(8, 2)

        def forward_features(self, x):
            return self.proj(x.flatten(2).transpose(1, 2))  # (N, H*W, 8), no patch_embed

        def forward_head(self, t):
            return self.fc(t.mean(1))

    with pytest.raises(UserError, match="token sequence .* without a known patch grid"):
        grad_cam(Tokens(), torch.randn(1, 3, 8, 8))


def test_intermediate_stage_and_automatic_choice_for_small_images():
    net = timm.create_model("test_resnet", num_classes=3)
    # 32 px through stride 32 is a 1x1 map: the deepest stage with at least 4x4 is layer2 (/8)
    assert choose_layer(net, (32, 32)) == "layer2"
    assert choose_layer(net, (224, 224)) is None  # 7x7: the last feature map
    result = grad_cam(net, torch.randn(2, 3, 32, 32), layer="layer2")
    assert result.grid == (4, 4) and result.layer == "output of layer2"
    assert result.heatmaps.shape == (2, 32, 32)
    with pytest.raises(UserError, match="not a module"):
        grad_cam(net, torch.randn(1, 3, 32, 32), layer="layer9")


def test_stage_activations_and_first_conv_follow_timm_feature_info():
    cnn = timm.create_model("test_resnet", num_classes=3)
    stages = stage_activations(cnn, torch.randn(1, 3, 64, 64))
    info = cnn.feature_info
    assert [n for n, _ in stages] == [d["module"] for d in info]
    for (_, act), d in zip(stages, info, strict=True):
        assert act.shape == (1, d["num_chs"], 64 // d["reduction"], 64 // d["reduction"])
    vit = timm.create_model("test_vit", num_classes=3)
    for _, act in stage_activations(vit, torch.randn(1, 3, 64, 64)):
        assert act.shape == (1, vit.embed_dim, 4, 4)  # tokens on the 4x4 patch grid
    name, weight = first_conv(cnn)
    assert torch.equal(weight, cnn.get_submodule(name).weight.detach())
    assert weight.shape[1] == 3
