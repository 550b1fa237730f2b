"""Train/eval pipelines: crop bounds, determinism, presets on any image mode, seeding, errors."""

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image

from datamodules import ImageDataModule
from datamodules.errors import UserError
from datamodules.sources import DigitsSource
from datamodules.transforms import (
    AUGMENT_DEFAULTS,
    ToRGB,
    augment_options,
    build_eval_transform,
    build_train_transform,
)
from tests.conftest import CONF, compose_cfg

PRESETS = sorted(p.stem for p in (CONF / "augment").glob("*.yaml"))
PLAIN = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "interpolation": "bilinear"}


def preset(tmp_path, name: str) -> dict:
    cfg = compose_cfg(tmp_path, [f"augment={name}"])
    return OmegaConf.to_container(cfg.augment, resolve=True)


def coordinate_image(size: int = 256) -> torch.Tensor:
    """uint8 (3, size, size): red = column, green = row, so a crop reveals where it came from."""
    ramp = torch.arange(size, dtype=torch.float32) * 255 / (size - 1)
    return (
        torch.stack(
            [
                ramp[None, :].expand(size, size),
                ramp[:, None].expand(size, size),
                torch.zeros(size, size),
            ]
        )
        .round()
        .to(torch.uint8)
    )


def crop_boxes(transform, n: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(width, height) of the source region behind each of ``n`` outputs, as fractions of ``size``."""
    img = coordinate_image(size)
    w, h = [], []
    for _ in range(n):
        out = transform(img) * 255  # mean 0, std 1: [0, 255]
        k = out.shape[-1]
        w.append(float(out[0, :, -1].mean() - out[0, :, 0].mean()) * k / (k - 1) / 255)
        h.append(float(out[1, -1, :].mean() - out[1, 0, :].mean()) * k / (k - 1) / 255)
    return np.asarray(w), np.asarray(h)


def test_random_resized_crop_honours_scale_and_ratio():
    scale, ratio = (0.3, 0.7), (0.6, 1.5)
    tf = build_train_transform(
        image_size=32, **PLAIN, augment={"random_resized_crop": {"scale": scale, "ratio": ratio}}
    )
    torch.manual_seed(0)
    w, h = crop_boxes(tf, 400)
    area, aspect = w * h, w / h
    tol = 0.03
    assert area.min() >= scale[0] - tol and area.max() <= scale[1] + tol
    assert aspect.min() >= ratio[0] * (1 - tol) and aspect.max() <= ratio[1] * (1 + tol)
    # and it really explores the range (not a fixed crop)
    assert area.min() < scale[0] + 0.05 and area.max() > scale[1] - 0.05
    assert aspect.min() < ratio[0] * 1.1 and aspect.max() > ratio[1] * 0.9


def test_scale_jitter_resizes_the_short_side_in_range_then_crops():
    tf = build_train_transform(image_size=32, **PLAIN, augment={"scale_jitter": [1.25, 2.0]})
    torch.manual_seed(0)
    w, h = crop_boxes(tf, 300)
    # a 32 crop of an image resized to s in [40, 64]: it covers 32/s of each side, square
    assert np.allclose(w, h, atol=0.02)
    assert w.min() >= 0.5 - 0.02 and w.max() <= 0.8 + 0.02
    assert w.min() < 0.55 and w.max() > 0.75


def test_eval_transform_is_deterministic_and_none_trains_on_it():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    tf = build_eval_transform(image_size=32, **PLAIN, crop_pct=0.875)
    torch.manual_seed(0)
    a = tf(img)
    torch.manual_seed(1)
    assert torch.equal(a, tf(img)) and a.shape == (3, 32, 32)
    none = build_train_transform(image_size=32, **PLAIN, crop_pct=0.875, augment={})
    assert torch.equal(none(img), a)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs_on_every_image_mode(tmp_path, name):
    augment = preset(tmp_path, name)
    augment["pca"]["where"] = "worker"  # the per-image pipeline with every step in it
    augment["pca"]["eigen"] = "imagenet"
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tf = build_train_transform(
        image_size=24, mean=mean, std=std, interpolation="bicubic", augment=augment
    )
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (30, 41, 3), dtype=np.uint8))
    images = {
        "RGB": rgb,
        "L": rgb.convert("L"),
        "RGBA": rgb.convert("RGBA"),
        "P": rgb.convert("P"),
        "tensor grey": torch.from_numpy(rng.integers(0, 255, (1, 30, 41), dtype=np.uint8)),
        "tensor RGBA": torch.from_numpy(rng.integers(0, 255, (4, 30, 41), dtype=np.uint8)),
    }
    low = (0 - torch.tensor(mean)) / torch.tensor(std)
    high = (1 - torch.tensor(mean)) / torch.tensor(std)
    torch.manual_seed(0)
    for mode, img in images.items():
        out = tf(img)
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32, mode
        assert torch.isfinite(out).all(), mode
        per_channel = out.permute(1, 2, 0)
        assert (per_channel >= low - 1e-5).all() and (per_channel <= high + 1e-5).all(), mode


def test_to_rgb_converts_modes_consistently():
    rgba = torch.tensor([[[200]], [[100]], [[50]], [[128]]], dtype=torch.uint8)
    assert ToRGB()(rgba).flatten().tolist() == [100, 50, 25]  # composited on black
    pil = Image.new("RGBA", (1, 1), (200, 100, 50, 128))
    assert list(ToRGB()(pil).getpixel((0, 0))) == [100, 50, 25]
    grey = Image.new("L", (2, 2), 77)
    assert ToRGB()(grey).mode == "RGB" and ToRGB()(grey).getpixel((1, 1)) == (77, 77, 77)
    palette = Image.new("P", (2, 2), 3)
    palette.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    assert ToRGB()(palette).getpixel((0, 0)) == (10, 20, 30)


def test_hflip_honours_mirror_invariance():
    img = coordinate_image(32)
    aug = {"hflip": 1.0}
    flipped = build_train_transform(image_size=32, **PLAIN, augment=aug)(img)
    kept = build_train_transform(image_size=32, **PLAIN, augment=aug, mirror_invariant=False)(img)
    assert torch.equal((kept * 255).round(), img.float())
    assert torch.equal((flipped * 255).round(), img.flip(-1).float())


def test_none_yaml_lists_exactly_the_code_defaults():
    none = yaml.safe_load((CONF / "augment" / "none.yaml").read_text())
    none["pca"]["cache_dir"] = None  # an interpolation in the file
    assert none == AUGMENT_DEFAULTS
    assert augment_options(none) == augment_options({})


@pytest.mark.parametrize(
    "augment, message",
    [
        ({"colour_jitter": {}}, "augment.colour_jitter is not an augmentation option"),
        ({"color_jitter": {"brightnes": 0.2}}, "unknown keys"),
        ({"random_resized_crop": {"scale": [0.5, 1.5]}}, "random_resized_crop.scale"),
        ({"random_resized_crop": {"scale": [0.8, 0.2]}}, "random_resized_crop.scale"),
        ({"scale_jitter": [0.5, 2]}, "scale_jitter"),
        (
            {"scale_jitter": [1, 2], "random_resized_crop": {"scale": [0.5, 1]}},
            "set one of them to null",
        ),
        ({"hflip": 2}, "probability"),
        ({"color_jitter": {"hue": 0.7}}, "hue"),
        ({"pca": {"eigen": "cifar"}}, "fit .* or imagenet"),
        ({"pca": {"where": "gpu"}}, "device .* or worker"),
        ({"pca": {"sigma": -1}}, "pca.sigma"),
    ],
)
def test_bad_augment_options_raise_one_clear_user_error(augment, message):
    with pytest.raises(UserError, match=message):
        ImageDataModule(source=DigitsSource(), image_size=16, augment=augment)


# ---------------------------------------------------------------------------- seeding
def first_batch(dm: ImageDataModule, seed: int) -> torch.Tensor:
    # the training seed fixes order and augmentation (per sample, whatever the worker)
    dm.seed = seed
    for ds in dm.datasets.values():
        ds.seed = seed
    torch.manual_seed(12345)  # the global RNG plays no part
    x, _, rows = next(iter(dm.train_dataloader()))
    return torch.cat([x.flatten(1), rows[:, None].float()], 1)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_same_seed_same_augmented_batch_in_workers(num_workers):
    augment = {
        "random_resized_crop": {"scale": [0.5, 1.0]},
        "color_jitter": {"brightness": 0.3},
        "pca": {"sigma": 0.1, "eigen": "imagenet", "where": "worker"},
    }
    dm = ImageDataModule(
        source=DigitsSource(image_size=16),
        image_size=16,
        batch_size=8,
        num_workers=num_workers,
        augment=augment,
    )
    dm.setup()
    a, b, c = first_batch(dm, 5), first_batch(dm, 5), first_batch(dm, 6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_device_jitter_is_seeded_and_advances_per_batch():
    from types import SimpleNamespace

    augment = {"pca": {"sigma": 0.5, "eigen": "imagenet", "where": "device"}}
    dm = ImageDataModule(source=DigitsSource(image_size=8), image_size=8, augment=augment)
    dm.setup()

    def batch():  # a fresh batch each time: the jitter works in place
        return (torch.zeros(4, 3, 8, 8), torch.zeros(4), torch.arange(4))

    def run(seed, n=2, training=True):
        dm.trainer = SimpleNamespace(training=training, current_epoch=0, global_rank=0)
        dm._batch_position = (-1, 0)
        dm.seed = seed
        return [dm.on_after_batch_transfer(batch(), 0)[0] for _ in range(n)]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # a new draw for every batch
    assert torch.equal(run(1, n=1, training=False)[0], batch()[0])  # never outside training
    dm.trainer = None


class MidGreySource:
    """60 random mid-range colour images (values 64..191): a PCA shift never needs clamping."""

    def load(self):
        from datamodules.sources import Pool, SourceData

        images = torch.from_numpy(
            np.random.default_rng(0).integers(64, 192, (60, 3, 8, 8), dtype=np.uint8)
        )
        targets = np.arange(60) % 3
        pool = Pool(load=images.__getitem__, targets=targets, ids=[str(i) for i in range(60)])
        return SourceData(class_names=["a", "b", "c"], train=pool)


@pytest.mark.slow
def test_device_jitter_runs_in_training_only_inside_a_real_fit():
    import pytorch_lightning as pl

    augment = {"pca": {"sigma": 0.3, "eigen": "imagenet", "where": "device"}}
    dm = ImageDataModule(
        source=MidGreySource(), image_size=8, batch_size=8, augment=augment, val_fraction=0.2
    )
    seen = {"train": [], "val": []}

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, _):
            seen["train"].append((batch[0].clone(), batch[2].clone()))
            return (self.w**2).sum()

        def validation_step(self, batch, _):
            seen["val"].append((batch[0].clone(), batch[2].clone()))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Probe(), datamodule=dm)
    assert len(seen["train"]) == 2 and len(seen["val"]) == 1
    std = torch.tensor(dm.std)[None, :, None, None]
    for split in ("train", "val"):
        ds = dm.datasets[split]
        for x, rows in seen[split]:
            clean = torch.stack(
                [dm.eval_transform()(ds.pool.load(int(ds.indices[r]))) for r in rows]
            )
            shift = (x - clean) * std  # in [0, 1] units
            if split == "val":
                assert torch.equal(x, clean)  # validation is never jittered
                continue
            per_image = shift[:, :, :1, :1]
            assert torch.allclose(shift, per_image.expand_as(shift), atol=1e-5)  # constant shift
            assert per_image.abs().amin() > 0  # on every image
            assert per_image.flatten(1).std(0).min() > 0  # different between images


# ---------------------------------------------------------------------------- data config
def test_data_config_from_backbone_name_matches_timm_model_config():
    import timm
    from timm.data import resolve_model_data_config

    from datamodules.data_config import backbone_data_config

    for name in ("resnet10t", "test_vit", "test_efficientnet"):
        by_name, origin = backbone_data_config(name)
        model = timm.create_model(name, pretrained=False, num_classes=3)
        assert by_name == resolve_model_data_config(model), name
        assert origin == f"backbone {name}"


def test_data_config_precedence(cfg_factory):
    from tasks.instantiate import instantiate

    cfg = cfg_factory("model.backbone=test_vit")  # mean/std 0.5, 160 px, bicubic, crop 0.95
    dm = instantiate(cfg.data, _convert_="all")
    assert dm.image_size == 32  # the digits keep their own size (the backbone says 160)
    assert dm.mean == [0.5, 0.5, 0.5] and dm.std == [0.5, 0.5, 0.5]
    assert dm.interpolation == "bicubic" and dm.eval_crop_pct == 1.0
    cfg = cfg_factory("model.backbone=resnet10t", "data.image_size=null", "data.mean=[0.1,0.2,0.3]")
    dm = instantiate(cfg.data, _convert_="all")
    assert dm.image_size == 176 and dm.mean == [0.1, 0.2, 0.3]  # null -> backbone, value wins
    assert dm.std == [0.229, 0.224, 0.225]
    with pytest.raises(UserError, match="data.std"):
        instantiate(cfg_factory("data.std=[0.1,0,0.1]").data, _convert_="all")


def test_a_samples_augmentation_is_seeded_by_its_key_and_leaves_the_callers_rng_alone():
    """Seeding the CPU generator alone draws exactly what fork_rng + torch.manual_seed drew
    (runs resumed from older checkpoints see the same augmented images), at ~1 % of its cost."""
    from datamodules.epoch_sampler import sample_seed

    augment = {"random_resized_crop": {"scale": [0.3, 1.0]}, "color_jitter": {"brightness": 0.4}}
    dm = ImageDataModule(source=DigitsSource(image_size=16), image_size=16, augment=augment)
    dm.setup()
    dataset = dm.datasets["train"]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for epoch, row in [(0, 0), (3, 17), (7, 500)]:
        image = dataset.pool.load(int(dataset.indices[row]))
        with torch.random.fork_rng(devices=[]):  # the reference: the former implementation
            torch.manual_seed(sample_seed(dataset.seed, epoch, row))
            expected = dataset.transform(image)
        x, target, r = dataset[(epoch, row)]
        assert torch.equal(x, expected) and r == row
        assert torch.equal(torch.get_rng_state(), before)  # the caller's stream goes on untouched
    assert not torch.equal(dataset[(0, 0)][0], dataset[(1, 0)][0])  # another epoch, another draw


def _photo(path, size=(2016, 1512)):
    from sklearn.datasets import load_sample_image

    Image.fromarray(load_sample_image("china.jpg")).resize(size).save(path, quality=90)
    return path


def test_eval_photos_are_decoded_only_as_large_as_their_views_need(tmp_path):
    """A JPEG for a 224-px eval view decodes at a reduced DCT scale: the same picture within a
    small tolerance, at a fraction of the pixels; without augmentation the training split
    decodes as the eval splits do."""
    from datamodules.sources.folder import load_rgb
    from datamodules.transforms import build_eval_transform

    photo = _photo(tmp_path / "big.jpg")
    full, small = load_rgb(photo), load_rgb(photo, min_short_side=300)
    assert full.size == (2016, 1512) and small.size == (504, 378)  # 1/4 scale: short side >= 300
    tf = build_eval_transform(image_size=224, mean=(0, 0, 0), std=(1, 1, 1), crop_pct=0.875)
    difference = (tf(full) - tf(small)).abs()
    assert difference.mean() < 0.01 and difference.max() < 0.25
    Image.open(photo).save(tmp_path / "big.png")  # other formats: decoded whole
    assert load_rgb(tmp_path / "big.png", min_short_side=300).size == (2016, 1512)

    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(4):
            _photo(tmp_path / "data" / cls / f"{i}.jpg", size=(1200, 900))
    from datamodules.sources import ImageFolderSource

    dm = ImageDataModule(
        source=ImageFolderSource(root=str(tmp_path / "data")), image_size=64, eval_crop_pct=0.875
    )
    dm.setup()
    assert dm.datasets["val"].min_short_side == dm.eval_short_side() == 147  # 2 x 64 / 0.875
    assert dm.datasets["train"].min_short_side == 147  # augment=none: the eval resize
    off = ImageDataModule(
        source=ImageFolderSource(root=str(tmp_path / "data")), image_size=64, draft_decode=False
    )
    off.setup()
    assert off.datasets["val"].min_short_side is None
    assert off.datasets["train"].min_short_side is None
    x_draft = dm.datasets["test"][0][0]
    x_full = off.datasets["test"][0][0]
    assert (x_draft - x_full).abs().mean() < 0.15  # normalised by ImageNet std: ~0.03 of [0, 1]


@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 40, 32), (3, 17, 50), (1, 32, 32)])
@pytest.mark.parametrize("size, crop_pct", [(32, 1.0), (32, 0.875), (24, 1.0)])
def test_plain_steps_give_torchvisions_pipeline_bit_for_bit(shape, size, crop_pct):
    """The eval pipeline's plain calls (resize + crop skipped when already sized, to float,
    normalise) equal torchvision's Resize/CenterCrop/ToDtype/Normalize exactly, image sized or not."""
    import math

    from torchvision.transforms import v2

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    gen = torch.Generator().manual_seed(sum(shape) + size)
    img = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    reference = v2.Compose(
        [
            v2.Resize(math.floor(size / crop_pct), v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
    ours = build_eval_transform(
        image_size=size, mean=mean, std=std, interpolation="bicubic", crop_pct=crop_pct
    )
    expected = reference(img.expand(3, -1, -1) if shape[0] == 1 else img)
    assert torch.equal(ours(img), expected)
    photo = Image.fromarray(img.expand(3, -1, -1).permute(1, 2, 0).numpy())
    assert torch.equal(ours(photo), reference(v2.functional.pil_to_tensor(photo)))


def test_eval_transforms_differ_in_their_text_when_their_interpolation_does():
    """The frozen-feature cache keys on the eval transform's text: bilinear and bicubic must not
    share cached features."""
    common = {"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875}
    bilinear = build_eval_transform(interpolation="bilinear", **common)
    bicubic = build_eval_transform(interpolation="bicubic", **common)
    assert repr(bilinear) != repr(bicubic)


@pytest.mark.parametrize("name", ["light", "strong", "resnet"])
def test_training_photos_decode_large_enough_for_every_random_crop(tmp_path, name):
    """A training JPEG decodes at a reduced scale only while every crop the preset can draw still
    spans image_size pixels (x the decode margin) across: random resized crops drawn by
    torchvision's own sampling on an image of exactly the required short side, square (the worst
    case) and 4:3, never come out smaller; scale jitter never resizes the short side past it."""
    import math

    from torchvision.transforms import v2

    from datamodules.image_datamodule import DECODE_MARGIN
    from datamodules.sources import ImageFolderSource

    dm = ImageDataModule(
        source=ImageFolderSource(root=str(tmp_path)), image_size=224, augment=preset(tmp_path, name)
    )
    need = dm.short_side("train")
    o = dm.augment_options
    if sj := o["scale_jitter"]:
        assert need == math.ceil(DECODE_MARGIN * round(sj[1] * 224))  # the largest short side
        return
    rrc, smallest = o["random_resized_crop"], float("inf")
    torch.manual_seed(0)
    for w, h in ((need, need), (need * 4 // 3, need)):
        img = torch.zeros(3, h, w, dtype=torch.uint8)
        for _ in range(3000):
            _, _, ch, cw = v2.RandomResizedCrop.get_params(img, rrc["scale"], rrc["ratio"])
            smallest = min(smallest, ch, cw)
    assert smallest >= 224 * DECODE_MARGIN * 0.98  # 0.98: the draws' integer rounding
    assert smallest <= 224 * DECODE_MARGIN * 1.1  # and not much more: the bound is tight
    if name == "light":  # scale >= 0.5, ratio 3/4-4/3: 2 x 224 x sqrt(1.3333 / 0.5)
        from datamodules.sources.folder import load_rgb

        assert need == 732
        photo = _photo(tmp_path / "phone.jpg", size=(4032, 3024))
        assert load_rgb(photo, min_short_side=need).size == (1008, 756)  # decoded at 1/4 scale


@pytest.mark.parametrize("name", PRESETS)
def test_training_pipelines_give_what_torchvisions_image_wrapper_gives_bit_for_bit(tmp_path, name):
    """Each preset's per-image pipeline (PCA jitter in the worker too) on a plain tensor equals
    the same pipeline on torchvision's ``tv_tensors.Image`` (``ToImage``), draw for draw."""
    from torchvision.transforms import v2

    from datamodules.transforms import ToTensor

    options = preset(tmp_path, name)
    if options["pca"]["sigma"]:
        options["pca"].update(where="worker", eigen="imagenet")
    ours = build_train_transform(image_size=48, augment=options, **PLAIN)
    reference = v2.Compose(
        [v2.ToImage() if isinstance(t, ToTensor) else t for t in ours.transforms]
    )
    photo = Image.fromarray(coordinate_image(96).permute(1, 2, 0).numpy())
    for inp in (photo, coordinate_image(80)):
        for seed in range(5):
            torch.manual_seed(seed)
            a = ours(inp)
            torch.manual_seed(seed)
            b = reference(inp)
            assert torch.equal(a, b.as_subclass(torch.Tensor)), (name, seed)
