"""Patient-level splits: stratified k-fold over patients, an optional held-out test set, leak checks.

Every slide of a patient lands on the same side of every split. Splits are saved as a long CSV::

    slide_id,patient_id,label,fold,split        split ∈ {train, val, test}

one row per slide and fold (a held-out test set repeats in every fold). :func:`load_splits` reads that
file back; :func:`read_test_ids` reads a user's test list (a CSV with ``slide_id`` and optionally
``split``: rows whose split is ``test``, or every row when there is no split column).
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from wsikit.io import write_text


class SplitError(ValueError):
    """A split that cannot be made or would leak a patient; the message says what to change."""


@dataclass(frozen=True)
class Fold:
    """Indices (into the slide list) of one fold's training, validation and held-out test slides."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _patient_labels(labels: np.ndarray, patients: np.ndarray) -> dict[str, object]:
    """Each patient's stratification label: the most common label of its slides (ties: smallest)."""
    per: dict[str, Counter] = defaultdict(Counter)
    for lab, pat in zip(labels, patients, strict=True):
        per[pat][lab] += 1
    return {p: min(c.items(), key=lambda kv: (-kv[1], str(kv[0])))[0] for p, c in per.items()}


def _holdout_patients(
    labels: np.ndarray, patients: np.ndarray, fraction: float, rng: np.random.Generator
) -> set[str]:
    """A stratified random ``fraction`` of each class's patients (at least one per class with ≥ 2)."""
    by_class: dict[object, list[str]] = defaultdict(list)
    for pat, lab in sorted(_patient_labels(labels, patients).items()):
        by_class[lab].append(pat)
    chosen: set[str] = set()
    for lab in sorted(by_class, key=str):
        pats = by_class[lab]
        n = round(fraction * len(pats))
        n = min(max(n, 1 if len(pats) >= 2 else 0), len(pats) - 1)
        chosen.update(rng.permutation(pats)[:n].tolist())
    return chosen


def patient_kfold(
    labels: Sequence,
    patients: Sequence,
    k: int,
    seed: int = 0,
    test_fraction: float = 0.0,
    test_idx: Sequence[int] | None = None,
) -> list[Fold]:
    """Stratified k-fold over patients (``StratifiedGroupKFold``), with an optional held-out test set.

    The test set is either ``test_idx`` (slide indices, e.g. from :func:`read_test_ids`; a patient with
    slides on both sides is refused) or a stratified ``test_fraction`` of each class's patients; it is
    the same in every fold and never in train or val. Each class needs at least ``k`` patients outside
    the test set.
    """
    labels_arr = np.asarray([str(v) for v in labels], dtype=object)
    patients_arr = np.asarray([str(p) for p in patients], dtype=object)
    n = labels_arr.size
    if patients_arr.size != n:
        raise SplitError(f"{n} labels but {patients_arr.size} patient ids")
    if k < 2:
        raise SplitError(f"k={k}: k-fold needs k >= 2 (use --folds 2 or more)")
    if not 0.0 <= test_fraction < 1.0:
        raise SplitError(f"test fraction {test_fraction}: use a number in [0, 1), e.g. 0.2")
    rng = np.random.default_rng(seed)
    if test_idx is not None:
        test = np.unique(np.asarray(test_idx, dtype=np.int64))
        test_patients = set(patients_arr[test])
        mixed = sorted(set(patients_arr[np.setdiff1d(np.arange(n), test)]) & test_patients)
        if mixed:
            raise SplitError(
                f"{len(mixed)} patient(s) have slides both in the given test set and outside it "
                f"(e.g. {mixed[0]}); put all of a patient's slides on one side"
            )
    elif test_fraction > 0:
        test_patients = _holdout_patients(labels_arr, patients_arr, test_fraction, rng)
        test = np.flatnonzero(np.isin(patients_arr, list(test_patients)))
    else:
        test = np.zeros(0, dtype=np.int64)
    rest = np.setdiff1d(np.arange(n), test)
    _check_enough_patients(labels_arr[rest], patients_arr[rest], k)
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=int(rng.integers(2**31 - 1)))
    folds = []
    for tr, va in sgkf.split(np.zeros(rest.size), labels_arr[rest], groups=patients_arr[rest]):
        folds.append(Fold(train=np.sort(rest[tr]), val=np.sort(rest[va]), test=test.copy()))
    assert_no_leak(patients_arr, folds)
    return folds


def _check_enough_patients(labels: np.ndarray, patients: np.ndarray, k: int) -> None:
    per_class: dict[str, set[str]] = defaultdict(set)
    for lab, pat in zip(labels, patients, strict=True):
        per_class[lab].add(pat)
    few = {lab: len(p) for lab, p in per_class.items() if len(p) < k}
    if few:
        text = ", ".join(f"{lab!r} has {n}" for lab, n in sorted(few.items()))
        raise SplitError(
            f"{k}-fold needs at least {k} patients per class outside the test set, but {text}; "
            "use fewer folds, a smaller test set, or drop that class"
        )


def assert_no_leak(patients: Sequence, folds: Sequence[Fold]) -> None:
    """Raise :class:`SplitError` if any fold shares a slide or a patient between train, val and test."""
    pats = np.asarray([str(p) for p in patients], dtype=object)
    for i, fold in enumerate(folds):
        parts = {"train": fold.train, "val": fold.val, "test": fold.test}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared_idx = np.intersect1d(parts[a], parts[b])
            if shared_idx.size:
                raise SplitError(f"fold {i}: slide index {int(shared_idx[0])} is in both {a} and {b}")
            shared = set(pats[parts[a]]) & set(pats[parts[b]])
            if shared:
                raise SplitError(
                    f"fold {i}: patient {sorted(shared)[0]!r} has slides in both {a} and {b} "
                    f"({len(shared)} patient(s) leak); split by patient"
                )


def save_splits(
    folds: Sequence[Fold],
    ids: Sequence[str],
    path: str | os.PathLike,
    patients: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
) -> Path:
    """Write the folds as a long CSV (see the module docstring); atomic."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["slide_id", "patient_id", "label", "fold", "split"])
    for f, fold in enumerate(folds):
        for split in ("train", "val", "test"):
            for i in getattr(fold, split):
                w.writerow(
                    [
                        ids[i],
                        patients[i] if patients is not None else "",
                        labels[i] if labels is not None else "",
                        f,
                        split,
                    ]
                )
    return write_text(path, buf.getvalue())


def _read_rows(path: Path) -> list[dict[str, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise SplitError(f"{path}: cannot read the split file ({exc.strerror})") from exc
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    return list(csv.DictReader(text.splitlines(), dialect=dialect))


def load_splits(path: str | os.PathLike, ids: Sequence[str]) -> list[Fold]:
    """Read folds saved by :func:`save_splits`, as indices into ``ids``.

    Slides in the file but not in ``ids`` are an error (their bags or labels are missing); slides of
    ``ids`` absent from the file are simply unused.
    """
    path = Path(path)
    rows = _read_rows(path)
    if not rows or not {"slide_id", "fold", "split"} <= set(rows[0]):
        raise SplitError(f"{path}: a split file needs columns slide_id, fold, split")
    index = {s: i for i, s in enumerate(ids)}
    missing = sorted({r["slide_id"] for r in rows} - set(index))
    if missing:
        raise SplitError(
            f"{path}: {len(missing)} slide(s) of the split file have no bag or label (e.g. {missing[0]}); "
            "fix the labels table or make new splits"
        )
    parts: dict[int, dict[str, list[int]]] = defaultdict(lambda: {"train": [], "val": [], "test": []})
    for n, r in enumerate(rows, start=2):
        split = r["split"].strip().lower()
        if split not in ("train", "val", "test"):
            raise SplitError(f"{path}:{n}: split {r['split']!r} must be train, val or test")
        try:
            fold = int(r["fold"])
        except ValueError as exc:
            raise SplitError(f"{path}:{n}: fold {r['fold']!r} is not an integer") from exc
        parts[fold][split].append(index[r["slide_id"]])
    as_arr = lambda v: np.asarray(sorted(v), dtype=np.int64)  # noqa: E731
    return [Fold(as_arr(p["train"]), as_arr(p["val"]), as_arr(p["test"])) for _, p in sorted(parts.items())]


def read_test_ids(path: str | os.PathLike) -> list[str]:
    """Slide ids of a user-given test set: rows with ``split == test``, or all rows without a split column."""
    path = Path(path)
    rows = _read_rows(path)
    if not rows or "slide_id" not in rows[0]:
        raise SplitError(f"{path}: a test list needs a slide_id column (and optionally split)")
    if "split" in rows[0]:
        return [r["slide_id"].strip() for r in rows if r["split"].strip().lower() == "test"]
    return [r["slide_id"].strip() for r in rows]
