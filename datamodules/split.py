"""Stratified train/val/test splits fixed by their own seed.

The split depends only on the targets and ``split_seed``, never on the training seed, so all
members of a seed ensemble are validated and tested on the same samples in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lightning_modules.errors import UserError


def stratified_split(
    targets: Sequence[int] | np.ndarray,
    *,
    fractions: dict[str, float],
    seed: int,
    class_names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Split sample indices per class into ``"train"`` and the named held-out parts.

    Args:
        targets: class index of every sample.
        fractions: share of each class for every held-out part, e.g. ``{"val": .15, "test": .15}``;
            a part with fraction 0 gets no samples. The rest is ``"train"``.
        seed: the split seed.
        class_names: names used in error messages.

    Returns:
        ``{"train": idx, **{part: idx}}``, each sorted ascending (stable order, whatever the seed).
        Every class with a positive fraction gets at least one sample in each part and keeps at
        least one for training.
    """
    targets = np.asarray(targets, dtype=np.int64)
    parts = {name: frac for name, frac in fractions.items() if frac > 0}
    if sum(parts.values()) >= 1.0:
        raise UserError(
            f"Held-out fractions {parts} leave nothing to train on: make their sum below 1."
        )
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {"train": [], **{name: [] for name in parts}}
    for cls in np.unique(targets):
        idx = np.flatnonzero(targets == cls)
        need = 1 + len(parts)
        if len(idx) < need:
            name = class_names[cls] if class_names is not None else str(cls)
            raise UserError(
                f"Class '{name}' has {len(idx)} image(s) but needs at least {need} to be split "
                f"into train/{'/'.join(parts)}: add images to it, remove the class, or give "
                "separate validation/test folders (data.source.val_root / data.source.test_root)."
            )
        idx = rng.permutation(idx)
        start = 0
        for name, frac in parts.items():
            # at least one per held-out part, and at least one left for training
            count = min(max(1, round(frac * len(idx))), len(idx) - start - 1)
            out[name].append(idx[start : start + count])
            start += count
        out["train"].append(idx[start:])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in out.items()}


def cap_per_class(
    targets: np.ndarray, indices: np.ndarray, *, max_per_class: int, seed: int
) -> np.ndarray:
    """Keep at most ``max_per_class`` of ``indices`` per class (seeded choice, sorted result)."""
    rng = np.random.default_rng(seed)
    keep = []
    for cls in np.unique(targets[indices]):
        idx = indices[targets[indices] == cls]
        if len(idx) > max_per_class:
            idx = rng.choice(idx, size=max_per_class, replace=False)
        keep.append(idx)
    return np.sort(np.concatenate(keep))
