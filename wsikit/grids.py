"""Tile specs and the coordinates file: what a tile is physically, and where a spec's tiles lie on a slide.

A :class:`TileSpec` says *what* a tile is: resolution (µm/px), side in pixels at that resolution
(``size``), and overlap in pixels at that resolution. A :class:`TileGrid` is where a spec's tiles lie on
one slide: int64 level-0 top-left corners, each tile's side in level-0 pixels (``size_level0``), each
tile's tissue (area) fraction and, for multi-spec runs, each tile's parent index in every coarser grid.
Grids are made by :func:`wsikit.tiling.tile_slide`; files are ``<job>/tiles/<spec>/<slide_id>.h5``
(layout and attributes: ``docs/formats.md``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsikit.io import atomic_path, from_h5_attr
from wsikit.jobs import read_status
from wsikit.specs import SPEC_NAME_RE, TileSpec, TilingError, mag_to_mpp, spec_key


@dataclass
class TileGrid:
    """One spec's tiles on one slide.

    ``coords`` int64 (N, 2) level-0 top-left (x, y); ``tissue_fraction`` float32 (N,) area fraction of
    each tile covered by the tissue mask; ``parents`` maps a coarser grid's spec name to int64 (N,)
    indices into that grid (-1: none); ``attrs`` holds every attribute stored on ``coords``.
    """

    coords: np.ndarray
    spec: TileSpec
    slide_id: str
    slide_mpp: float
    size_level0: int
    tissue_fraction: np.ndarray
    parents: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def stride_level0(self) -> int:
        """Step between neighbouring tiles in level-0 pixels."""
        if "stride_level0" in self.attrs:
            return int(self.attrs["stride_level0"])
        return self.size_level0 - round(self.spec.overlap * self.size_level0 / self.spec.size)

    @property
    def effective_mpp(self) -> float:
        """The resolution the tiles really have once read: slide MPP × level-0 side / side."""
        return self.slide_mpp * self.size_level0 / self.spec.size


# -- job layout ----------------------------------------------------------------------------------------
def grid_path(job_dir: str | os.PathLike, spec_name: str | TileSpec, slide_id: str) -> Path:
    """``<job>/tiles/<spec_name>/<slide_id>.h5``."""
    name = spec_name.name if isinstance(spec_name, TileSpec) else spec_name
    return Path(job_dir) / "tiles" / name / f"{slide_id}.h5"


def list_specs(job_dir: str | os.PathLike) -> list[str]:
    """Spec names with a tiles folder in ``job_dir``, fine to coarse (:func:`spec_key`)."""
    root = Path(job_dir) / "tiles"
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and SPEC_NAME_RE.match(p.name)]
    specs = sorted((TileSpec.from_name(n) for n in names), key=spec_key)
    return [s.name for s in specs]


def tiled_specs(job_dir: str | os.PathLike) -> tuple[list[str], dict[str, list[str]]]:
    """The spec folders the job's current tiling uses, fine to coarse, and the stale ones: folders that no
    slide's done tile record lists (left by an earlier tiling with other specs), with the slides they hold.
    A job without tile records (imported coordinates) uses every folder."""
    job = Path(job_dir)
    folders = list_specs(job)
    records = sorted((job / "status" / "tile").glob("*.json")) if (job / "status" / "tile").is_dir() else []
    if not records:
        return folders, {}
    listed: set[str] = set()
    for path in records:
        status = read_status(job, "tile", path.stem)
        if status is not None and status.state == "done":
            listed.update(status.info.get("specs", []))
    stale = {
        name: sorted(p.stem for p in (job / "tiles" / name).glob("*.h5") if not p.name.startswith("."))
        for name in folders
        if name not in listed
    }
    return [n for n in folders if n in listed], stale


def grid_inputs(job_dir: str | os.PathLike, specs: Sequence[str], slide_id: str) -> str:
    """A fingerprint of the slide's grids at ``specs`` (their tiles' positions and sizes): a bag whose grid
    changed since it was encoded (the slide was re-tiled) is outdated."""
    digest = hashlib.sha1()
    for name in sorted(specs):
        digest.update(name.encode())
        try:
            grid = read_grid(grid_path(job_dir, name, slide_id))
        except TilingError:
            digest.update(b"missing")
            continue
        digest.update(f"{grid.size_level0}/{grid.stride_level0}".encode())
        digest.update(np.ascontiguousarray(grid.coords, np.int64).tobytes())
    return digest.hexdigest()[:12]


# -- reading and writing coordinates files -------------------------------------------------------------
def read_grid(path: str | os.PathLike) -> TileGrid:
    """Read a coordinates file written by wsikit (or by TRIDENT: ``coords`` with its attributes)."""
    import h5py

    path = Path(path)
    try:
        fh = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise TilingError(
            f"{path}: not a readable HDF5 coordinates file ({exc}); re-run `wsikit tile`"
        ) from exc
    with fh:
        if "coords" not in fh:
            raise TilingError(f"{path}: no 'coords' dataset; is this a coordinates file from `wsikit tile`?")
        ds = fh["coords"]
        coords = np.asarray(ds[()], dtype=np.int64).reshape(-1, 2)
        attrs = {k: from_h5_attr(v) for k, v in ds.attrs.items()}
        n = coords.shape[0]
        fractions = (
            np.asarray(fh["tissue_fraction"][()], dtype=np.float32)
            if "tissue_fraction" in fh
            else np.full(n, np.nan, np.float32)
        )
        parents = (
            {k: np.asarray(v[()], dtype=np.int64) for k, v in fh["parents"].items()}
            if "parents" in fh
            else {}
        )
    if "target_mpp" in attrs:  # wsikit
        spec = TileSpec(float(attrs["target_mpp"]), int(attrs["patch_size"]), int(attrs["overlap"]))
        slide_mpp = float(attrs["slide_mpp"])
    elif {"level0_magnification", "target_magnification", "patch_size"} <= attrs.keys():  # TRIDENT
        spec = TileSpec.from_mag(
            float(attrs["target_magnification"]), int(attrs["patch_size"]), int(attrs.get("overlap", 0))
        )
        slide_mpp = mag_to_mpp(float(attrs["level0_magnification"]))
    else:
        raise TilingError(
            f"{path}: 'coords' has no resolution attributes (wsikit target_mpp or TRIDENT magnifications); "
            "CLAM patch files lack them: re-tile with `wsikit tile`"
        )
    size0 = int(attrs.get("patch_size_level0", round(spec.size * spec.mpp / slide_mpp)))
    slide_id = str(attrs.get("slide_id", attrs.get("name", path.stem.removesuffix("_patches"))))
    return TileGrid(coords, spec, slide_id, slide_mpp, size0, fractions, parents, attrs)


def grid_length(path: str | os.PathLike) -> int:
    """How many tiles a coordinates file holds (0 when it cannot be read: reading it fails later)."""
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            return int(fh["coords"].shape[0])
    except (OSError, KeyError, ValueError):
        return 0


def write_grid(path: str | os.PathLike, grid: TileGrid) -> Path:
    """Write ``grid`` atomically: ``coords`` (with ``grid.attrs``), ``tissue_fraction``, ``parents/*``."""
    import h5py

    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
        ds = fh.create_dataset("coords", data=np.asarray(grid.coords, np.int64).reshape(-1, 2))
        for key, value in grid.attrs.items():
            if value is not None:
                ds.attrs[key] = value
        fh.create_dataset("tissue_fraction", data=np.asarray(grid.tissue_fraction, np.float32))
        group = fh.create_group("parents")
        for name, index in grid.parents.items():
            group.create_dataset(name, data=np.asarray(index, np.int64))
    return path
