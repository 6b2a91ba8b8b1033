"""Patient-level splits never leak a patient, keep classes stratified, round-trip through CSV."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsikit.splits import (
    Fold,
    SplitError,
    assert_no_leak,
    load_splits,
    patient_kfold,
    read_test_ids,
    save_splits,
)


@st.composite
def label_tables(draw):
    """Random tables: 2-4 classes, 1-4 slides per patient, each class with enough patients for k."""
    k = draw(st.integers(2, 5))
    n_classes = draw(st.integers(2, 4))
    labels, patients = [], []
    pid = 0
    for c in range(n_classes):
        for _ in range(draw(st.integers(k + 2, k + 12))):
            n_slides = draw(st.integers(1, 4))
            # a few patients have slides of two classes (e.g. tumour and normal slide of one case)
            mixed = draw(st.booleans()) and draw(st.integers(0, 9)) == 0
            for s in range(n_slides):
                labels.append(f"class{(c + 1) % n_classes if mixed and s else c}")
                patients.append(f"P{pid:04d}")
            pid += 1
    order = draw(st.permutations(range(len(labels))))
    test_fraction = draw(st.sampled_from([0.0, 0.0, 0.15, 0.25]))
    seed = draw(st.integers(0, 2**16))
    return [labels[i] for i in order], [patients[i] for i in order], k, test_fraction, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label_tables())
def test_kfold_never_leaks_and_covers(table):
    labels, patients, k, test_fraction, seed = table
    try:
        folds = patient_kfold(labels, patients, k, seed=seed, test_fraction=test_fraction)
    except SplitError as exc:  # holding out a test set may leave a class with < k patients: refused cleanly
        assert test_fraction > 0 and "patients per class" in str(exc)
        return
    n = len(labels)
    pats = np.asarray(patients)
    assert len(folds) == k
    test = folds[0].test
    for fold in folds:
        assert np.array_equal(fold.test, test)
        assert not set(pats[fold.train]) & set(pats[fold.val])
        assert not set(pats[fold.train]) & set(pats[fold.test])
        assert not set(pats[fold.val]) & set(pats[fold.test])
        assert np.array_equal(np.sort(np.r_[fold.train, fold.val, fold.test]), np.arange(n))
        assert fold.val.size and fold.train.size
    # every non-test slide is validated exactly once
    vals = np.concatenate([f.val for f in folds])
    assert np.array_equal(np.sort(vals), np.setdiff1d(np.arange(n), test))
    if test_fraction > 0:
        assert test.size > 0
    assert_no_leak(patients, folds)


def test_deterministic_and_seed_dependent():
    rng = np.random.default_rng(0)
    labels = rng.choice(["a", "b"], 120).tolist()
    patients = [f"p{i // 2}" for i in range(120)]
    a = patient_kfold(labels, patients, 5, seed=1, test_fraction=0.2)
    b = patient_kfold(labels, patients, 5, seed=1, test_fraction=0.2)
    c = patient_kfold(labels, patients, 5, seed=2, test_fraction=0.2)
    assert all(np.array_equal(x.val, y.val) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x.val, y.val) for x, y in zip(a, c, strict=True))


def test_stratified():
    labels = ["pos"] * 40 + ["neg"] * 160
    patients = [f"p{i}" for i in range(200)]
    for fold in patient_kfold(labels, patients, 5, seed=0, test_fraction=0.2):
        val_pos = sum(labels[i] == "pos" for i in fold.val)
        assert 6 <= val_pos <= 10  # 20% of 32 non-test positives ≈ 6.4
    test = fold.test
    assert sum(labels[i] == "pos" for i in test) == 8


def test_leak_refused():
    patients = ["a", "a", "b", "c"]
    leaky = [Fold(np.array([0, 2]), np.array([1, 3]), np.array([], dtype=int))]
    with pytest.raises(SplitError, match="patient 'a'"):
        assert_no_leak(patients, leaky)
    with pytest.raises(SplitError, match="in both train and val"):
        assert_no_leak(patients, [Fold(np.array([0, 1]), np.array([1]), np.array([], dtype=int))])


def test_given_test_set_and_mixed_patient_refused():
    labels = ["a", "b"] * 20
    patients = [f"p{i // 2}" for i in range(40)]  # each patient: one a and one b slide
    folds = patient_kfold(labels, patients, 3, seed=0, test_idx=[0, 1, 2, 3])
    assert folds[0].test.tolist() == [0, 1, 2, 3]
    with pytest.raises(SplitError, match="both in the given test set"):
        patient_kfold(labels, patients, 3, seed=0, test_idx=[0])


def test_too_few_patients_message():
    labels = ["a"] * 10 + ["rare"] * 3
    patients = [f"p{i}" for i in range(13)]
    with pytest.raises(SplitError, match="'rare' has 3"):
        patient_kfold(labels, patients, 5)
    with pytest.raises(SplitError, match="k >= 2"):
        patient_kfold(labels, patients, 1)


def test_save_load_roundtrip(tmp_path):
    labels = ["x", "y"] * 15
    patients = [f"p{i}" for i in range(30)]
    ids = [f"s{i}" for i in range(30)]
    folds = patient_kfold(labels, patients, 3, seed=0, test_fraction=0.2)
    path = save_splits(folds, ids, tmp_path / "splits.csv", patients=patients, labels=labels)
    back = load_splits(path, ids)
    for a, b in zip(folds, back, strict=True):
        for part in ("train", "val", "test"):
            assert np.array_equal(getattr(a, part), getattr(b, part))
    # other id order: indices follow the new order
    shuffled = ids[::-1]
    back2 = load_splits(path, shuffled)
    assert sorted(shuffled[i] for i in back2[0].val) == sorted(ids[i] for i in folds[0].val)
    with pytest.raises(SplitError, match="have no bag or label"):
        load_splits(path, ids[:-1])
    (tmp_path / "test.csv").write_text("slide_id,split\ns1,test\ns2,train\ns3,test\n")
    assert read_test_ids(tmp_path / "test.csv") == ["s1", "s3"]
    (tmp_path / "t2.csv").write_text("slide_id\ns4\n")
    assert read_test_ids(tmp_path / "t2.csv") == ["s4"]
