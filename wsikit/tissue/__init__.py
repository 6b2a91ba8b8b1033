"""Tissue masks on a thumbnail at a physical working resolution, marker ink, GeoJSON and QC pictures.

The mask is computed on a thumbnail at ``MaskParams.mpp`` µm/px (8 by default; finer for small
slides so the short side has at least ``min_side_px`` pixels, never finer than ``finest_mpp``), so
every size setting is physical (µm, µm²) and the same settings work at any scan resolution.

Methods (:data:`MASK_METHODS`): ``od`` (default; optical density against the slide's own glass, with
marker ink of any common colour found and cut out — :mod:`wsikit.tissue.od`, :mod:`wsikit.tissue.ink`)
and ``otsu`` (the earlier default: saturation and Otsu's threshold — :mod:`wsikit.tissue.otsu`).
Measurements: ``docs/tissue.md``, ``benchmarks/bench_mask.py``.

A mask round-trips through GeoJSON in level-0 pixel coordinates (QuPath imports and exports it):
:func:`mask_to_geojson` / :func:`mask_from_geojson`; :func:`qc_image` draws it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import numpy as np

from wsikit.settings import MaskError, MaskParams
from wsikit.slide import Slide
from wsikit.tissue.base import (
    INK_COLOURS,
    STRIP_PIXELS,
    MaskResult,
    TissueMask,
    by_strips,
    iou,
    otsu_threshold,
)
from wsikit.tissue.geojson import EXCLUDE_CLASSES, mask_from_geojson, mask_to_geojson, write_geojson
from wsikit.tissue.ink import find_ink, ink_colours_seen
from wsikit.tissue.od import od_mask
from wsikit.tissue.otsu import otsu_mask, pen_mask
from wsikit.tissue.qc import qc_image

__all__ = [
    "EXCLUDE_CLASSES",
    "INK_COLOURS",
    "MASK_METHODS",
    "STRIP_PIXELS",
    "MaskError",
    "MaskParams",
    "MaskResult",
    "TissueMask",
    "by_strips",
    "compute_mask",
    "find_ink",
    "iou",
    "mask_from_geojson",
    "mask_from_rgb",
    "mask_to_geojson",
    "od_mask",
    "otsu_mask",
    "otsu_threshold",
    "pen_mask",
    "qc_image",
    "working_mpp",
    "write_geojson",
]


def _otsu(rgb: np.ndarray, mpp: float, params: MaskParams) -> MaskResult:
    return MaskResult(*otsu_mask(rgb, mpp, params))


#: Mask methods: name → function(rgb, mpp, params) -> MaskResult. Add new methods here (and their
#: names to :data:`wsikit.settings.MASK_METHODS`, what configs may ask for).
MASK_METHODS: dict[str, Callable[[np.ndarray, float, MaskParams], MaskResult]] = {
    "od": od_mask,
    "otsu": _otsu,
}


def mask_from_rgb(rgb: np.ndarray, mpp: float, params: MaskParams | None = None) -> np.ndarray:
    """Tissue mask (bool, same height/width) of an RGB picture at ``mpp`` µm/px."""
    params = params or MaskParams()
    return MASK_METHODS[params.method](rgb, mpp, params).mask


def working_mpp(slide: Slide, params: MaskParams) -> float:
    """The mask's working resolution for ``slide``: ``params.mpp``, or finer so the slide's short side
    has at least ``min_side_px`` pixels — never finer than ``finest_mpp`` nor than the slide itself."""
    short_um = min(slide.dimensions) * slide.mpp0
    if params.min_side_px <= 0 or short_um / params.mpp >= params.min_side_px:
        return params.mpp
    return max(short_um / params.min_side_px, params.finest_mpp, slide.mpp0)


def compute_mask(
    slide: Slide, params: MaskParams | None = None, thumbnail: np.ndarray | None = None
) -> TissueMask:
    """The slide's tissue mask at :func:`working_mpp` (reads the thumbnail unless given at that resolution)."""
    params = params or MaskParams()
    rgb = thumbnail if thumbnail is not None else slide.thumbnail(mpp=working_mpp(slide, params))
    W, H = slide.dimensions
    mpp = slide.mpp0 * (W / rgb.shape[1] + H / rgb.shape[0]) / 2  # the thumbnail's exact resolution
    result = MASK_METHODS[params.method](rgb, mpp, params)
    return TissueMask(
        result.mask, (W, H), slide.mpp0, mpp, params.method, asdict(params), result.threshold,
        result.ink, ink_colours_seen(rgb, result.ink),
    )  # fmt: skip
