"""Labels tables, finding bags by slide id, and bag datasets streamed from disk.

A labels table is a CSV/TSV with ``slide_id``, ``patient_id`` (case) and ``label`` (class name) columns
(names configurable) and any extra columns. Bags are found by slide id in a job directory
(``<job>/bags/<spec>/<encoder>/<slide_id>.h5|.zarr``) or a folder of bag files (``<slide_id>.h5|.zarr|.pt``,
any layout :func:`wsikit.bags.read_bag` understands). :class:`BagDataset` reads one bag per item, so a
thousand slides never sit in memory at once.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

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
        )


def read_labels(
    path: str | os.PathLike,
    label_col: str = "label",
    slide_col: str = "slide_id",
    patient_col: str = "patient_id",
    classes: Sequence[str] | None = None,
) -> LabelsTable:
    """Read and check a labels table; ``classes`` fixes the class order (default: sorted names).

    Refuses missing columns, empty cells, a slide listed twice with different labels or patients, and
    labels outside ``classes`` (listed with counts). Exact duplicate rows are merged.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the labels table ({exc.strerror})") from exc
    dialect = "excel-tab" if path.suffix.lower() in (".tsv", ".txt") else "excel"
    rows = list(csv.DictReader(text.splitlines(), dialect=dialect))
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
                raise DataError(f"{path}:{n}: slide {sid!r} listed twice with different patient or label")
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
    if len(class_names) < 2:
        raise DataError(f"{path}: need at least 2 classes, found {class_names}")
    return LabelsTable(path, order, [seen[s][0] for s in order], labels, class_names, extra)


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
    from wsikit.bags import iter_bags

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
    without a label are reported as a warning.
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
    return sub, [bags[s] for s in sub.slide_ids], warnings


def bag_dims(paths: Sequence[Path]) -> int:
    """The common feature dimension of the bags; refuses a mix (naming a file of each) or empty bags only."""
    from wsikit.bags import read_bag_shape

    dims: dict[int, Path] = {}
    for p in paths:
        _, d = read_bag_shape(p)
        dims.setdefault(int(d), p)
    if len(dims) > 1:
        listed = "; ".join(f"{d}-d e.g. {p}" for d, p in dims.items())
        raise DataError(f"bags have different feature sizes ({listed}); use bags of one encoder")
    return next(iter(dims))


def bag_provenance(paths: Sequence[Path], source: str | os.PathLike | None = None) -> dict[str, Any]:
    """What produced the bags (encoder, tile spec, stain, ...) from the first bag's attributes."""
    from wsikit.bags import read_bag

    bag = read_bag(paths[0])
    attrs = {**bag.coords_attrs, **bag.attrs}
    kept = {k: _plain(v) for k, v in attrs.items() if k in PROVENANCE_KEYS or k.startswith("encoder")}
    return {
        "source": str(source) if source else str(Path(paths[0]).parent),
        "n_bags": len(paths),
        "attrs": kept,
    }


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


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
        from wsikit.bags import read_bag

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
