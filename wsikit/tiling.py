"""Aligned multi-magnification tile grids in level-0 coordinates: the geometry behind `wsikit tile`.

Geometry (all in level-0 pixels, origin at the slide's top-left corner)::

    size_level0    = tile side         = size     when the spec MPP is within 5% of the slide MPP,
                                         round(size * mpp / slide_mpp) otherwise
    overlap_level0 = overlap           = round(overlap * size_level0 / size)
    stride_level0  = step between tiles = size_level0 - overlap_level0
    x_k = k * stride_level0, k = 0 … floor((W - size_level0) / stride_level0)   (every tile inside the slide)

Aligned (nested) grids: the specs are sorted fine → coarse by their level-0 extent; the finest keeps its
geometry, and each coarser spec's stride is snapped to an integer multiple ``m`` of the next finer
stride (``m`` = the ratio of their physical strides, which must be within 5% of an integer) with its own
level-0 overlap kept, so ``size_level0 = m * finer_stride_level0 + overlap_level0``. All grids share the
origin (0, 0). A fine tile at ``x`` then lies inside the coarse tile ``x // coarse_stride_level0`` (its
parent) provided the coarse overlap is at least the fine one (checked; equal pixel overlaps at every spec
always nest). Parent indices are ``-1`` only where that coarse tile is not in the grid: it would cross the
slide's right/bottom edge, or (with ``complete_parents=False``) it has too little tissue. By default a
coarse grid also keeps every tile that is the parent of a kept finer tile, so every fine tile has its
context.

Specs and the coordinates file are :mod:`wsikit.grids`; the per-slide `tile` stage that writes them is
:mod:`wsikit.stages.tile`.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from wsikit import __version__
from wsikit.grids import TileGrid
from wsikit.native import NativeFile
from wsikit.slide import Slide
from wsikit.specs import Layout, TileSpec, TilingError, aligned_layouts, mpp_to_mag, order_specs, same_mpp
from wsikit.tissue import TissueMask


# -- geometry ------------------------------------------------------------------------------------------
def layout_coords(layout: Layout, dims: tuple[int, int], cells: np.ndarray | None = None) -> np.ndarray:
    """Level-0 top-left corners, int64 (N, 2), of a layout's tiles at row-major (y, then x) indices
    ``cells`` into its full grid on a ``dims`` = (W, H) slide (default: all tiles)."""
    nx, ny = layout.shape(dims)
    cells = np.arange(nx * ny, dtype=np.int64) if cells is None else np.asarray(cells, np.int64)
    return np.stack([cells % max(nx, 1), cells // max(nx, 1)], axis=1) * layout.stride_level0


#: Tiles handled per vectorised step, so temporaries stay a few MB at any slide size.
CHUNK = 1 << 14


def mask_integral(mask: np.ndarray) -> np.ndarray:
    """Integral image (h+1, w+1) of a boolean mask: int32 (exact counts) unless it could overflow."""
    depth = cv2.CV_32S if mask.size < 2**31 else cv2.CV_64F
    return cv2.integral(np.ascontiguousarray(mask, dtype=np.uint8), sdepth=depth)


def _fractions(
    integral: np.ndarray, scale: tuple[float, float], coords: np.ndarray, size_level0: int
) -> np.ndarray:
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    x0 = coords[:, 0] / scale[0]
    y0 = coords[:, 1] / scale[1]
    x1 = (coords[:, 0] + size_level0) / scale[0]
    y1 = (coords[:, 1] + size_level0) / scale[1]

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
    mask: np.ndarray, scale: tuple[float, float], coords: np.ndarray, size_level0: int
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
        out[lo : lo + CHUNK] = _fractions(integral, scale, coords[lo : lo + CHUNK], size_level0)
    return out


def _parent_cells(
    coords: np.ndarray, fine: Layout, coarse: Layout, dims: tuple[int, int], aligned: bool
) -> np.ndarray:
    """Full-grid index of each fine tile's parent in the coarse grid (-1 when outside it)."""
    ncx, ncy = coarse.shape(dims)
    offset = 0 if aligned else fine.size_level0 // 2  # unaligned grids: the coarse cell holding the centre
    j = (coords + offset) // coarse.stride_level0
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
                f[lo : lo + CHUNK] = _fractions(
                    integral, mask_scale, layout_coords(lay, dims, cells), lay.size_level0
                )
            fractions.append(f)
        del integral
    keep = [f >= min_tissue for f in fractions]
    if complete_parents:
        for c in range(1, len(specs)):
            for f in range(c):
                kept = np.flatnonzero(keep[f])
                for lo in range(0, len(kept), CHUNK):
                    coords = layout_coords(layouts[f], dims, kept[lo : lo + CHUNK])
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
        coords = layout_coords(layouts[f], dims, kept)
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
def _clam_attrs(slide: Slide, spec: TileSpec, size_level0: int) -> dict[str, Any]:
    """CLAM's ``patch_level`` & co. when ``size`` pixels of a stored level cover exactly the tile."""
    for level, ds in enumerate(slide.level_downsamples):
        if abs(spec.size * ds - size_level0) <= max(1.0, 0.005 * size_level0):
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
            "patch_size_level0": layout.size_level0,
            "level0_magnification": level0_mag,
            "target_magnification": level0_mag * spec.size / layout.size_level0,
            "overlap": spec.overlap,
            "name": slide.slide_id,
            "savetodir": "",
            "level0_width": dims[0],
            "level0_height": dims[1],
            # CLAM, where the target resolution is a stored level
            **_clam_attrs(slide, spec, layout.size_level0),
            # wsikit
            "wsikit_version": __version__,
            "coords_convention": "level-0 pixels, tile top-left (x, y)",
            "slide_id": slide.slide_id,
            "slide_path": str(slide.path),
            "slide_mpp": mpp0,
            "target_mpp": spec.mpp,
            "effective_mpp": mpp0 * layout.size_level0 / spec.size,
            "spec_name": spec.name,
            "stride_level0": layout.stride_level0,
            "overlap_level0": layout.overlap_level0,
            "min_tissue": min_tissue,
            "mask_method": "none" if mask is None else mask.method,
            "mask_mpp": 0.0 if mask is None else mask.mpp,
            "aligned": bool(align),
            "complete_parents": bool(complete_parents),
            "grid_specs": [s.name for s in order_specs(specs)],
        }
        grids.append(
            TileGrid(coords, spec, slide.slide_id, mpp0, layout.size_level0, fractions, parents, attrs)
        )
    return grids


# -- tiling on the file's own tile grid ------------------------------------------------------------------
def native_level(slide: Slide, mpp: float) -> tuple[int, int] | None:
    """(level, integer downsample k) of a level within 5% of ``mpp`` whose dims are level 0's / k."""
    w0, h0 = slide.level_dimensions[0]
    for level, (w, h) in enumerate(slide.level_dimensions):
        k = round(slide.level_downsamples[level])
        if k >= 1 and abs(w - w0 / k) < 1 and abs(h - h0 / k) < 1 and same_mpp(slide.mpp0 * k, mpp):
            return level, k
    return None


def align_specs_to_native(slide: Slide, specs: list[TileSpec]) -> tuple[list[TileSpec], list[str]]:
    """Specs whose tiles coincide with the file's own tiles (same side, aligned origin, no resize).

    Each spec resolving to a stored level with an integer downsample ``k`` becomes that level's tile
    side with no overlap; its MPP stays the requested one when the level-0 footprint is still exactly
    ``k × side`` (otherwise it becomes the level's MPP, rounded to 4 decimals). Specs with no such level,
    or levels without square tiles, are kept. Returns the specs and one note per change or miss.
    """
    nfile = NativeFile(slide.path, slide.level_dimensions)
    try:
        out, notes = [], []
        for spec in specs:
            found = native_level(slide, spec.mpp)
            info = nfile.levels[found[0]] if found else None
            if found is None or info is None or info.tile_width != info.tile_height:
                out.append(spec)
                why = "no stored level at this resolution" if found is None else "no square file tiles there"
                notes.append(
                    f"--align-native: {spec.name} kept ({why}); its tiles are read through read_region"
                )
                continue
            level, k = found
            side = info.tile_width
            exact = k == 1 or round(side * spec.mpp / slide.mpp0) == side * k
            mpp = spec.mpp if exact else round(slide.mpp0 * k, 4)
            new = TileSpec(mpp, side, 0)
            if new != spec:
                notes.append(
                    f"--align-native: {spec.name} → {new.name} (the file's {side}-px tiles at level {level})"
                )
            out.append(new)
        return out, notes
    finally:
        nfile.close()
