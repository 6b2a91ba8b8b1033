"""Property-based checks: bag files round-trip exactly, patient-level folds keep their promises.

Tiling geometry (aligned grids, tissue fractions) has its properties in ``test_tiling.py`` and leak-free
k-fold with a held-out test set in ``test_splits.py``; this file adds what those leave out.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsikit.bags import Bag, read_bag, read_bag_shape, write_bag
from wsikit.mil.data import check_bags
from wsikit.splits import load_splits, patient_kfold, save_splits

FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def bags(draw):
    n = draw(st.integers(0, 40))
    dim = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    features = rng.normal(scale=draw(st.sampled_from([1e-3, 1.0, 100.0])), size=(n, dim)).astype(dtype)
    coords = rng.integers(0, 2**40, size=(n, 2), dtype=np.int64)
    attrs = {
        "encoder": draw(st.text("abcdefgh-_:/0123456789", min_size=1, max_size=20)),
        "weights_id": f"sha256:{seed:08x}",
        "mpp": draw(st.floats(0.1, 2.0)),
        "note": draw(st.text(max_size=20) | st.just("json:[1]")),  # NUL bytes and our own prefix included
        "spec": {"mpp": 0.5, "size": draw(st.integers(16, 1024))},
    }
    coords_attrs = {"patch_size_level0": draw(st.integers(1, 4096))}
    return Bag(features, coords, attrs, coords_attrs), draw(st.sampled_from(["h5", "zarr"]))


@FAST
@given(bags())
def test_bag_round_trip(drawn):
    bag, fmt = drawn
    with tempfile.TemporaryDirectory() as tmp:
        path = write_bag(Path(tmp) / f"slide.{fmt}", bag)
        back = read_bag(path)
        assert back.features.dtype == bag.features.dtype
        np.testing.assert_array_equal(back.features, bag.features)
        np.testing.assert_array_equal(back.coords, bag.coords)
        assert read_bag_shape(path) == bag.features.shape
        for key, value in bag.attrs.items():
            assert back.attrs[key] == value, key
        assert back.coords_attrs["patch_size_level0"] == bag.coords_attrs["patch_size_level0"]
        report = check_bags([path])
        assert report.dim == bag.dim and report.encoder["encoder"] == bag.attrs["encoder"]
        assert list(report.problems) == ([path] if len(bag) == 0 else [])


@st.composite
def cohorts(draw):
    """Patients with 1-3 slides, one label each (or some with two), classes with at least k patients."""
    k = draw(st.integers(2, 5))
    n_classes = draw(st.integers(2, 3))
    one_slide = draw(st.booleans())
    labels, patients = [], []
    pid = 0
    for c in range(n_classes):
        for _ in range(draw(st.integers(k, k + 10))):
            for s in range(1 if one_slide else draw(st.integers(1, 3))):
                mixed = not one_slide and s > 0 and draw(st.integers(0, 9)) == 0
                labels.append(f"c{(c + 1) % n_classes if mixed else c}")
                patients.append(f"P{pid:03d}")
            pid += 1
    order = draw(st.permutations(range(len(labels))))
    return [labels[i] for i in order], [patients[i] for i in order], k, draw(st.integers(0, 2**16))


@FAST
@given(cohorts())
def test_patient_folds(cohort):
    labels, patients, k, seed = cohort
    folds = patient_kfold(labels, patients, k, seed=seed)
    pats, labs = np.asarray(patients), np.asarray(labels)
    val_count = Counter(p for f in folds for p in set(pats[f.val]))
    assert set(val_count) == set(patients) and set(val_count.values()) == {1}  # each patient validated once
    for f in folds:
        assert not set(pats[f.train]) & set(pats[f.val])  # no patient on two sides
    if len(set(patients)) == len(patients):  # one slide per patient: stratified to within one per class
        for c in set(labels):
            per_fold = [int((labs[f.val] == c).sum()) for f in folds]
            assert max(per_fold) - min(per_fold) <= 1, (c, per_fold)
    with tempfile.TemporaryDirectory() as tmp:
        ids = [f"s{i}" for i in range(len(labels))]
        back = load_splits(save_splits(folds, ids, Path(tmp) / "splits.csv", patients, labels), ids)
        for a, b in zip(folds, back, strict=True):
            assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
