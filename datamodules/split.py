"""Stratified train/val/test splits that are stable per sample.

Each sample's place is decided by a keyed hash of ``(split_seed, its stable id)``: within each
class, samples are ranked by that hash and the held-out parts take the first ``round(fraction x
class size)`` of the ranking (stratified counts), the rest is training. So

- the split depends only on the ids, the classes and ``split_seed``, never on the training seed:
  every member of a seed ensemble is validated and tested on the same samples;
- keeping or dropping other classes never moves a sample (``data.classes=[5,6,7,8,9]`` is the
  all-classes split restricted to those classes), and adding or removing images in one class
  never moves an image of another class; within the class that grew, only the few images at the
  count boundaries can move.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from datamodules.errors import UserError


def id_keys(ids: Sequence[str], *, seed: int, salt: str) -> np.ndarray:
    """A uniform 64-bit key per id from ``(salt, seed, id)``: the sample's rank in a split."""
    prefix = f"{salt}:{int(seed)}:".encode()
    keys = np.empty(len(ids), dtype=np.uint64)
    for i, sample_id in enumerate(ids):
        digest = hashlib.blake2b(prefix + str(sample_id).encode(), digest_size=8).digest()
        keys[i] = int.from_bytes(digest, "little")
    return keys


def _ranked(indices: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``indices`` ordered by their keys (ties, which need a hash collision, by index)."""
    return indices[np.lexsort((indices, keys[indices]))]


def stratified_split(
    targets: Sequence[int] | np.ndarray,
    *,
    ids: Sequence[str],
    fractions: dict[str, float],
    seed: int,
    class_names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Split sample indices per class into ``"train"`` and the named held-out parts.

    Args:
        targets: class index of every sample.
        ids: a stable, unique id per sample (its relative path, ...): what the split is keyed on.
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
    if len(ids) != len(targets):
        raise ValueError(f"{len(ids)} ids for {len(targets)} targets")
    parts = {name: frac for name, frac in fractions.items() if frac > 0}
    if sum(parts.values()) >= 1.0:
        raise UserError(
            f"Held-out fractions {parts} leave nothing to train on: make their sum below 1."
        )
    keys = id_keys(ids, seed=seed, salt="split")
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
        idx = _ranked(idx, keys)
        start = 0
        for name, frac in parts.items():
            # at least one per held-out part, and at least one left for training
            count = min(max(1, round(frac * len(idx))), len(idx) - start - 1)
            out[name].append(idx[start : start + count])
            start += count
        out["train"].append(idx[start:])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in out.items()}


def cap_per_class(
    targets: np.ndarray, *, ids: Sequence[str], max_per_class: int, seed: int
) -> np.ndarray:
    """Positions of at most ``max_per_class`` samples per class (``targets[i]`` and ``ids[i]``
    describe sample ``i``), chosen by a keyed hash of the ids, so the choice in one class never
    depends on the others. Sorted."""
    targets = np.asarray(targets, dtype=np.int64)
    keys = id_keys(ids, seed=seed, salt="cap")
    keep = [
        _ranked(np.flatnonzero(targets == cls), keys)[:max_per_class] for cls in np.unique(targets)
    ]
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)
