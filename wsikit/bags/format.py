"""The feature-bag format: one slide's tile features and where they lie (``docs/feature-bag.md``,
``wsikit-bag`` version 1), the job layout of bags, and the attributes every wsikit bag carries."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from wsikit import __version__

FORMAT_NAME = "wsikit-bag"
FORMAT_VERSION = 1


class BagError(ValueError):
    """A bag file that cannot be read or written as asked; the message names the file and the fix."""


@dataclass
class Bag:
    """One slide's features and where they lie.

    ``coords`` are level-0 top-left pixels unless ``attrs["coords_unit"] == "um"`` (a STAMP file read
    without a slide MPP) or ``attrs["coords_origin"] == "center"`` (slideflow without an MPP).
    ``tile_index`` is each row's index in the tiling grid; ``skipped_coords`` the tiles that failed to
    read. ``context`` maps a coarser spec name to the parent tile's features (N, D) for each row, and
    ``context_index`` to the parent's row in that spec's bag (-1: none, features zero).
    """

    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    coords_attrs: dict[str, Any] = field(default_factory=dict)
    tile_index: np.ndarray | None = None
    skipped_coords: np.ndarray | None = None
    context: dict[str, np.ndarray] = field(default_factory=dict)
    context_index: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features)
        if self.features.ndim != 2:
            raise BagError(f"features must be (N, D), got shape {self.features.shape}")
        self.coords = np.asarray(self.coords).reshape(-1, 2)
        if self.coords.shape[0] != self.features.shape[0]:
            raise BagError(f"{self.features.shape[0]} feature rows but {self.coords.shape[0]} coordinates")

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def multiscale(self) -> np.ndarray:
        """Features joined with every context's along the feature axis: (N, D × (1 + contexts))."""
        return np.concatenate([self.features, *(self.context[k] for k in sorted(self.context))], axis=1)


def safe_encoder_name(encoder_name: str) -> str:
    """An encoder name as one path component (``timm:hf-hub:org/model`` → ``timm_hf-hub_org_model``)."""
    return encoder_name.replace("/", "_").replace(":", "_")


def bag_path(
    job_dir: str | os.PathLike, spec_name: str, encoder_name: str, slide_id: str, fmt: str = "h5"
) -> Path:
    """``<job>/bags/<spec_name>/<encoder_name>/<slide_id>.h5`` (or ``.zarr``); unsafe characters → ``_``."""
    safe = safe_encoder_name(encoder_name)
    return Path(job_dir) / "bags" / spec_name / safe / f"{slide_id}.{'zarr' if fmt == 'zarr' else 'h5'}"


def new_attrs(**fields: Any) -> dict[str, Any]:
    """Root attributes every wsikit bag carries (format, version, wsikit version, creation time) + ``fields``."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "wsikit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }


def join_context(fine: Bag, coarse: Sequence[tuple[str, Bag, np.ndarray, int]]) -> Bag:
    """A multi-scale bag: ``fine`` with, per coarser spec ``(name, bag, parents, grid size)``, each row's
    parent-tile features as ``context[name]`` (zeros and index -1 where the parent has no row).

    ``parents`` maps every tile of the fine grid to its parent's index in the coarse grid (-1: none);
    rows are matched through the bags' ``tile_index`` (a coarse grid may keep no tile at all).
    """
    rows = fine.tile_index if fine.tile_index is not None else np.arange(len(fine))
    for name, other, parents, grid_size in coarse:
        lut = np.full(grid_size, -1, np.int64)
        if other.tile_index is not None:
            lut[other.tile_index] = np.arange(len(other))
        parent = parents[rows]
        row = np.full(len(parent), -1, np.int64)
        row[parent >= 0] = lut[parent[parent >= 0]]
        feats = np.zeros((len(fine), other.dim), other.features.dtype)
        feats[row >= 0] = other.features[row[row >= 0]]
        fine.context[name] = feats
        fine.context_index[name] = row
    names = [fine.attrs.get("tile_spec", "fine"), *(name for name, *_ in coarse)]
    fine.attrs.update(tile_spec="+".join(names), multiscale_specs=names)
    fine.attrs.pop("source_format", None)
    fine.attrs.pop("coords_unit", None)
    return fine


def iter_bags(folder: str | os.PathLike) -> Iterator[Path]:
    """Bag files in ``folder`` (``.h5``, ``.zarr``, ``.pt``), sorted, temporaries excluded."""
    for p in sorted(Path(folder).iterdir()):
        if not p.name.startswith(".") and p.suffix in (".h5", ".zarr", ".pt"):
            yield p


def bag_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Bag files given as files or folders of bags (a ``.zarr`` folder is one bag)."""
    files: list[Path] = []
    for item in paths:
        p = Path(item)
        files.extend(iter_bags(p) if p.is_dir() and p.suffix != ".zarr" else [p])
    return files
