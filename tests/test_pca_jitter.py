"""PCA colour jitter: the exact offset, its distribution, the fit, clamping, both ways of applying."""

import json

import numpy as np
import pytest
import torch

from datamodules.pca_jitter import (
    IMAGENET_EIGVAL,
    IMAGENET_EIGVEC,
    BatchPCAJitter,
    ColorPCA,
    PCAJitter,
    fit_color_pca,
    load_or_fit_color_pca,
)

V = np.asarray(IMAGENET_EIGVEC)
LAM = np.asarray(IMAGENET_EIGVAL)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_imagenet_constants_are_an_eigen_decomposition():
    assert np.allclose(V.T @ V, np.eye(3), atol=2e-4)  # orthonormal columns
    assert list(LAM) == sorted(LAM, reverse=True)
    # column 0 is the brightness axis, row 0 is not: a transposed implementation is detectable
    assert np.allclose(np.abs(V[:, 0]), 1 / np.sqrt(3), atol=0.02)
    assert abs(V[:, 0] @ V[0, :]) < 0.9


def test_fixed_alpha_gives_exactly_v_times_alpha_lambda():
    jitter = PCAJitter(ColorPCA.imagenet(), sigma=0.1)
    alpha = np.array([0.3, -1.2, 0.7])
    expected = V @ (alpha * LAM)
    assert np.allclose(ColorPCA.imagenet().offset(alpha), expected, atol=1e-12)
    got = jitter.offsets(torch.tensor(alpha)[None])[0].numpy()
    assert np.allclose(got, expected, atol=1e-7)
    # applied to an image: the same offset on every pixel
    img = torch.full((3, 5, 7), 0.5)
    out = jitter(img, alpha=torch.tensor(alpha))
    assert np.allclose(out.numpy(), 0.5 + expected[:, None, None], atol=1e-7)


def test_offset_covariance_is_sigma2_v_lambda2_vt_with_top_direction_v0():
    sigma, n = 0.1, 200_000
    jitter = PCAJitter(ColorPCA.imagenet(), sigma=sigma)
    torch.manual_seed(0)
    offsets = jitter.offsets(jitter.draw_alpha(n)).double().numpy()
    cov = np.cov(offsets.T)
    expected = sigma**2 * V @ np.diag(LAM**2) @ V.T
    assert np.allclose(cov, expected, rtol=0.03, atol=1e-7)
    top = np.linalg.eigh(cov)[1][:, -1]
    assert abs(top @ V[:, 0]) > 0.999
    # the transposed implementation (rows as eigenvectors) would point elsewhere
    wrong = np.linalg.eigh(V.T @ np.diag(LAM**2) @ V)[1][:, -1]
    assert abs(top @ wrong) < 0.9
    # per image, not per pixel: each image's shift is constant over its pixels
    imgs = torch.full((8, 3, 4, 4), 0.5)
    out = jitter(imgs) - imgs
    assert torch.allclose(out, out[:, :, :1, :1].expand_as(out))
    assert out[:, :, 0, 0].std(0).min() > 0  # and different between images


def test_fit_recovers_a_known_colour_covariance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3))
    cov = a @ a.T
    cov = 0.006 * cov / np.abs(cov).max()  # std <= ~0.08 around 0.5: no clipping in [0, 1]
    mean = np.array([0.5, 0.45, 0.55])
    chol = np.linalg.cholesky(cov)
    batches = []
    for size in (5, 17, 1, 9):  # streaming over batches of different sizes
        z = rng.normal(size=(size, 32, 32, 3))
        pixels = np.clip(mean + z @ chol.T, 0, 1)
        batches.append(torch.from_numpy(pixels).permute(0, 3, 1, 2).float())
    pca = fit_color_pca(iter(batches))
    all_pixels = np.concatenate([b.permute(0, 2, 3, 1).reshape(-1, 3).double() for b in batches])
    # exactly the covariance of the pixels seen (population normalisation)
    assert np.allclose(pca.covariance, np.cov(all_pixels.T, bias=True), atol=1e-9)
    assert np.allclose(pca.mean, all_pixels.mean(0), atol=1e-9)
    assert pca.n_images == 32 and pca.n_pixels == 32 * 32 * 32
    # and close to the true one
    assert np.allclose(pca.covariance, cov, atol=0.03 * np.abs(cov).max())
    true_vals, true_vecs = np.linalg.eigh(cov)
    assert np.allclose(pca.eigval, true_vals[::-1], rtol=0.05)
    assert abs(np.asarray(pca.eigvec)[:, 0] @ true_vecs[:, -1]) > 0.995
    assert list(pca.eigval) == sorted(pca.eigval, reverse=True)


def test_fit_scales_uint8_and_accumulates_in_float64():
    # a bright, nearly constant colour: float32 sums of squares lose the tiny variance
    rng = np.random.default_rng(1)
    x = np.clip(0.9 + 0.001 * rng.normal(size=(200, 3, 64, 64)), 0, 1).astype(np.float32)
    pca = fit_color_pca([x[i : i + 50] for i in range(0, 200, 50)])
    var = x.transpose(0, 2, 3, 1).reshape(-1, 3).astype(np.float64).var(0)
    assert np.allclose(np.diag(pca.covariance), var, rtol=1e-3)
    u8 = (rng.random((4, 3, 8, 8)) * 255).astype(np.uint8)
    assert np.allclose(fit_color_pca([u8]).mean, (u8 / 255.0).mean((0, 2, 3)), atol=1e-12)


def test_grey_images_give_a_brightness_only_decomposition():
    grey = torch.rand(6, 1, 16, 16).expand(-1, 3, -1, -1)
    pca = fit_color_pca([grey])
    assert pca.eigval[1] < 1e-9 and pca.eigval[2] < 1e-9
    assert np.allclose(np.abs(np.asarray(pca.eigvec)[:, 0]), 1 / np.sqrt(3), atol=1e-6)
    out = PCAJitter(pca, sigma=1.0)(torch.full((3, 4, 4), 0.5))
    assert torch.allclose(out[0], out[1], atol=1e-6) and torch.allclose(out[1], out[2], atol=1e-6)


def test_output_is_clamped_to_a_valid_image():
    jitter = PCAJitter(ColorPCA.imagenet(), sigma=5.0)  # huge shifts
    img = torch.rand(16, 3, 8, 8)
    out = jitter(img)
    assert out.min() >= 0 and out.max() <= 1
    assert (out == 0).any() and (out == 1).any()  # it really had to clamp


def test_batched_on_normalised_data_equals_per_image_before_normalise():
    pca = ColorPCA.imagenet()
    per_image = PCAJitter(pca, sigma=2.0)
    batched = BatchPCAJitter(pca, sigma=2.0, mean=MEAN, std=STD)
    img = torch.rand(10, 3, 6, 6)
    alpha = torch.randn(10, 3) * 2.0
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    expected = (per_image(img, alpha=alpha) - mean) / std
    got = batched((img - mean) / std, alpha=alpha)
    assert torch.allclose(got, expected, atol=1e-5)


def test_batched_jitter_is_seeded():
    batched = BatchPCAJitter(ColorPCA.imagenet(), sigma=0.1, mean=MEAN, std=STD)
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(batched(x, seed=3), batched(x, seed=3))
    assert not torch.allclose(batched(x, seed=3), batched(x, seed=4))


@pytest.mark.slow
def test_fit_is_cached_per_key(tmp_path):
    calls = []

    def fit():
        calls.append(1)
        return fit_color_pca([torch.rand(2, 3, 4, 4)])

    key = {"source": "digits", "fit_images": 10}
    first, path, cached = load_or_fit_color_pca(fit, key=key, cache_dir=tmp_path)
    again, path2, cached2 = load_or_fit_color_pca(fit, key=key, cache_dir=tmp_path)
    assert (cached, cached2, len(calls), path) == (False, True, 1, path2)
    assert again == first
    assert json.loads(path.read_text())["key"] == key
    other, path3, _ = load_or_fit_color_pca(fit, key={**key, "fit_images": 11}, cache_dir=tmp_path)
    assert len(calls) == 2 and path3 != path
    path.write_text("{broken")  # a damaged cache is refitted, not trusted
    load_or_fit_color_pca(fit, key=key, cache_dir=tmp_path)
    assert len(calls) == 3


@pytest.mark.parametrize("eigen", ["fit", "imagenet"])
def test_datamodule_fits_on_training_split_and_caches(tmp_path, eigen):
    from datamodules import ImageDataModule
    from datamodules.sources import DigitsSource

    def make():
        augment = {"pca": {"sigma": 0.1, "eigen": eigen, "cache_dir": str(tmp_path)}}
        return ImageDataModule(source=DigitsSource(image_size=16), image_size=16, augment=augment)

    dm = make()
    dm.setup()
    files = list(tmp_path.glob("*.json"))
    if eigen == "imagenet":
        assert dm.color_pca == ColorPCA.imagenet() and not files
        return
    assert len(files) == 1
    # the fit is over the training images exactly as the eval transform renders them, in [0, 1]
    ds = dm.datasets["train"]
    tf = dm.eval_transform(normalize=False)
    pixels = torch.stack([tf(ds.pool.load(int(i))) for i in ds.indices])
    expected = fit_color_pca([pixels])
    assert np.allclose(dm.color_pca.covariance, expected.covariance, atol=1e-9)
    assert dm.color_pca.n_images == len(ds)
    dm2 = make()
    dm2.setup()
    assert dm2.color_pca == dm.color_pca and list(tmp_path.glob("*.json")) == files
