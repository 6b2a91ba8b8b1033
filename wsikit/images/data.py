"""Labelled image sets for the patch/X-ray core: MedMNIST ``.npz``, image folders, CSV manifests.

Every loader returns an :class:`ImageSet`: images (an in-memory uint8 array or file paths), integer
labels (``(N,)``; ``(N, K)`` 0/1 for multi-label sets such as ChestMNIST), class names, optional patient
ids and an optional predefined split per image (``train`` / ``val`` / ``test``).

Patient ids come from a manifest column or from file names by a regular expression; presets in
:data:`PATIENT_PRESETS` (``kermany``: ``person1946_bacteria_4874.jpeg`` → ``person1946``,
``NORMAL2-IM-1427-0001.jpeg`` → ``NORMAL2-IM-1427``). When a set has patient ids, :func:`split_set`
and :func:`kfold_set` split by patient through :mod:`wsikit.splits`; an image-level split of such a
set needs ``image_level=True`` and warns.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from wsikit.io import read_table
from wsikit.splits import Fold, SplitError, assert_no_leak, patient_kfold

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MEDMNIST_URL = "https://zenodo.org/records/10519652 (MedMNIST v2/+, files <name>mnist[_<size>].npz)"

#: File-name regexes whose first group is the patient id.
PATIENT_PRESETS: dict[str, str] = {
    # Kermany et al. 2018 chest X-rays: person<id>_<bacteria|virus>_<n>, IM-<id>-<n>, NORMAL2-IM-<id>-<n>
    "kermany": r"^(person\d+|(?:NORMAL2-)?IM-\d+)[_-]",
    # Kather 2016 texture tiles: the source slide is the patient, e.g. 1A11_CRC-Prim-HE-07_022.tif_Row...
    "kather2016": r"(CRC-Prim-HE-\d+)",
    # TCGA barcodes: TCGA-<TSS>-<participant>
    "tcga": r"(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})",
}

# Class names of MedMNIST 2D sets (the npz files carry only indices); from MedMNIST's INFO table.
MEDMNIST_CLASSES: dict[str, list[str]] = {
    "pathmnist": [
        "adipose", "background", "debris", "lymphocytes", "mucus", "smooth_muscle",
        "normal_colon_mucosa", "cancer_associated_stroma", "colorectal_adenocarcinoma_epithelium",
    ],
    "pneumoniamnist": ["normal", "pneumonia"],
    "chestmnist": [
        "atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia",
        "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural", "hernia",
    ],
    "breastmnist": ["malignant", "normal_benign"],
    "dermamnist": [
        "actinic_keratoses", "basal_cell_carcinoma", "benign_keratosis", "dermatofibroma", "melanoma",
        "melanocytic_nevi", "vascular_lesions",
    ],
    "bloodmnist": [
        "basophil", "eosinophil", "erythroblast", "immature_granulocytes", "lymphocyte", "monocyte",
        "neutrophil", "platelet",
    ],
    "octmnist": ["choroidal_neovascularization", "diabetic_macular_edema", "drusen", "normal"],
}  # fmt: skip


class DataError(ValueError):
    """Unusable image-set input; the message names the file and the fix."""


@dataclass
class ImageSet:
    """Labelled images. ``images`` is a uint8 array (N, H, W) / (N, H, W, C) or a list of file paths."""

    images: np.ndarray | list[Path]
    labels: np.ndarray
    class_names: list[str]
    patients: np.ndarray | None = None
    split: np.ndarray | None = None
    source: str = ""
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.images) != len(self.labels):
            raise DataError(f"{self.source}: {len(self.images)} images but {len(self.labels)} labels")
        if not self.names:
            self.names = (
                [p.name for p in self.images]
                if isinstance(self.images, list)
                else [str(i) for i in range(len(self))]
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        """1 for grey sets, 3 for colour ones (files: from the first image)."""
        if isinstance(self.images, np.ndarray):
            return 1 if self.images.ndim == 3 or self.images.shape[-1] == 1 else 3
        return 1 if _open(self.images[0]).mode in ("L", "I;16", "I", "F") else 3

    def class_counts(self) -> dict[str, int]:
        counts = (
            self.labels.sum(axis=0) if self.multilabel else np.bincount(self.labels, minlength=self.n_classes)
        )
        return {n: int(c) for n, c in zip(self.class_names, counts, strict=True)}

    def subset(self, idx: np.ndarray | Sequence[int]) -> ImageSet:
        idx = np.asarray(idx, dtype=np.int64)
        images = self.images[idx] if isinstance(self.images, np.ndarray) else [self.images[i] for i in idx]
        return replace(
            self,
            images=images,
            labels=self.labels[idx],
            patients=None if self.patients is None else self.patients[idx],
            split=None if self.split is None else self.split[idx],
            names=[self.names[i] for i in idx],
        )

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 (H, W) grey or (H, W, 3) RGB."""
        if isinstance(self.images, np.ndarray):
            img = self.images[i]
            return img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
        return read_image(self.images[i])


# -- reading images ------------------------------------------------------------------------------------
def _open(path: Path):
    from PIL import Image

    try:
        return Image.open(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the image ({exc}); re-export it as PNG/JPEG/TIFF") from exc


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A file as uint8 (H, W) if grey, else (H, W, 3) RGB (alpha dropped, 16-bit scaled to 8)."""
    im = _open(Path(path))
    if im.mode in ("I;16", "I;16B", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        return ((a - lo) / max(hi - lo, 1e-9) * 255).round().astype(np.uint8)
    if im.mode in ("L", "1", "LA"):
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))


# -- patient ids ---------------------------------------------------------------------------------------
def patient_ids(names: Sequence[str], pattern: str) -> np.ndarray:
    """Patient id of each file name: the first group (or whole match) of ``pattern`` or a preset name."""
    regex = re.compile(PATIENT_PRESETS.get(pattern, pattern))
    out = []
    for name in names:
        m = regex.search(Path(name).name)
        if m is None:
            raise DataError(
                f"{name}: patient pattern {pattern!r} does not match this file name; pass another "
                f"--patient-regex (presets: {', '.join(PATIENT_PRESETS)}) or a patient_id column"
            )
        out.append(m.group(1) if m.groups() else m.group(0))
    return np.asarray(out, dtype=object)


# -- loaders -------------------------------------------------------------------------------------------
def load_medmnist(path: str | os.PathLike, class_names: Sequence[str] | None = None) -> ImageSet:
    """A MedMNIST 2D ``.npz`` (``train_images``/``train_labels``, ``val_…``, ``test_…``), any size.

    Labels (N, 1) become (N,); multi-label sets (N, K>1, e.g. ChestMNIST) stay (N, K). Class names
    come from ``class_names``, else MedMNIST's table by file name, else ``class0..``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; MedMNIST .npz files are published at {MEDMNIST_URL}")
    with np.load(path) as z:
        parts = [s for s in ("train", "val", "test") if f"{s}_images" in z]
        if not parts:
            raise DataError(f"{path}: not a MedMNIST .npz (no train_images/val_images/test_images arrays)")
        images = np.concatenate([z[f"{s}_images"] for s in parts])
        labels = np.concatenate([z[f"{s}_labels"] for s in parts]).astype(np.int64)
        split = np.concatenate([np.full(len(z[f"{s}_labels"]), s, dtype=object) for s in parts])
    if images.dtype != np.uint8:
        raise DataError(f"{path}: images are {images.dtype}, expected uint8 as in MedMNIST")
    labels = labels[:, 0] if labels.ndim == 2 and labels.shape[1] == 1 else labels
    n_classes = labels.shape[1] if labels.ndim == 2 else int(labels.max()) + 1
    if class_names is None:
        known = MEDMNIST_CLASSES.get(path.stem.split("_")[0].lower())
        class_names = known if known and len(known) >= n_classes else [f"class{i}" for i in range(n_classes)]
    return ImageSet(images, labels, list(class_names), split=split, source=str(path))


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def load_folder(root: str | os.PathLike, class_names: Sequence[str] | None = None) -> ImageSet:
    """``root/<CLASS>/…`` or ``root/<split>/<CLASS>/…`` (split in train/val/valid/test), Kaggle-style.

    Classes are sorted folder names unless ``class_names`` fixes the order.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; expected root/<CLASS>/*.png or root/<split>/<CLASS>/*.png")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_NAMES]
    rows: list[tuple[Path, str, str | None]] = []
    for top in split_dirs or [root]:
        split = SPLIT_NAMES[top.name.lower()] if split_dirs else None
        for cls in sorted(d for d in top.iterdir() if d.is_dir() and not d.name.startswith(".")):
            rows += [(p, cls.name, split) for p in _images_under(cls)]
    if not rows:
        raise DataError(
            f"{root}: no images in class sub-folders (root/<CLASS>/*.png or root/<split>/<CLASS>/)"
        )
    names = list(class_names) if class_names else sorted({c for _, c, _ in rows})
    unknown = sorted({c for _, c, _ in rows} - set(names))
    if unknown:
        raise DataError(f"{root}: folders {unknown} are not in the given class names {names}")
    return ImageSet(
        images=[p for p, _, _ in rows],
        labels=np.array([names.index(c) for _, c, _ in rows]),
        class_names=names,
        split=np.array([s for _, _, s in rows], dtype=object) if split_dirs else None,
        source=str(root),
        names=[str(p.relative_to(root)) for p, _, _ in rows],
    )


def load_manifest(path: str | os.PathLike, class_names: Sequence[str] | None = None) -> ImageSet:
    """A CSV/TSV with columns ``path`` (or ``file``), ``label`` and optional ``patient_id``, ``split``.

    Relative paths are taken from the manifest's folder. Labels are class names (sorted unless
    ``class_names`` is given) or integer indices.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: no such manifest; expected a CSV with columns path,label[,patient_id][,split]"
        )
    rows = read_table(path, "manifest", DataError)
    if not rows:
        raise DataError(f"{path}: the manifest has no rows")
    cols = {c.strip().lower(): c for c in rows[0]}
    path_col = cols.get("path") or cols.get("file") or cols.get("filename")
    label_col = cols.get("label") or cols.get("class")
    if path_col is None or label_col is None:
        raise DataError(f"{path}: needs columns path (or file) and label; found {list(rows[0])}")
    files = [
        Path(r[path_col]) if Path(r[path_col]).is_absolute() else path.parent / r[path_col] for r in rows
    ]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"{path}: {len(missing)} listed images do not exist, e.g. {missing[0]}; fix the paths"
        )
    raw = [r[label_col].strip() for r in rows]
    if class_names is None and all(v.lstrip("-").isdigit() for v in raw):
        labels = np.array([int(v) for v in raw])
        names = [f"class{i}" for i in range(labels.max() + 1)]
    else:
        names = list(class_names) if class_names else sorted(set(raw))
        bad = sorted(set(raw) - set(names))
        if bad:
            raise DataError(f"{path}: labels {bad} are not in the class names {names}")
        labels = np.array([names.index(v) for v in raw])
    patients = split = None
    if "patient_id" in cols:
        patients = np.array([r[cols["patient_id"]].strip() for r in rows], dtype=object)
    if "split" in cols:
        values = [r[cols["split"]].strip().lower() for r in rows]
        if set(values) - set(SPLIT_NAMES):
            raise DataError(f"{path}: split values must be train/val/test, got {sorted(set(values))}")
        split = np.array([SPLIT_NAMES[v] for v in values], dtype=object)
    return ImageSet(files, labels, names, patients=patients, split=split, source=str(path))


def load_images(
    source: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    patient_regex: str | None = None,
) -> ImageSet:
    """Load a ``.npz`` (MedMNIST), a CSV/TSV manifest or an image folder; add patient ids by regex."""
    source = Path(source)
    if source.suffix.lower() == ".npz":
        data = load_medmnist(source, class_names)
    elif source.suffix.lower() in (".csv", ".tsv", ".txt"):
        data = load_manifest(source, class_names)
    elif source.is_dir():
        data = load_folder(source, class_names)
    else:
        raise DataError(f"{source}: not found or not a .npz, .csv/.tsv manifest or image folder")
    if patient_regex:
        if isinstance(data.images, np.ndarray):
            raise DataError(
                f"{source}: a .npz has no file names to take patient ids from; drop --patient-regex"
            )
        data.patients = patient_ids([p.name for p in data.images], patient_regex)
    return data


# -- splits --------------------------------------------------------------------------------------------
def _groups(data: ImageSet, image_level: bool) -> np.ndarray:
    if data.patients is None:
        return np.arange(len(data)).astype(str)
    if image_level:
        warnings.warn(
            f"{data.source}: splitting by image although patient ids exist; images of one patient "
            "will land in several splits and the scores will be optimistic",
            stacklevel=3,
        )
        return np.arange(len(data)).astype(str)
    return np.asarray(data.patients).astype(str)


def _require_classes(data: ImageSet) -> None:
    """Refuse to split a single-class set for training (patients may have images of several classes)."""
    present = np.unique(data.labels)
    if not data.multilabel and present.size < 2:
        name = data.class_names[int(present[0])] if present.size else None
        raise DataError(
            f"{data.source}: every image has class {name!r}; training needs at least 2 classes, "
            "add images of another class (or check the label column)"
        )


def _strata(data: ImageSet) -> np.ndarray:
    # multi-label sets stratify on their rarest positive label (0 = none), a common approximation
    if not data.multilabel:
        return data.labels
    freq = data.labels.sum(axis=0)
    order = np.argsort(freq)
    out = np.zeros(len(data), dtype=np.int64)
    for k in order[::-1]:
        out[data.labels[:, k] == 1] = k + 1
    return out


def split_set(
    data: ImageSet,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    image_level: bool = False,
) -> dict[str, np.ndarray]:
    """Indices for ``train``/``val``/``test``.

    A set with its own split column (MedMNIST, ``root/<split>/…`` folders, a manifest ``split``
    column) keeps it, with a warning if a patient crosses it; a set without ``val`` gets one carved
    out of ``train``. Otherwise a new stratified split, patient-level whenever patient ids exist.
    """
    _require_classes(data)
    k = max(2, round(1.0 / val_fraction))
    if data.split is not None and (data.split == "train").any():
        parts = {s: np.flatnonzero(data.split == s) for s in ("train", "val", "test")}
        if not len(parts["val"]):
            pool = parts["train"]
            sub = data.subset(pool)
            f = patient_kfold(_strata(sub), _groups(sub, image_level), k=k, seed=seed)[0]
            parts["train"], parts["val"] = pool[f.train], pool[f.val]
        if data.patients is not None and not image_level:
            try:
                assert_no_leak(np.asarray(data.patients).astype(str), [Fold(**parts)])
            except SplitError as exc:
                warnings.warn(f"{data.source}: the predefined split leaks patients: {exc}", stacklevel=2)
        return parts
    folds = patient_kfold(
        _strata(data), _groups(data, image_level), k=k, seed=seed, test_fraction=test_fraction
    )
    f = folds[0]
    return {"train": np.asarray(f.train), "val": np.asarray(f.val), "test": np.asarray(f.test)}


def kfold_set(data: ImageSet, k: int, seed: int = 0, test_fraction: float = 0.0, image_level: bool = False):
    """``k`` stratified folds (``wsikit.splits.Fold``), patient-level whenever patient ids exist.

    A predefined ``test`` split stays the test set of every fold; otherwise ``test_fraction`` of the
    patients is held out.
    """
    _require_classes(data)
    test_idx = None
    if data.split is not None and (data.split == "test").any():
        test_idx = np.flatnonzero(data.split == "test")
    return patient_kfold(
        _strata(data),
        _groups(data, image_level),
        k=k,
        seed=seed,
        test_fraction=0.0 if test_idx is not None else test_fraction,
        test_idx=test_idx,
    )
