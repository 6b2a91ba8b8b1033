"""Image sets, patient ids, patient-level splits, augmentation presets and grey handling."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch

from wsikit.images.augment import get_augment, normalize
from wsikit.images.data import (
    DataError,
    kfold_set,
    load_folder,
    load_images,
    load_manifest,
    load_medmnist,
    patient_ids,
    split_set,
)
from wsikit.splits import SplitError, assert_no_leak

KERMANY_NAMES = {
    "person1946_bacteria_4874.jpeg": "person1946",
    "person1946_bacteria_4875.jpeg": "person1946",
    "person1_virus_6.jpeg": "person1",
    "NORMAL2-IM-1427-0001.jpeg": "NORMAL2-IM-1427",
    "IM-0115-0001.jpeg": "IM-0115",
    "NORMAL2-IM-0381-0001-0002.jpeg": "NORMAL2-IM-0381",
}


def test_kermany_preset():
    assert list(patient_ids(list(KERMANY_NAMES), "kermany")) == list(KERMANY_NAMES.values())


def test_patient_regex_custom_and_error():
    assert list(patient_ids(["case12_slice3.png"], r"^(case\d+)_")) == ["case12"]
    with pytest.raises(DataError, match="does not match"):
        patient_ids(["scan_001.png"], "kermany")


@pytest.fixture(scope="module")
def kermany(shared_data):
    return load_images(shared_data / "xray" / "kermany_val", patient_regex="kermany")


def test_kermany_folder(kermany):
    assert len(kermany) == 16 and kermany.class_names == ["NORMAL", "PNEUMONIA"]
    assert kermany.class_counts() == {"NORMAL": 8, "PNEUMONIA": 8}
    assert len(set(kermany.patients)) == 15  # person1946 has two images
    assert kermany.channels == 1


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_no_patient_in_two_splits(kermany, seed):
    parts = split_set(kermany, val_fraction=0.34, test_fraction=0.25, seed=seed)
    sides = {s: set(kermany.patients[idx]) for s, idx in parts.items()}
    assert (
        not sides["train"] & sides["val"]
        and not sides["train"] & sides["test"]
        and not sides["val"] & sides["test"]
    )
    assert sum(len(v) for v in parts.values()) == 16
    twins = np.flatnonzero(kermany.patients == "person1946")
    assert len({s for s, idx in parts.items() for i in twins if i in idx}) == 1


def test_kfold_patient_level(kermany):
    folds = kfold_set(kermany, k=3, seed=0, test_fraction=0.25)
    assert len(folds) == 3
    assert_no_leak(kermany.patients, folds)
    assert all(len(f.test) and np.array_equal(f.test, folds[0].test) for f in folds)


def test_image_level_split_warns(kermany):
    with pytest.warns(UserWarning, match="patient ids exist"):
        split_set(kermany, val_fraction=0.5, image_level=True)


def test_leak_is_caught():
    folds = [type("F", (), {"train": np.array([0]), "val": np.array([1]), "test": np.array([], int)})()]
    with pytest.raises(SplitError, match="patient"):
        assert_no_leak(np.array(["p1", "p1"]), folds)


def test_medmnist(shared_data):
    d = load_medmnist(shared_data / "xray" / "pneumoniamnist_28.npz")
    assert d.class_names == ["normal", "pneumonia"] and not d.multilabel and d.channels == 1
    assert d.images.shape[1:] == (28, 28) and d.labels.ndim == 1
    assert {s: int((d.split == s).sum()) for s in ("train", "val", "test")} == {
        "train": 3882,
        "val": 524,
        "test": 624,
    }
    parts = split_set(d)  # the official split is kept
    assert len(parts["test"]) == 624 and (d.split[parts["val"]] == "val").all()


def test_medmnist_multilabel_rgb_and_missing(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 20), ("val", 6), ("test", 6)):
        arrays[f"{s}_images"] = rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{s}_labels"] = rng.integers(0, 2, (n, 14)).astype(np.uint8)
    np.savez(tmp_path / "chestmnist.npz", **arrays)
    d = load_medmnist(tmp_path / "chestmnist.npz")
    assert (
        d.multilabel and d.labels.shape == (32, 14) and d.class_names[1] == "cardiomegaly" and d.channels == 3
    )
    with pytest.raises(DataError, match="zenodo"):
        load_medmnist(tmp_path / "pathmnist.npz")


def test_folder_with_split_dirs_and_manifest(shared_data, tmp_path):
    src = sorted((shared_data / "xray" / "kermany_val").rglob("*.jpeg"))
    for i, f in enumerate(src):
        split = "train" if i % 4 else "val"
        dest = tmp_path / "ds" / split / f.parent.name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest / f.name)
    d = load_folder(tmp_path / "ds")
    assert len(d) == 16 and set(d.split) == {"train", "val"}
    manifest = tmp_path / "m.csv"
    rows = ["path,label,patient_id,split"] + [
        f"{f},{f.parent.name},{p},{'test' if i < 4 else 'train'}"
        for i, (f, p) in enumerate(zip(src, patient_ids([f.name for f in src], "kermany"), strict=True))
    ]
    manifest.write_text("\n".join(rows))
    m = load_manifest(manifest)
    assert m.class_names == ["NORMAL", "PNEUMONIA"] and m.patients[0] == "NORMAL2-IM-1427"
    parts = split_set(m, val_fraction=0.34)  # val carved out of train by patient
    assert len(parts["test"]) == 4 and len(parts["val"]) > 0
    assert not set(m.patients[parts["train"]]) & set(m.patients[parts["val"]])
    manifest.write_text("path,label\nmissing.png,A\n")
    with pytest.raises(DataError, match="do not exist"):
        load_manifest(manifest)


def test_histology_augment_only_moves_pixels():
    aug = get_augment("histology")
    assert aug.hflip and aug.vflip and aug.rot90 and aug.color == 0
    x = torch.rand(16, 3, 32, 32)
    y = aug(x, torch.Generator().manual_seed(0))
    for a, b in zip(x, y, strict=True):  # dihedral moves only: same pixel values, no colour change
        assert torch.equal(a.flatten(1).sort(1).values, b.flatten(1).sort(1).values)
    assert not torch.equal(x, y)


def test_xray_augment_is_small_and_upright():
    aug = get_augment("xray")
    assert not aug.vflip and not aug.hflip and not aug.rot90 and 0 < aug.degrees <= 15
    x = torch.zeros(8, 1, 64, 64)
    x[:, :, :16] = 1.0  # bright top band: must stay on top (no vertical flips, small rotations)
    y = aug(x, torch.Generator().manual_seed(0))
    assert (y[:, :, :8].mean((1, 2, 3)) > 0.7).all() and (y[:, :, -16:].mean((1, 2, 3)) < 0.05).all()
    with pytest.raises(ValueError, match="preset"):
        get_augment("nature")


def test_normalize_grey_uses_mean_of_encoder_stats():
    x = torch.full((1, 1, 2, 2), 0.5)
    out = normalize(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert torch.allclose(out, (0.5 - torch.tensor(0.449)) / torch.tensor(0.226), atol=1e-6)


def test_adapted_first_conv_equals_replicated_grey():
    from wsikit.images.models import build_classifier
    from wsikit.images.settings import ModelConfig

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rgb = build_classifier(ModelConfig(encoder="efficientnet-lite0", in_chans=3)).eval()
        grey = build_classifier(ModelConfig(encoder="efficientnet-lite0", in_chans=1)).eval()
    grey.head.load_state_dict(rgb.head.state_dict())
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        a = rgb(x.repeat(1, 3, 1, 1))
        b = grey(x)
    assert torch.allclose(a, b, atol=1e-4)
