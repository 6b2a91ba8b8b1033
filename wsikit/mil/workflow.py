"""The entry points behind `wsikit train` and `wsikit evaluate`: a labels table and a job's bags (or a folder
of bags) in, a k-fold run or an evaluation out. Each gathers and checks the data, then calls
:func:`wsikit.mil.cv.run_cv` or :func:`wsikit.mil.evaluate.evaluate_run`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsikit.mil.cv import clear_run, run_cv
from wsikit.mil.data import LabelsTable, bag_dims, bag_provenance, find_bags, match_bags, read_labels
from wsikit.mil.evaluate import evaluate_run
from wsikit.mil.registry import ModelError, list_models
from wsikit.mil.train import TrainConfig
from wsikit.splits import read_test_ids


@dataclass
class BagSource:
    """Where the bags are and how their slides are labelled."""

    bags: Path  # a job directory (its bags/<spec>/<encoder>/) or a folder of bag files
    labels: Path | None = None  # CSV/TSV with slide_id, patient_id, label
    spec: str | None = None  # bag spec folder, when the job has several
    encoder: str | None = None  # encoder folder, when the job has several
    label_col: str = "label"
    patient_col: str = "patient_id"
    classes: Sequence[str] | None = None  # class order (default: sorted)
    skip_missing: bool = False  # leave out labelled slides without a bag


@dataclass
class TrainingData:
    """The labelled slides with bags, their feature dimension and provenance, and what was left out."""

    table: LabelsTable
    paths: list[Path]
    dim: int
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def gather(source: BagSource) -> tuple[LabelsTable | None, list[str], list[Path], list[str]]:
    """(labels table or None, slide ids, bag paths, warnings) of a :class:`BagSource`."""
    found = find_bags(source.bags, source.spec, source.encoder)
    if source.labels is None:
        return None, list(found), list(found.values()), []
    table = read_labels(
        source.labels, source.label_col, patient_col=source.patient_col, classes=source.classes
    )
    table, paths, warnings = match_bags(table, found, source.skip_missing)
    return table, table.slide_ids, paths, warnings


def training_data(source: BagSource) -> TrainingData:
    """The labelled bags of ``source``, checked (every unusable bag named at once)."""
    if source.labels is None:
        raise ModelError("training needs a labels table (--labels)")
    table, _, paths, warnings = gather(source)
    assert table is not None
    return TrainingData(table, paths, bag_dims(paths), bag_provenance(paths, source.bags), warnings)


def train_from_job(
    source: BagSource,
    out_dir: str | os.PathLike,
    cfg: TrainConfig,
    splits: str | os.PathLike | None = None,
    test_split: str | os.PathLike | None = None,
    only_folds: Sequence[int] | None = None,
    overwrite: bool = False,
    on_data: Callable[[TrainingData], None] | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``cfg.model`` with patient-level k-fold cross-validation on the labelled bags of ``source``.

    ``splits`` reuses folds from a splits CSV, ``test_split`` holds out the slides a CSV names, and
    ``only_folds`` trains some folds only (one cluster job per fold; a last call without it reports).
    ``on_data`` sees the gathered data before training starts. Returns the run's report (or, while folds
    are missing, ``{"complete": False, ...}``).
    """
    cfg.check()
    if cfg.model not in list_models():
        raise ModelError(f"unknown model {cfg.model!r}; see `wsikit train --list-models`")
    data = training_data(source)
    if on_data is not None:
        on_data(data)
    if overwrite:
        clear_run(out_dir)
    test_ids = read_test_ids(test_split) if test_split else None
    return run_cv(
        cfg,
        data.table,
        data.paths,
        data.dim,
        out_dir,
        data.provenance,
        splits,
        test_ids,
        only_folds,
        on_epoch,
    )


def evaluate_from_job(
    run_dir: str | os.PathLike,
    source: BagSource,
    out_dir: str | os.PathLike | None = None,
    device: str = "auto",
    num_workers: int = 0,
    n_boot: int = 1000,
    on_warning: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Apply a run's fold models to the bags of ``source`` (scored when it has labels); writes into
    ``out_dir`` (default ``<run>/evaluate``)."""
    table, ids, paths, warnings = gather(source)
    for warning in warnings:
        if on_warning is not None:
            on_warning(warning)
    dest = Path(out_dir) if out_dir is not None else Path(run_dir) / "evaluate"
    return evaluate_run(run_dir, paths, ids, dest, table, device, num_workers, n_boot)
