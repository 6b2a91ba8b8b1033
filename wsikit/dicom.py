"""DICOM whole-slide images (VL Whole Slide Microscopy): a slide is a *series* of ``.dcm`` instances (one per
pyramid level, plus thumbnail, label, overview), usually one folder per slide. OpenSlide opens a series
through any one of its files; wsikit groups a folder's instances by ``SeriesInstanceUID`` so one series is
one slide, and hands OpenSlide the series' largest pyramid level.

Headers are read with pydicom (pure Python, no pixel data read: about half a millisecond per instance).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

DICOM_SUFFIX = ".dcm"
_SLIDE_DIRS = (".zarr",)  # folders that are other things, never searched for DICOM files
_TAGS = ["SeriesInstanceUID", "ImageType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows",
         "ContainerIdentifier"]  # fmt: skip


class DicomError(ValueError):
    """A folder that is not one readable DICOM-WSI series; the message names it and the fix."""


@dataclass(frozen=True)
class DicomSeries:
    """One slide: the instances of a series, and the one handed to OpenSlide (its largest VOLUME)."""

    uid: str
    files: tuple[Path, ...]
    volume: Path
    container: str | None = None  # ContainerIdentifier: the slide's label, when the scanner wrote one

    @property
    def folder(self) -> Path:
        return self.volume.parent


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part-10 file: ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def dicom_files(folder: Path) -> list[Path]:
    """The ``.dcm`` files directly in ``folder`` (hidden files excluded), sorted; none when unreadable."""
    try:
        names = list(folder.iterdir())
    except OSError:
        return []
    return sorted(p for p in names if p.suffix.lower() == DICOM_SUFFIX and not p.name.startswith("."))


def group_series(files: Iterable[Path]) -> list[DicomSeries]:
    """``files`` grouped by folder and ``SeriesInstanceUID``; files that are not DICOM headers pydicom can
    read are left out (they fail as slides of their own: see :func:`unreadable`)."""
    import pydicom

    groups: dict[tuple[Path, str], list[tuple[int, Path, str | None]]] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
            uid = str(ds.SeriesInstanceUID)
        except Exception:  # any unreadable header: not part of a series
            continue
        kind = list(getattr(ds, "ImageType", []) or [])
        volume = len(kind) > 2 and str(kind[2]).upper() == "VOLUME"
        pixels = int(getattr(ds, "TotalPixelMatrixColumns", 0) or 0) * int(
            getattr(ds, "TotalPixelMatrixRows", 0) or 0
        )
        container = str(getattr(ds, "ContainerIdentifier", "") or "") or None
        groups.setdefault((path.parent, uid), []).append((pixels if volume else -1, path, container))
    series = []
    for (_, uid), members in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        best = max(members, key=lambda m: (m[0], str(m[1])))
        container = next((c for _, _, c in members if c), None)
        series.append(DicomSeries(uid, tuple(sorted(p for _, p, _ in members)), best[1], container))
    return series


def unreadable(files: Sequence[Path], series: Sequence[DicomSeries]) -> list[Path]:
    """The ``files`` that belong to none of ``series`` (broken or non-DICOM ``.dcm`` files)."""
    grouped = {p for s in series for p in s.files}
    return [p for p in files if p not in grouped]


def series_names(series: Sequence[DicomSeries], root: Path) -> list[str]:
    """A slide id per series: its folder's name when the folder holds one series (``root``'s name for the
    folder given), else ``<folder>_<label>`` (the ContainerIdentifier when unique there, else the UID's tail)."""
    per_folder: dict[Path, list[DicomSeries]] = {}
    for s in series:
        per_folder.setdefault(s.folder, []).append(s)
    names = []
    for s in series:
        siblings = per_folder[s.folder]
        if len(siblings) == 1:
            names.append(s.folder.name)
            continue
        labels = [x.container for x in siblings]
        label = (
            s.container if s.container and labels.count(s.container) == 1 else s.uid.rsplit(".", 1)[-1][-8:]
        )
        names.append(f"{s.folder.name}_{label}")
    return names


def dicom_slides(root: Path, found: Sequence[Path], recursive: bool = False) -> list[tuple[Path, str]]:
    """(file to open, slide id) per DICOM-WSI series among ``found`` (the entries of the folder ``root``):
    ``.dcm`` files grouped by series and, without ``recursive``, each sub-folder holding a series; a
    ``.dcm`` file no series takes is its own entry (so it fails as a slide with its reason)."""
    files = [
        f for f in found if f.suffix.lower() == DICOM_SUFFIX and not f.name.startswith(".") and not f.is_dir()
    ]
    if not recursive:
        files += [
            f for d in found if d.is_dir() and d.suffix.lower() not in _SLIDE_DIRS for f in dicom_files(d)
        ]
    if not files:
        return []
    series = group_series(files)
    named = list(zip((s.volume for s in series), series_names(series, root), strict=True))
    return named + [(f, f.stem) for f in unreadable(files, series)]


def series_volume(folder: str | os.PathLike) -> Path:
    """The file to open for a folder that holds one DICOM-WSI series; :class:`DicomError` otherwise."""
    folder = Path(folder)
    files = dicom_files(folder)
    if not files:
        raise DicomError(f"{folder}: is a directory, not a slide file; give the slide file inside it")
    series = group_series(files)
    if not series:
        raise DicomError(
            f"{folder}: none of its {len(files)} .dcm files has a readable DICOM header; copy them again"
        )
    if len(series) > 1:
        labels = ", ".join(s.container or s.uid for s in series[:4])
        raise DicomError(
            f"{folder}: holds {len(series)} DICOM-WSI series ({labels}); give one series' folder or one of its "
            "files, or the folder to `wsikit tile`/`run`, which takes each series as a slide"
        )
    return series[0].volume
