"""Labels tables, finding bags by slide id, and bag datasets streamed from disk.

A labels table is a CSV/TSV with ``slide_id``, ``patient_id`` (case) and ``label`` (class name) columns
(names configurable) and any extra columns. Bags are found by slide id in a job directory
(``<job>/bags/<spec>/<encoder>/<slide_id>.h5|.zarr``) or a folder of bag files (``<slide_id>.h5|.zarr|.pt``,
any layout :func:`wsikit.bags.read_bag` understands). :class:`BagDataset` reads one bag per item, so a
thousand slides never sit in memory at once.

Before training, :func:`check_training_data` refuses a set with fewer than two classes and, through
:func:`check_bags`, every unusable bag at once: unreadable, empty (0 tiles: refused, not skipped),
features and coordinates of different lengths, NaN/Inf features, or another encoder than the others
(feature size, ``encoder`` or ``weights_id`` attribute). A patient whose slides carry different labels
(a tumour and a normal slide of one case) is allowed: splits keep the patient on one side and stratify by
its most common label; :func:`match_bags` reports such patients.
"""

from __future__ import annotations

import functools
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from wsikit.bags import iter_bags, open_features, read_bag
from wsikit.io import first_line, jsonable, read_table

PROVENANCE_KEYS = (
    "encoder", "encoder_name", "weights_id", "spec", "spec_name", "mpp", "target_mpp", "patch_size",
    "patch_size_level0", "stain", "normalizer", "wsikit_version", "dtype", "precision",
)  # fmt: skip


class DataError(ValueError):
    """Labels or bags that do not fit together; the message names the file and the fix."""


@dataclass
class LabelsTable:
    """Slides with their patient and class; ``y`` are indices into ``class_names``."""

    path: Path | None
    slide_ids: list[str]
    patients: list[str]
    labels: list[str]
    class_names: list[str]
    extra: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # merged duplicate rows, patients with mixed labels

    @property
    def y(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.class_names)}
        return np.asarray([index[lab] for lab in self.labels], dtype=np.int64)

    def subset(self, keep: Sequence[int]) -> LabelsTable:
        pick = lambda values: [values[i] for i in keep]  # noqa: E731
        return LabelsTable(
            self.path,
            pick(self.slide_ids),
            pick(self.patients),
            pick(self.labels),
            self.class_names,
            {k: pick(v) for k, v in self.extra.items()},
            self.warnings,
        )


def read_labels(
    path: str | os.PathLike,
    label_col: str = "label",
    slide_col: str = "slide_id",
    patient_col: str = "patient_id",
    classes: Sequence[str] | None = None,
) -> LabelsTable:
    """Read and check a labels table; ``classes`` fixes the class order (default: sorted names).

    Refuses text that is not UTF-8, missing columns, empty cells, a slide listed twice with different
    labels or patients, labels outside ``classes`` (listed with counts) and fewer than two classes. Exact
    duplicate rows are merged and, like patients with slides of different labels, noted in ``warnings``.
    """
    path = Path(path)
    rows = read_table(path, "labels table", DataError)
    if not rows:
        raise DataError(f"{path}: the labels table is empty")
    missing = [c for c in (slide_col, patient_col, label_col) if c not in rows[0]]
    if missing:
        hint = (
            " (if every slide is its own patient, copy slide_id into a patient_id column)"
            if patient_col in missing
            else ""
        )
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(rows[0])}{hint}")
    seen: dict[str, tuple[str, str]] = {}
    order: list[str] = []
    merged: list[int] = []
    extra_cols = [c for c in rows[0] if c not in (slide_col, patient_col, label_col)]
    extra: dict[str, list[str]] = {c: [] for c in extra_cols}
    for n, row in enumerate(rows, start=2):
        sid, pid, lab = ((row.get(c) or "").strip() for c in (slide_col, patient_col, label_col))
        if not sid or not pid or not lab:
            raise DataError(
                f"{path}:{n}: empty {slide_col}, {patient_col} or {label_col}; fill it or drop the row"
            )
        if sid in seen:
            if seen[sid] != (pid, lab):
                raise DataError(
                    f"{path}:{n}: slide {sid!r} listed twice with different patient or label; keep one row"
                )
            merged.append(n)
            continue
        seen[sid] = (pid, lab)
        order.append(sid)
        for c in extra_cols:
            extra[c].append((row.get(c) or "").strip())
    labels = [seen[s][1] for s in order]
    if classes is None:
        class_names = sorted(set(labels))
    else:
        class_names = list(classes)
        unknown = Counter(lab for lab in labels if lab not in class_names)
        if unknown:
            listed = ", ".join(f"{k!r} ({v})" for k, v in unknown.most_common())
            raise DataError(
                f"{path}: labels not among the classes {class_names}: {listed}; fix the table or --classes"
            )
    present = sorted(set(labels))
    if len(present) < 2:
        raise DataError(
            f"{path}: every slide has label {present[0]!r}; a classifier needs at least 2 classes, "
            f"add slides of another class (or check --label-col {label_col})"
        )
    patients = [seen[s][0] for s in order]
    notes = (
        [f"merged {len(merged)} duplicate row(s) (lines {', '.join(map(str, merged[:10]))})"]
        if merged
        else []
    )
    notes.extend(_mixed_patients(patients, labels))
    return LabelsTable(path, order, patients, labels, class_names, extra, notes)


def _mixed_patients(patients: Sequence[str], labels: Sequence[str]) -> list[str]:
    per: dict[str, set[str]] = defaultdict(set)
    for pat, lab in zip(patients, labels, strict=True):
        per[pat].add(lab)
    mixed = sorted(p for p, labs in per.items() if len(labs) > 1)
    if not mixed:
        return []
    examples = ", ".join(f"{p} ({'/'.join(sorted(per[p]))})" for p in mixed[:5])
    return [
        f"{len(mixed)} patient(s) have slides of different labels, e.g. {examples}; each stays on one side "
        "of every split, stratified by its most common label"
    ]


def find_bags(
    source: str | os.PathLike, spec: str | None = None, encoder: str | None = None
) -> dict[str, Path]:
    """Map slide id → bag path from a job directory or a folder of bag files."""
    root = Path(source)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give a job directory or a folder of bag files")
    if (root / "bags").is_dir():
        combos = sorted(
            p
            for p in (root / "bags").glob("*/*")
            if p.is_dir()
            and (spec is None or p.parent.name == spec)
            and (encoder is None or p.name == encoder)
        )
        if not combos:
            have = sorted(f"{p.parent.name}/{p.name}" for p in (root / "bags").glob("*/*") if p.is_dir())
            raise DataError(
                f"{root}/bags: no <spec>/<encoder> folder matches --spec {spec} --encoder {encoder} "
                f"(found: {', '.join(have) or 'none'}); or give the folder that holds the bag files"
            )
        if len(combos) > 1:
            names = ", ".join(f"{p.parent.name}/{p.name}" for p in combos)
            raise DataError(f"{root}: several bag sets ({names}); choose one with --spec and --encoder")
        root = combos[0]
    bags: dict[str, Path] = {}
    for p in iter_bags(root):
        bags.setdefault(p.stem, p)
    if not bags:
        raise DataError(f"{root}: no bag files (*.h5, *.zarr, *.pt) found")
    return bags


def match_bags(
    table: LabelsTable, bags: dict[str, Path], skip_missing: bool = False
) -> tuple[LabelsTable, list[Path], list[str]]:
    """Keep the labelled slides that have bags; returns (table, bag paths in table order, warnings).

    Labelled slides without a bag are an error (listed, with the count) unless ``skip_missing``; bags
    without a label are reported as a warning, followed by the table's own warnings.
    """
    warnings = []
    missing = [s for s in table.slide_ids if s not in bags]
    if missing and not skip_missing:
        raise DataError(
            f"{len(missing)} of {len(table.slide_ids)} labelled slides have no bag "
            f"(e.g. {', '.join(missing[:5])}); extract them, or pass --skip-missing to leave them out"
        )
    if missing:
        warnings.append(f"left out {len(missing)} labelled slides without a bag: {', '.join(missing[:10])}")
    unlabelled = sorted(set(bags) - set(table.slide_ids))
    if unlabelled:
        warnings.append(
            f"{len(unlabelled)} bags have no label and are not used: {', '.join(unlabelled[:10])}"
        )
    keep = [i for i, s in enumerate(table.slide_ids) if s in bags]
    sub = table.subset(keep)
    return sub, [bags[s] for s in sub.slide_ids], [*warnings, *table.warnings]


def bag_dims(paths: Sequence[Path]) -> int:
    """The common feature dimension of the bags, after :func:`check_bags` (every unusable bag named at once)."""
    report = check_bags(paths)
    report.raise_for_problems()
    return int(report.dim)  # type: ignore[arg-type]


@dataclass
class BagReport:
    """What :func:`check_bags` found: the common feature size and encoder, and each unusable bag's reasons."""

    paths: list[Path]
    dim: int | None
    encoder: dict[str, str]
    tiles: int
    problems: dict[Path, list[str]] = field(default_factory=dict)

    def raise_for_problems(self) -> None:
        """Raise one :class:`DataError` naming every unusable bag with its reasons and the fix."""
        if not self.problems:
            return
        listed = "; ".join(f"{p} ({', '.join(why)})" for p, why in self.problems.items())
        raise DataError(
            f"{len(self.problems)} of {len(self.paths)} bags cannot be used: {listed}; drop these slides from "
            "the labels table or re-extract their bags with one encoder (an empty bag has no tissue tiles: "
            "drop it, or re-tile with a lower --min-tissue)"
        )


IDENTITY_KEYS = ("encoder", "weights_id")
_SCAN_BYTES = 1 << 24  # features read per chunk by the NaN/Inf scan


def _identity(attrs: Any) -> dict[str, str]:
    out = {}
    for key in IDENTITY_KEYS:
        value = attrs.get(key)
        if value is not None:
            out[key] = value.decode() if isinstance(value, bytes) else str(value)
    return out


def _non_finite(features: Any, n: int, dim: int) -> int:
    """Count NaN/Inf values, reading ``_SCAN_BYTES`` of features at a time."""
    rows = max(1, _SCAN_BYTES // (4 * max(dim, 1)))
    bad = 0
    for start in range(0, n, rows):
        chunk = features[start : start + rows]
        chunk = chunk.float().numpy() if isinstance(chunk, torch.Tensor) else np.asarray(chunk)
        bad += int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
    return bad


@functools.lru_cache(maxsize=65536)
def _inspect_bag(
    path: str, size: int, mtime_ns: int
) -> tuple[int, int | None, dict[str, str], tuple[str, ...]]:
    """(tiles, feature size, encoder identity, problems) of one bag; remembered per file version, so the
    CLI's check and training's own check scan the features once."""
    del size, mtime_ns  # part of the cache key only
    try:
        with open_features(path) as (features, n_coords, attrs):
            identity = _identity(attrs)
            if features is None or len(features.shape) != 2:
                shape = None if features is None else tuple(features.shape)
                return 0, None, {}, (f"features of shape {shape}, not (tiles, dim)",)
            n, d = (int(v) for v in features.shape)
            why = []
            if n == 0:
                why.append("0 tiles")
            if n_coords is not None and n_coords != n:
                why.append(f"{n} feature rows but {n_coords} coordinates")
            if n and (bad := _non_finite(features, n, d)):
                why.append(f"{bad} NaN/Inf feature values")
            return n, d, identity, tuple(why)
    except Exception as exc:  # every reader raises its own types: name the file and go on
        return 0, None, {}, (f"unreadable: {first_line(exc)}",)


def check_bags(paths: Sequence[Path]) -> BagReport:
    """Check bags before training, one at a time (features are scanned in chunks, never held whole).

    A bag is unusable when unreadable, empty (0 tiles), when its features and coordinates differ in length,
    when its feature size or ``encoder``/``weights_id`` attribute differs from most bags', or when its
    features hold NaN or Inf.
    """
    problems: dict[Path, list[str]] = defaultdict(list)
    dims: dict[Path, int] = {}
    identities: dict[Path, dict[str, str]] = {}
    tiles = 0
    for p in map(Path, paths):
        try:
            stat = p.stat()
        except OSError as exc:
            problems[p].append(f"unreadable: {exc.strerror}")
            continue
        n, d, identity, why = _inspect_bag(str(p), stat.st_size, stat.st_mtime_ns)
        if why:
            problems[p].extend(why)
        if d is not None:
            dims[p], identities[p] = d, identity
            tiles += n
    dim = None
    if dims:
        dim = Counter(dims.values()).most_common(1)[0][0]
        for p, d in dims.items():
            if d != dim:
                problems[p].append(f"{d}-d features (different feature sizes: the others are {dim}-d)")
    encoder: dict[str, str] = {}
    for key in IDENTITY_KEYS:
        values = {p: i[key] for p, i in identities.items() if key in i}
        if not values:
            continue
        encoder[key] = Counter(values.values()).most_common(1)[0][0]
        for p, v in values.items():
            if v != encoder[key]:
                problems[p].append(f"{key} {v!r}, the others {encoder[key]!r}")
    order = {p: i for i, p in enumerate(map(Path, paths))}
    ordered = dict(sorted(problems.items(), key=lambda kv: order[kv[0]]))
    return BagReport([Path(p) for p in paths], dim, encoder, tiles, ordered)


def check_training_data(table: LabelsTable, paths: Sequence[Path]) -> BagReport:
    """Refuse, before any training, a set with fewer than two classes or any unusable bag (all named at once)."""
    present = sorted(set(table.labels))
    if len(present) < 2:
        raise DataError(
            f"{table.path}: the {len(paths)} slides with bags all have label {present[0] if present else None!r}; "
            "training needs at least 2 classes, add or extract slides of another class"
        )
    report = check_bags(paths)
    report.raise_for_problems()
    return report


def bag_provenance(paths: Sequence[Path], source: str | os.PathLike | None = None) -> dict[str, Any]:
    """What produced the bags (encoder, tile spec, stain, ...) from the first bag's attributes."""
    bag = read_bag(paths[0])
    attrs = {**bag.coords_attrs, **bag.attrs}
    kept = {k: jsonable(v) for k, v in attrs.items() if k in PROVENANCE_KEYS or k.startswith("encoder")}
    return {
        "source": str(source) if source else str(Path(paths[0]).parent),
        "n_bags": len(paths),
        "attrs": kept,
    }


class BagDataset(Dataset):
    """One bag per item, read from disk on access: ``{"features", "coords", "label", "slide_id", "index"}``.

    ``max_tiles`` randomly subsamples larger bags (a fresh draw per :meth:`set_epoch`, reproducible from
    ``seed``); use it for training only.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | None = None,
        slide_ids: Sequence[str] | None = None,
        max_tiles: int | None = None,
        seed: int = 0,
    ):
        self.paths = [Path(p) for p in paths]
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.slide_ids = list(slide_ids) if slide_ids is not None else [p.stem for p in self.paths]
        self.max_tiles = max_tiles
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        bag = read_bag(self.paths[i])
        return np.asarray(bag.features), np.asarray(bag.coords)

    def __getitem__(self, i: int) -> dict[str, Any]:
        feats, coords = self.load(i)
        if feats.shape[0] == 0:
            raise DataError(f"{self.paths[i]}: the bag has no tiles; drop the slide or re-run tiling")
        if self.max_tiles and feats.shape[0] > self.max_tiles:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            pick = np.sort(rng.choice(feats.shape[0], self.max_tiles, replace=False))
            feats, coords = feats[pick], coords[pick]
        return {
            "features": torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)),
            "coords": torch.from_numpy(np.ascontiguousarray(coords, dtype=np.int64)),
            "label": -1 if self.labels is None else int(self.labels[i]),
            "slide_id": self.slide_ids[i],
            "index": i,
        }


class ArrayBagDataset(BagDataset):
    """Bags already in memory (benchmarks, tests, small studies): same items as :class:`BagDataset`."""

    def __init__(
        self,
        features: Sequence[np.ndarray],
        labels: Sequence[int] | None = None,
        coords: Sequence[np.ndarray] | None = None,
        slide_ids: Sequence[str] | None = None,
        max_tiles: int | None = None,
        seed: int = 0,
    ):
        ids = list(slide_ids) if slide_ids is not None else [f"bag{i}" for i in range(len(features))]
        super().__init__([Path(s) for s in ids], labels, ids, max_tiles, seed)
        self.features = list(features)
        self.coords = (
            list(coords) if coords is not None else [np.zeros((len(f), 2), np.int64) for f in features]
        )

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.features[i], self.coords[i]


def first_item(batch: list[Any]) -> Any:
    """DataLoader collate for one bag per step."""
    return batch[0]
