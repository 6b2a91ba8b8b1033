"""Tile specs and aligned multi-magnification tile grids in level-0 coordinates.

A :class:`TileSpec` says *what* a tile is physically: resolution (µm/px), side in pixels at that
resolution, and overlap in pixels at that resolution. A :class:`TileGrid` is where a spec's tiles lie on
one slide: int64 level-0 top-left corners, each tile's tissue (area) fraction, and, for multi-spec runs,
each tile's parent index in every coarser grid.

Geometry (all in level-0 pixels, origin at the slide's top-left corner)::

    size0   = tile side            = size            when the spec MPP is within 5% of the slide MPP,
                                     round(size * mpp / slide_mpp) otherwise
    over0   = overlap              = round(overlap * size0 / size)
    stride0 = step between tiles   = size0 - over0
    x_k     = k * stride0, k = 0 … floor((W - size0) / stride0)   (every tile lies inside the slide)

Aligned (nested) grids: the specs are sorted fine → coarse by their level-0 extent; the finest keeps its
geometry, and each coarser spec's stride is snapped to an integer multiple ``m`` of the next finer
stride (``m`` = the ratio of their physical strides, which must be within 5% of an integer) with its own
level-0 overlap kept, so ``size0 = m * finer_stride0 + over0``. All grids share the origin (0, 0). A fine
tile at ``x`` then lies inside the coarse tile ``x // coarse_stride0`` (its parent) provided the coarse
overlap is at least the fine one (checked; equal pixel overlaps at every spec always nest). Parent indices
are ``-1`` only where that coarse tile is not in the grid: it would cross the slide's right/bottom edge,
or (with ``complete_parents=False``) it has too little tissue. By default a coarse grid also keeps every
tile that is the parent of a kept finer tile, so every fine tile has its context.

The per-slide `tile` stage that writes these grids is :mod:`wsikit.tile_stage`; file layout and
attributes are documented in ``docs/formats.md``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsikit.jobs import atomic_path
from wsikit.slide import Slide, mag_to_mpp, mpp_to_mag, resize, same_mpp
from wsikit.tissue import TissueMask

#: ``mpp<µm/px>_<size>px_<overlap>ov``; the MPP has 2–4 decimals (0.5 → ``0.50``, 0.499 → ``0.499``).
SPEC_NAME_RE = re.compile(r"^mpp(\d+\.\d{2,4})_(\d+)px_(\d+)ov$")


class TilingError(ValueError):
    """Impossible tiling request or unreadable coordinates file; the message says what to change."""


def _fmt_mpp(mpp: float) -> str:
    text = f"{mpp:.4f}".rstrip("0")
    whole, frac = text.split(".")
    return f"{whole}.{frac.ljust(2, '0')}"


@dataclass(frozen=True)
class TileSpec:
    """A tile's physical definition: ``mpp`` µm/px, ``size`` px side, ``overlap`` px (both at ``mpp``)."""

    mpp: float
    size: int = 256
    overlap: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise TilingError(f"tile spec: mpp must be a positive number of µm/px, got {self.mpp!r}")
        if int(self.size) != self.size or self.size < 1:
            raise TilingError(f"tile spec: size must be a positive integer (px), got {self.size!r}")
        if int(self.overlap) != self.overlap or not 0 <= self.overlap < self.size:
            raise TilingError(f"tile spec: overlap must be an integer in [0, size), got {self.overlap!r}")
        # normalise so equal specs compare (and name) equal
        object.__setattr__(self, "mpp", float(round(self.mpp, 4)))
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "overlap", int(self.overlap))

    @classmethod
    def from_mag(cls, mag: float, size: int = 256, overlap: int = 0) -> TileSpec:
        """Spec at magnification ``mag`` by wsikit's convention ``mpp = 10 / mag`` (never bucketed)."""
        return cls(mag_to_mpp(mag), size, overlap)

    @classmethod
    def from_name(cls, name: str) -> TileSpec:
        """Inverse of :attr:`name`."""
        match = SPEC_NAME_RE.match(name)
        if not match:
            raise TilingError(f"{name!r} is not a tile spec name (expected e.g. mpp0.50_256px_0ov)")
        return cls(float(match[1]), int(match[2]), int(match[3]))

    @property
    def name(self) -> str:
        """Stable, filesystem-safe name, e.g. ``mpp0.50_256px_0ov`` (resolution, size, overlap)."""
        return f"mpp{_fmt_mpp(self.mpp)}_{self.size}px_{self.overlap}ov"

    @property
    def stride(self) -> int:
        """Step between tiles in pixels at the spec's resolution."""
        return self.size - self.overlap

    @property
    def magnification(self) -> float:
        return mpp_to_mag(self.mpp)


def parse_spec(text: str, size: int = 256, overlap: int = 0) -> TileSpec:
    """Parse ``20x``, ``20x/256``, ``20x/256/32``, ``0.5/224``, ``mpp0.50_256px_0ov`` into a spec.

    A trailing ``x`` means magnification (converted by ``mpp = 10 / mag``), otherwise µm/px;
    missing size / overlap default to ``size`` / ``overlap``.
    """
    text = text.strip()
    if SPEC_NAME_RE.match(text):
        return TileSpec.from_name(text)
    parts = text.split("/")
    try:
        res = parts[0].strip().lower()
        size_ = int(parts[1]) if len(parts) > 1 and parts[1] else size
        overlap_ = int(parts[2]) if len(parts) > 2 and parts[2] else overlap
        if len(parts) > 3:
            raise ValueError
        if res.endswith("x"):
            return TileSpec.from_mag(float(res[:-1]), size_, overlap_)
        return TileSpec(float(res.removeprefix("mpp")), size_, overlap_)
    except ValueError as exc:
        if isinstance(exc, TilingError):
            raise
        raise TilingError(
            f"tile spec {text!r}: expected RESOLUTION[/SIZE[/OVERLAP]], e.g. 20x/256/0 or 0.5/224"
        ) from exc


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
    """Spec names with a tiles folder in ``job_dir``, fine to coarse (then by size, overlap)."""
    root = Path(job_dir) / "tiles"
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and SPEC_NAME_RE.match(p.name)]
    specs = sorted((TileSpec.from_name(n) for n in names), key=lambda s: (s.mpp, s.size, s.overlap))
    return [s.name for s in specs]


# -- reading and writing coordinates files -------------------------------------------------------------
def _plain(value: Any) -> Any:
    """h5py attribute → JSON-able Python value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


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
        attrs = {k: _plain(v) for k, v in ds.attrs.items()}
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


# -- geometry ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """A grid's level-0 geometry: tile side and stride (the overlap is their difference)."""

    size0: int
    stride0: int

    @property
    def overlap0(self) -> int:
        return self.size0 - self.stride0

    def shape(self, dims: tuple[int, int]) -> tuple[int, int]:
        """(columns, rows) of tiles that fit inside a ``dims`` = (W, H) level-0 slide."""
        return tuple(  # type: ignore[return-value]
            (d - self.size0) // self.stride0 + 1 if d >= self.size0 else 0 for d in dims
        )

    def coords(self, dims: tuple[int, int], cells: np.ndarray | None = None) -> np.ndarray:
        """Level-0 top-left corners, int64 (N, 2), of the tiles at row-major (y, then x) indices
        ``cells`` into the full grid (default: all tiles)."""
        nx, ny = self.shape(dims)
        cells = np.arange(nx * ny, dtype=np.int64) if cells is None else np.asarray(cells, np.int64)
        return np.stack([cells % max(nx, 1), cells // max(nx, 1)], axis=1) * self.stride0


def nominal_layout(spec: TileSpec, slide_mpp: float) -> Layout:
    """A spec's level-0 geometry on a slide of ``slide_mpp`` µm/px (see the module docstring)."""
    size0 = spec.size if same_mpp(spec.mpp, slide_mpp) else max(1, round(spec.size * spec.mpp / slide_mpp))
    over0 = min(size0 - 1, round(spec.overlap * size0 / spec.size))
    return Layout(size0, size0 - over0)


def order_specs(specs: list[TileSpec]) -> list[TileSpec]:
    """Specs fine → coarse by physical tile extent (µm), then stride; duplicates removed."""
    unique = {s.name: s for s in specs}
    return sorted(unique.values(), key=lambda s: (s.size * s.mpp, s.stride * s.mpp, s.mpp))


def aligned_layouts(specs: list[TileSpec], slide_mpp: float, align: bool = True) -> list[Layout]:
    """Level-0 layouts of ``specs`` (ordered fine → coarse); with ``align`` each nests in the next.

    Raises :class:`TilingError` when a coarser stride is not within 5% of a multiple of the finer one,
    or a coarser spec overlaps less than a finer one (then a fine tile could straddle two coarse tiles).
    """
    layouts = [nominal_layout(s, slide_mpp) for s in specs]
    if not align:
        return layouts
    for i in range(1, len(specs)):
        fine, nominal = layouts[i - 1], layouts[i]
        ratio = specs[i].stride * specs[i].mpp / (specs[i - 1].stride * specs[i - 1].mpp)  # physical
        m = max(1, round(ratio))
        stride0 = m * fine.stride0
        if not same_mpp(m, ratio):
            raise TilingError(
                f"cannot nest {specs[i - 1].name} in {specs[i].name}: the coarse stride "
                f"({nominal.stride0} level-0 px) is not a multiple of the fine one ({fine.stride0}); "
                "use sizes/resolutions with integer ratios (e.g. 20x, 10x, 5x at 256 px) or --no-align"
            )
        if nominal.overlap0 < fine.overlap0:
            need = math.ceil(fine.overlap0 * specs[i].size / nominal.size0)
            raise TilingError(
                f"cannot nest {specs[i - 1].name} in {specs[i].name}: a coarser grid needs at least the "
                f"finer grid's overlap ({fine.overlap0} level-0 px); give {specs[i].name} an overlap of "
                f">= {need} px, or pass --no-align"
            )
        layouts[i] = Layout(stride0 + nominal.overlap0, stride0)
    return layouts


#: Tiles handled per vectorised step, so temporaries stay a few MB at any slide size.
CHUNK = 1 << 14


def mask_integral(mask: np.ndarray) -> np.ndarray:
    """Integral image (h+1, w+1) of a boolean mask: int32 (exact counts) unless it could overflow."""
    depth = cv2.CV_32S if mask.size < 2**31 else cv2.CV_64F
    return cv2.integral(np.ascontiguousarray(mask, dtype=np.uint8), sdepth=depth)


def _fractions(
    integral: np.ndarray, scale: tuple[float, float], coords: np.ndarray, size0: int
) -> np.ndarray:
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    x0 = coords[:, 0] / scale[0]
    y0 = coords[:, 1] / scale[1]
    x1 = (coords[:, 0] + size0) / scale[0]
    y1 = (coords[:, 1] + size0) / scale[1]

    def at(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        u = np.clip(u, 0, w)
        v = np.clip(v, 0, h)
        iu = np.minimum(u.astype(np.int64), w - 1)
        iv = np.minimum(v.astype(np.int64), h - 1)
        fu, fv = u - iu, v - iv
        top = integral[iv, iu] * (1 - fu) + integral[iv, iu + 1] * fu
        bottom = integral[iv + 1, iu] * (1 - fu) + integral[iv + 1, iu + 1] * fu
        return top * (1 - fv) + bottom * fv

    covered = at(x1, y1) - at(x0, y1) - at(x1, y0) + at(x0, y0)
    area = (x1 - x0) * (y1 - y0)
    return np.clip(covered / area, 0.0, 1.0).astype(np.float32)


def tile_fractions(
    mask: np.ndarray, scale: tuple[float, float], coords: np.ndarray, size0: int
) -> np.ndarray:
    """Exact area fraction of each level-0 square tile covered by a boolean ``mask``.

    ``scale`` = level-0 pixels per mask pixel (x, y). Uses the mask's integral image sampled bilinearly
    at the tiles' fractional corners, which is exact for a piecewise-constant mask: O(N) vectorised,
    in chunks of :data:`CHUNK` tiles.
    """
    coords = np.asarray(coords).reshape(-1, 2)
    integral = mask_integral(mask)
    out = np.empty(coords.shape[0], np.float32)
    for lo in range(0, coords.shape[0], CHUNK):
        out[lo : lo + CHUNK] = _fractions(integral, scale, coords[lo : lo + CHUNK], size0)
    return out


def _parent_cells(
    coords: np.ndarray, fine: Layout, coarse: Layout, dims: tuple[int, int], aligned: bool
) -> np.ndarray:
    """Full-grid index of each fine tile's parent in the coarse grid (-1 when outside it)."""
    ncx, ncy = coarse.shape(dims)
    offset = 0 if aligned else fine.size0 // 2  # unaligned grids: the coarse cell holding the centre
    j = (coords + offset) // coarse.stride0
    inside = (j[:, 0] < ncx) & (j[:, 1] < ncy)
    return np.where(inside, j[:, 1] * ncx + j[:, 0], -1)


def build_grids(
    specs: list[TileSpec],
    dims: tuple[int, int],
    slide_mpp: float,
    mask: np.ndarray | None = None,
    mask_scale: tuple[float, float] | None = None,
    min_tissue: float = 0.5,
    align: bool = True,
    complete_parents: bool = True,
) -> list[tuple[TileSpec, Layout, np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
    """Tile a ``dims`` = (W, H) slide for every spec; the pure geometry behind :func:`tile_slide`.

    Returns, fine → coarse, ``(spec, layout, coords, tissue_fraction, parents)`` per spec. A tile is
    kept when its tissue fraction is ≥ ``min_tissue`` (all tiles when ``mask`` is None), and, with
    ``complete_parents``, when it is the parent of a kept finer tile.
    """
    if not 0.0 <= min_tissue <= 1.0:
        raise TilingError(f"min_tissue must be in [0, 1], got {min_tissue}")
    specs = order_specs(specs)
    layouts = aligned_layouts(specs, slide_mpp, align)
    # per spec, one value per cell of the full grid (tissue fraction, kept); coordinates only of kept
    # tiles, and temporaries in chunks of CHUNK cells: memory is a few bytes per cell at any slide size
    counts = [int(np.prod(lay.shape(dims))) for lay in layouts]
    if mask is None:
        fractions = [np.ones(n, np.float32) for n in counts]
    else:
        if mask_scale is None:
            mask_scale = (dims[0] / mask.shape[1], dims[1] / mask.shape[0])
        integral = mask_integral(mask)
        fractions = []
        for lay, n in zip(layouts, counts, strict=True):
            f = np.empty(n, np.float32)
            for lo in range(0, n, CHUNK):
                cells = np.arange(lo, min(n, lo + CHUNK), dtype=np.int64)
                f[lo : lo + CHUNK] = _fractions(integral, mask_scale, lay.coords(dims, cells), lay.size0)
            fractions.append(f)
        del integral
    keep = [f >= min_tissue for f in fractions]
    if complete_parents:
        for c in range(1, len(specs)):
            for f in range(c):
                kept = np.flatnonzero(keep[f])
                for lo in range(0, len(kept), CHUNK):
                    coords = layouts[f].coords(dims, kept[lo : lo + CHUNK])
                    cells = _parent_cells(coords, layouts[f], layouts[c], dims, align)
                    keep[c][cells[cells >= 0]] = True
    kept_index = {}  # coarse spec → its kept tile's index per cell (-1: not kept), + -1 for "outside"
    for c in range(1, len(specs)):
        lut = np.full(len(keep[c]) + 1, -1, np.int64)
        lut[:-1][keep[c]] = np.arange(int(keep[c].sum()), dtype=np.int64)
        kept_index[c] = lut
    grids = []
    for f, spec in enumerate(specs):
        kept = np.flatnonzero(keep[f])
        coords = layouts[f].coords(dims, kept)
        parents = {}
        for c in range(f + 1, len(specs)):
            index = np.empty(len(kept), np.int64)
            for lo in range(0, len(kept), CHUNK):
                cells = _parent_cells(coords[lo : lo + CHUNK], layouts[f], layouts[c], dims, align)
                index[lo : lo + CHUNK] = kept_index[c][cells]
            parents[specs[c].name] = index
        grids.append((spec, layouts[f], coords, fractions[f][kept], parents))
    return grids


# -- slides --------------------------------------------------------------------------------------------
def _clam_attrs(slide: Slide, spec: TileSpec, size0: int) -> dict[str, Any]:
    """CLAM's ``patch_level`` & co. when ``size`` pixels of a stored level cover exactly the tile."""
    for level, ds in enumerate(slide.level_downsamples):
        if abs(spec.size * ds - size0) <= max(1.0, 0.005 * size0):
            dims = list(slide.level_dimensions[level])
            return {
                "patch_level": level,
                "downsample": [ds, ds],
                "level_dim": dims,
                "downsampled_level_dim": dims,
            }
    return {}


def tile_slide(
    slide: Slide,
    specs: list[TileSpec],
    mask: TissueMask | None = None,
    min_tissue: float = 0.5,
    align: bool = True,
    complete_parents: bool = True,
) -> list[TileGrid]:
    """Aligned grids of ``specs`` (fine → coarse) over ``slide``'s tissue, with all file attributes.

    ``mask`` None keeps every tile (tissue fraction 1). See :func:`build_grids` for the rules.
    """
    from wsikit import __version__

    mpp0 = slide.mpp0
    dims = slide.dimensions
    built = build_grids(
        specs,
        dims,
        mpp0,
        None if mask is None else mask.mask,
        None if mask is None else mask.scale,
        min_tissue,
        align,
        complete_parents,
    )
    level0_mag = mpp_to_mag(mpp0)
    grids = []
    for spec, layout, coords, fractions, parents in built:
        attrs: dict[str, Any] = {
            # TRIDENT (magnification ratio == size ratio, so TRIDENT reads the geometry right)
            "patch_size": spec.size,
            "patch_size_level0": layout.size0,
            "level0_magnification": level0_mag,
            "target_magnification": level0_mag * spec.size / layout.size0,
            "overlap": spec.overlap,
            "name": slide.slide_id,
            "savetodir": "",
            "level0_width": dims[0],
            "level0_height": dims[1],
            # CLAM, where the target resolution is a stored level
            **_clam_attrs(slide, spec, layout.size0),
            # wsikit
            "wsikit_version": __version__,
            "coords_convention": "level-0 pixels, tile top-left (x, y)",
            "slide_id": slide.slide_id,
            "slide_path": str(slide.path),
            "slide_mpp": mpp0,
            "target_mpp": spec.mpp,
            "effective_mpp": mpp0 * layout.size0 / spec.size,
            "spec_name": spec.name,
            "stride_level0": layout.stride0,
            "overlap_level0": layout.overlap0,
            "min_tissue": min_tissue,
            "mask_method": "none" if mask is None else mask.method,
            "mask_mpp": 0.0 if mask is None else mask.mpp,
            "aligned": bool(align),
            "complete_parents": bool(complete_parents),
            "grid_specs": [s.name for s in order_specs(specs)],
        }
        grids.append(TileGrid(coords, spec, slide.slide_id, mpp0, layout.size0, fractions, parents, attrs))
    return grids


def read_tile(slide: Slide, xy: tuple[int, int], size_level0: int, size: int) -> np.ndarray:
    """The ``size``×``size`` RGB tile whose level-0 footprint is ``size_level0`` px at ``xy``.

    Reads the coarsest pyramid level that is not coarser than the tile's resolution, then resizes
    (area averaging); use it with a grid's ``size_level0`` so pixels match the coordinates exactly.
    """
    choice = slide.best_level(slide.mpp0 * size_level0 / size)
    side = max(1, round(size_level0 / choice.downsample))
    region = slide.read_region((int(xy[0]), int(xy[1])), choice.level, (side, side))
    return resize(region, (size, size))
