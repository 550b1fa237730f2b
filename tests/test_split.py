import numpy as np
import pytest

from datamodules.errors import UserError
from datamodules.split import cap_per_class, stratified_split


def _targets():
    rng = np.random.default_rng(0)
    return rng.integers(0, 5, size=500)


def _ids(t):
    return [f"img/{i}" for i in range(len(t))]


def test_split_is_a_stratified_partition():
    t = _targets()
    parts = stratified_split(t, ids=_ids(t), fractions={"val": 0.2, "test": 0.1}, seed=3)
    all_idx = np.concatenate(list(parts.values()))
    assert sorted(all_idx.tolist()) == list(range(len(t)))  # disjoint and complete
    for name, frac in (("val", 0.2), ("test", 0.1)):
        for cls in range(5):
            n_cls = (t == cls).sum()
            got = (t[parts[name]] == cls).sum()
            assert abs(got - frac * n_cls) <= 1, (name, cls, got, n_cls)
    for idx in parts.values():
        assert np.all(np.diff(idx) > 0)  # sorted: stable order


def test_split_depends_only_on_split_seed():
    t = _targets()
    a = stratified_split(t, ids=_ids(t), fractions={"val": 0.2, "test": 0.1}, seed=3)
    b = stratified_split(t, ids=_ids(t), fractions={"val": 0.2, "test": 0.1}, seed=3)
    c = stratified_split(t, ids=_ids(t), fractions={"val": 0.2, "test": 0.1}, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])


def test_tiny_class_gets_one_of_each_and_too_tiny_class_is_a_clear_error():
    t = np.array([0] * 50 + [1] * 3)
    parts = stratified_split(t, ids=_ids(t), fractions={"val": 0.1, "test": 0.1}, seed=0)
    for name in ("train", "val", "test"):
        assert (t[parts[name]] == 1).sum() == 1
    with pytest.raises(UserError, match="Class 'dog' has 2 image"):
        stratified_split(
            np.array([0] * 50 + [1] * 2),
            ids=_ids(range(52)),
            fractions={"val": 0.1, "test": 0.1},
            seed=0,
            class_names=["cat", "dog"],
        )


def test_fractions_summing_to_one_are_refused():
    with pytest.raises(UserError, match="nothing to train on"):
        stratified_split(
            _targets(), ids=_ids(range(500)), fractions={"val": 0.5, "test": 0.5}, seed=0
        )


def test_cap_per_class():
    t = _targets()
    kept = cap_per_class(t, ids=_ids(t), max_per_class=7, seed=0)
    assert all((t[kept] == c).sum() == 7 for c in range(5))
    assert np.array_equal(kept, cap_per_class(t, ids=_ids(t), max_per_class=7, seed=0))


def test_a_samples_place_depends_on_its_id_not_on_its_position():
    t = _targets()
    ids = _ids(t)
    order = np.random.default_rng(1).permutation(len(t))
    a = stratified_split(t, ids=ids, fractions={"val": 0.2, "test": 0.1}, seed=3)
    b = stratified_split(
        t[order], ids=[ids[i] for i in order], fractions={"val": 0.2, "test": 0.1}, seed=3
    )
    for name in a:
        assert {ids[i] for i in a[name]} == {ids[order[i]] for i in b[name]}
