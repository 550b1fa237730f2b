"""Test-time augmentation: the views' geometry, mirror invariance, batching, softmax averaging."""

import pytest
import torch

from datamodules.errors import UserError
from lightning_modules.tta import TestTimeAugmentation


def _image(size=4):
    """A uint8 image whose every pixel differs, so any wrong crop or flip shows."""
    return torch.arange(3 * size * size, dtype=torch.uint8).reshape(3, size, size)


def _views(tta, image, size=4, crop_pct=1.0):
    """``tta``'s view groups of one image, unnormalised ([0, 1] floats)."""
    return tta.image_views(image_size=size, mean=[0, 0, 0], std=[1, 1, 1], eval_crop_pct=crop_pct)(
        image
    )


def test_ten_crop_gives_the_documented_ten_views():
    x = _image(size=4)
    # crop_pct 0.5 and nearest: the resized image is x with every pixel doubled (4 -> 8 px)
    tta = TestTimeAugmentation(mode="ten_crop", crop_pct=0.5, interpolation="nearest")
    (views,) = _views(tta, x)
    assert views.shape == (10, 3, 4, 4) and tta.num_views == 10
    big = x.float().div(255).repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    expected = [big[..., :4, :4], big[..., :4, 4:], big[..., 4:, :4], big[..., 4:, 4:]]
    expected.append(big[..., 2:6, 2:6])  # tl, tr, bl, br, centre (torchvision order)
    for i, crop in enumerate(expected):
        assert torch.allclose(views[i], crop, atol=1e-7), i  # x / 255 vs x * (1 / 255)
    # views 5-9: the same crops of the mirrored image, i.e. mirror images of tr, tl, br, bl, c
    for flipped, original in ((5, 1), (6, 0), (7, 3), (8, 2), (9, 4)):
        assert torch.equal(views[flipped], views[original].flip(-1)), flipped
    # five_crop: exactly the first five
    five = TestTimeAugmentation(mode="five_crop", crop_pct=0.5, interpolation="nearest")
    assert torch.equal(_views(five, x)[0], views[:5])


def test_default_five_crop_resizes_like_224_to_256():
    tta = TestTimeAugmentation(mode="five_crop", interpolation="bilinear")  # crop_pct 0.875
    (views,) = _views(tta, torch.randint(0, 255, (3, 300, 400), dtype=torch.uint8), size=224)
    assert views.shape == (5, 3, 224, 224)
    digit = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)
    (views,) = _views(tta, digit, size=32)  # the digits: 32 -> 36 -> 32
    assert views.shape == (5, 3, 32, 32)
    assert not torch.equal(views[0], views[3])  # opposite corners differ


def test_flip_views_are_mirror_images_of_the_eval_view():
    x = _image()
    (views,) = _views(TestTimeAugmentation(mode="flip", interpolation="bilinear"), x)
    assert views.shape == (2, 3, 4, 4)
    assert torch.allclose(views[0], x.float() / 255, atol=1e-7)
    assert torch.equal(views[1].flip(-1), views[0])


def test_multiscale_sizes_and_flips():
    tta = TestTimeAugmentation(
        mode="multiscale", scales=[0.5, 1.0, 1.5], flip=True, interpolation="bilinear"
    )
    groups = _views(tta, torch.randint(0, 255, (3, 40, 50), dtype=torch.uint8), size=32)
    assert [g.shape for g in groups] == [(2, 3, 16, 16), (2, 3, 32, 32), (2, 3, 48, 48)]
    assert tta.num_views == 6
    assert torch.equal(groups[1][1], groups[1][0].flip(-1))


@pytest.mark.parametrize(
    "kwargs",
    [{"mode": "flip"}, {"mode": "ten_crop"}, {"mode": "multiscale", "flip": True}],
)
def test_mirroring_is_refused_when_data_is_not_mirror_invariant(kwargs):
    with pytest.raises(UserError, match="mirror_invariant=false.*tta=five_crop"):
        TestTimeAugmentation(**kwargs, mirror_invariant=False)


def test_modes_without_mirroring_are_allowed_on_digits():
    for kwargs in ({"mode": "five_crop"}, {"mode": "multiscale", "scales": [1.0, 1.25]}):
        assert not TestTimeAugmentation(**kwargs, mirror_invariant=False).flip


def test_unknown_mode_is_a_user_error():
    with pytest.raises(UserError, match="Unknown tta 'eleven_crop'"):
        TestTimeAugmentation(mode="eleven_crop")


class CountingModel(torch.nn.Module):
    """Logits that depend on the input, and a record of every forward's batch size."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.proj = torch.nn.Linear(3, 4)
        torch.nn.init.normal_(self.proj.weight, std=3.0)

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.proj(x.mean(dim=(-1, -2)) + x[..., 0, 0])


def _batched(tta, images, size=32):
    """The view groups of several images, batched as a DataLoader would: (B, V, C, h, w)."""
    per_image = [_views(tta, image, size=size) for image in images]
    return [torch.stack(parts) for parts in zip(*per_image, strict=True)]


def test_views_are_classified_in_one_forward_and_softmaxes_averaged():
    torch.manual_seed(0)
    model = CountingModel()
    images = torch.randint(0, 255, (5, 3, 40, 40), dtype=torch.uint8)
    tta = TestTimeAugmentation(mode="five_crop", interpolation="bilinear")
    groups = _batched(tta, images)
    probs = tta.probabilities(model, groups)
    assert model.calls == [25]  # 5 images x 5 views, one pass
    (views,) = groups
    logits = torch.stack([model(views[:, v]) for v in range(5)])  # (5 views, 5 images, 4)
    assert torch.allclose(probs, logits.softmax(-1).mean(0), atol=1e-6)
    assert not torch.allclose(probs, logits.mean(0).softmax(-1), atol=1e-3)  # not logit averaging
    assert torch.allclose(probs.sum(-1), torch.ones(5))

    model.calls.clear()
    multi = TestTimeAugmentation(mode="multiscale", scales=[0.75, 1.0, 1.25])
    multi.probabilities(model, _batched(multi, images))
    assert model.calls == [5, 5, 5]  # one pass per size


def test_no_tta_is_the_plain_softmax():
    model = CountingModel()
    images = torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8)
    tta = TestTimeAugmentation(mode="none", interpolation="bilinear")
    groups = _batched(tta, images, size=8)
    probs = tta.probabilities(model, groups)
    assert torch.allclose(probs, model(groups[0][:, 0]).softmax(-1), atol=1e-6)
