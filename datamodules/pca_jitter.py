"""PCA colour jitter ("fancy PCA", Krizhevsky et al. 2012; also used for ResNet).

The colour statistics of a data set are summarised by the 3x3 covariance of its RGB pixel values
in [0, 1]: eigenvalues ``eigval`` (descending) and eigenvectors, the **columns** of ``eigvec``.
Each training image gets its own three weights ``alpha ~ N(0, sigma^2)`` and the **same** RGB
offset ``eigvec @ (alpha * eigval)`` is added to all of its pixels: a constant per-image colour
shift along the data's own principal colour axes, applied to [0, 1] data before normalisation and
clamped so the result stays a valid image.

Two equivalent ways to apply it:

- :class:`PCAJitter`: per image, inside the data-loader workers (a step of the train transform);
- :class:`BatchPCAJitter`: on a whole normalised batch after it reached the device, seeded per
  batch (one fused add + clamp in normalised space; no un-normalising needed).

The eigen-decomposition is either AlexNet's ImageNet constants (:meth:`ColorPCA.imagenet`) or
fitted to your own training images by :func:`fit_color_pca` (streaming, float64 sums), cached on
disk by :func:`load_or_fit_color_pca` so that it is computed once per data set.
:func:`load_or_fit_training_pca` does both for a DataModule's training split (a seeded sample of
its images at the eval geometry); :func:`batch_seed` seeds the on-device jitter of each batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.atomic_file import atomic_file

log = logging.getLogger(__name__)

# fb.resnet.torch, "computed from a random subset of ImageNet training images", [0, 1] units.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (  # columns are the eigenvectors; column 0 is the brightness axis
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


@dataclass(frozen=True)
class ColorPCA:
    """Principal colour axes of a set of RGB pixels in [0, 1].

    Attributes:
        eigval: the 3 eigenvalues of the pixel covariance, descending (variances, [0,1]^2 units).
        eigvec: 3x3, its **columns** are the unit eigenvectors, in the order of ``eigval``.
        mean: the mean RGB pixel (``None`` for the ImageNet constants).
        n_pixels, n_images: how much data the fit saw (0 for constants).
    """

    eigval: tuple[float, float, float]
    eigvec: tuple[tuple[float, float, float], ...]
    mean: tuple[float, float, float] | None = None
    n_pixels: int = 0
    n_images: int = 0

    @classmethod
    def imagenet(cls) -> ColorPCA:
        """AlexNet's/fb.resnet.torch's ImageNet constants."""
        return cls(eigval=IMAGENET_EIGVAL, eigvec=IMAGENET_EIGVEC)

    @classmethod
    def from_covariance(cls, cov, *, mean=None, n_pixels: int = 0, n_images: int = 0):
        """Eigen-decompose a 3x3 covariance: eigenvalues descending, eigenvectors as columns.

        Each eigenvector's sign is fixed (largest component positive) so a fit is reproducible.
        """
        cov = np.asarray(cov, dtype=np.float64)
        cov = (cov + cov.T) / 2
        values, vectors = np.linalg.eigh(cov)  # ascending, columns
        order = np.argsort(values)[::-1]
        values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
        signs = np.sign(vectors[np.abs(vectors).argmax(0), np.arange(3)])
        vectors = vectors * np.where(signs == 0, 1.0, signs)
        return cls(
            eigval=tuple(float(v) for v in values),
            eigvec=tuple(tuple(float(v) for v in row) for row in vectors),
            mean=None if mean is None else tuple(float(m) for m in mean),
            n_pixels=int(n_pixels),
            n_images=int(n_images),
        )

    @property
    def covariance(self) -> np.ndarray:
        """``V diag(eigval) V^T``: the pixel covariance this decomposition describes."""
        v = np.asarray(self.eigvec)
        return v @ np.diag(self.eigval) @ v.T

    def offset(self, alpha) -> np.ndarray:
        """The RGB offset ``V (alpha * eigval)`` for weights ``alpha`` (shape (3,) or (N, 3))."""
        return (np.asarray(alpha, dtype=np.float64) * np.asarray(self.eigval)) @ np.asarray(
            self.eigvec
        ).T

    def to_dict(self) -> dict:
        return {
            "eigval": list(self.eigval),
            "eigvec": [list(r) for r in self.eigvec],
            "mean": None if self.mean is None else list(self.mean),
            "n_pixels": self.n_pixels,
            "n_images": self.n_images,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ColorPCA:
        return cls(
            eigval=tuple(float(v) for v in d["eigval"]),
            eigvec=tuple(tuple(float(v) for v in r) for r in d["eigvec"]),
            mean=None if d.get("mean") is None else tuple(float(m) for m in d["mean"]),
            n_pixels=int(d.get("n_pixels", 0)),
            n_images=int(d.get("n_images", 0)),
        )


# ---------------------------------------------------------------------------- applying it
class PCAJitter:
    """Per-image PCA colour jitter: a train-transform step on a float image in [0, 1].

    ``img`` is ``(3, H, W)`` (or ``(N, 3, H, W)``: one draw per image). Weights are drawn from
    torch's global generator, which Lightning seeds per data-loader worker, so the augmentation
    follows ``seed``. Output is clamped to [0, 1]; run it before ``Normalize``.
    """

    def __init__(self, pca: ColorPCA, *, sigma: float = 0.1) -> None:
        import torch

        self.pca, self.sigma = pca, float(sigma)
        self._eigval = torch.tensor(pca.eigval, dtype=torch.float32)
        self._eigvec = torch.tensor(pca.eigvec, dtype=torch.float32)

    def offsets(self, alpha):
        """RGB offsets ``V (alpha * eigval)`` (float32 tensor, one row per row of ``alpha``)."""
        return (alpha.float() * self._eigval) @ self._eigvec.T

    def draw_alpha(self, n: int, *, generator=None):
        import torch

        return torch.randn(n, 3, generator=generator) * self.sigma

    def __call__(self, img, *, alpha=None):
        batched = img.ndim == 4
        n = img.shape[0] if batched else 1
        alpha = self.draw_alpha(n) if alpha is None else alpha.reshape(n, 3)
        offset = self.offsets(alpha).to(img.device, img.dtype)[:, :, None, None]
        out = (img if batched else img[None]) + offset
        out = out.clamp_(0.0, 1.0)
        return out if batched else out[0]

    def __repr__(self) -> str:
        ev = ", ".join(f"{v:.4g}" for v in self.pca.eigval)
        return f"{type(self).__name__}(sigma={self.sigma}, eigval=({ev}))"


class BatchPCAJitter:
    """PCA colour jitter on a **normalised** batch ``(N, 3, H, W)``, e.g. on the GPU.

    Equivalent to un-normalising, adding the per-image offset, clamping to [0, 1] and normalising
    again, done in normalised space as one add and a clamp per channel:
    ``clamp(x + offset / std, -mean / std, (1 - mean) / std)``. The weights are drawn on the CPU
    from a generator seeded with ``seed``, so a batch's jitter is reproducible on any device.
    ``inplace=True`` overwrites ``x`` (no 2nd copy of a large batch: ~3x faster at 224 px on CPU).
    """

    def __init__(
        self, pca: ColorPCA, *, sigma: float, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        import torch

        self.jitter = PCAJitter(pca, sigma=sigma)
        self._std = torch.tensor(list(std), dtype=torch.float32)
        # per-channel bounds of [0, 1] after Normalize, as python floats: scalar clamps are
        # several times faster than a broadcast tensor clamp on the CPU
        self._bounds = [(-m / s, (1 - m) / s) for m, s in zip(mean, std, strict=True)]

    def __call__(self, x, *, seed: int | None = None, alpha=None, inplace: bool = False):
        import torch

        if alpha is None:
            generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
            alpha = self.jitter.draw_alpha(x.shape[0], generator=generator)
        shift = (self.jitter.offsets(alpha) / self._std)[:, :, None, None]
        shift = shift.to(x.device, x.dtype, non_blocking=True)
        out = x.add_(shift) if inplace else x + shift
        for c, (low, high) in enumerate(self._bounds):
            out[:, c].clamp_(low, high)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.jitter.sigma})"


# ---------------------------------------------------------------------------- fitting it
def fit_color_pca(batches: Iterable) -> ColorPCA:
    """Colour PCA of all pixels of ``batches`` (streaming: one batch in memory at a time).

    Each batch is a uint8 (0..255) or float ([0, 1]) tensor/array of shape ``(3, H, W)`` or
    ``(N, 3, H, W)``. Sums are accumulated in float64: ``s1 += x.sum(0)``, ``s2 += x^T x``,
    ``cov = s2 / n - m m^T``.
    """
    s1, s2, n, n_images = np.zeros(3), np.zeros((3, 3)), 0, 0
    for batch in batches:
        x = batch.numpy() if hasattr(batch, "numpy") else np.asarray(batch)
        scale = 255.0 if x.dtype == np.uint8 else 1.0
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected RGB images (N, 3, H, W), got shape {x.shape}")
        n_images += x.shape[0]
        pixels = np.moveaxis(x, 1, -1).reshape(-1, 3).astype(np.float64) / scale
        s1 += pixels.sum(0)
        s2 += pixels.T @ pixels
        n += len(pixels)
    if n < 2:
        raise ValueError("fit_color_pca needs at least two pixels")
    mean = s1 / n
    cov = s2 / n - np.outer(mean, mean)
    return ColorPCA.from_covariance(cov, mean=mean, n_pixels=n, n_images=n_images)


def cache_key_path(cache_dir: str | Path, key: Mapping, *, prefix: str = "pca") -> Path:
    """``<cache_dir>/<prefix>-<sha1 of the key>.json``: one file per distinct key."""
    blob = json.dumps(key, sort_keys=True, default=str)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{prefix}-{digest}.json"


def load_or_fit_color_pca(
    fit: Callable[[], ColorPCA],
    *,
    key: Mapping,
    cache_dir: str | Path | None,
    name: str = "pca",
) -> tuple[ColorPCA, Path | None, bool]:
    """The fitted :class:`ColorPCA` for ``key``: from ``cache_dir`` if there, else ``fit()``.

    Returns ``(pca, cache file or None, loaded_from_cache)``. The file holds the key next to the
    result (checked on load) and is written atomically, so concurrent runs never read half a file.
    """
    if cache_dir is None:
        return fit(), None, False
    path = cache_key_path(cache_dir, key, prefix=name)
    key = json.loads(json.dumps(key, sort_keys=True, default=str))
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return ColorPCA.from_dict(saved["pca"]), path, True
            log.warning("PCA cache %s belongs to another key: fitting again", path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("Unreadable PCA cache %s (%s): fitting again", path, err)
    pca = fit()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        json.dump({"key": key, "pca": pca.to_dict()}, f, indent=1)
    return pca, path, False


# ---------------------------------------------------------------------------- fitting it on a data set
FIT_SEED = 0  # which images the fit samples is a property of the data, not of the training seed


class _TransformedRows:
    """Rows ``rows`` of a pool (anything with ``load(index)``), each through ``transform``."""

    def __init__(self, pool, rows: np.ndarray, transform) -> None:
        self.pool, self.rows, self.transform = pool, rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.transform(self.pool.load(int(self.rows[i])))


def fit_sample_rows(rows: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` of ``rows`` a fit uses: drawn with :data:`FIT_SEED`, kept in their order."""
    chosen = np.random.default_rng(FIT_SEED).choice(len(rows), n, replace=False)
    return rows[np.sort(chosen)]


def fit_color_pca_on_rows(pool, rows: np.ndarray, transform, *, num_workers: int = 0) -> ColorPCA:
    """:func:`fit_color_pca` of the images ``rows`` of ``pool`` through ``transform``, in batches
    of 64 loaded by ``num_workers`` workers."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _TransformedRows(pool, rows, transform),
        batch_size=64,
        num_workers=num_workers,
        # its own generator: fitting (or not, when cached) must not move the global RNG
        generator=torch.Generator().manual_seed(FIT_SEED),
    )
    return fit_color_pca(loader)


def load_or_fit_training_pca(
    pool,
    rows: np.ndarray,
    *,
    transform,
    fit_images: int,
    key: Mapping,
    cache_dir: str | Path | None,
    name: str,
    num_workers: int = 0,
) -> tuple[ColorPCA, Path | None, bool]:
    """Colour PCA of (a sample of ``fit_images`` of) the training images ``rows`` of ``pool``.

    ``transform`` gives each image as the fit sees it (the eval geometry, float [0, 1]). ``key``
    says what else the result depends on (the source, the geometry); the training ids, their
    number and the sample are added to it. Cached as :func:`load_or_fit_color_pca` does (file
    prefix ``name``), whose ``(pca, cache file or None, loaded_from_cache)`` it returns.
    """
    n = min(int(fit_images), len(rows))
    ids = "\n".join(pool.ids[int(i)] for i in rows)
    key = {
        **key,
        "train_ids_sha1": hashlib.sha1(ids.encode()).hexdigest(),
        "n_train": len(rows),
        "fit_images": n,
        "fit_seed": FIT_SEED,
    }

    def fit() -> ColorPCA:
        return fit_color_pca_on_rows(
            pool, fit_sample_rows(rows, n), transform, num_workers=num_workers
        )

    return load_or_fit_color_pca(fit, key=key, cache_dir=cache_dir, name=name)


def describe_fit(pca: ColorPCA, path: Path | None, cached: bool) -> str:
    """``eigenvalues (...), fitted on N training images[, cached in <file>]`` (or ``loaded from``)."""
    values = ", ".join(f"{v:.4g}" for v in pca.eigval)
    how = f"loaded from {path}" if cached else f"fitted on {pca.n_images} training images"
    where = "" if cached or path is None else f", cached in {path}"
    return f"eigenvalues ({values}), {how}{where}"


def batch_seed(seed: int, rank: int, epoch: int, count: int) -> int:
    """The seed of one training batch's on-device jitter: ``seed``, rank, epoch and the batch's
    position in the epoch, mixed (a non-negative int63)."""
    entropy = [seed, rank, epoch, count]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)
