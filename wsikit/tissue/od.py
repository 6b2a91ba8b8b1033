"""The ``od`` mask method (the default): optical density against the slide's own glass.

1. **Glass.** The picture is averaged down to cells of about half ``blur_um``; the brightest
   near-neutral cells are the glass, and their colour is the light that reached the camera through
   empty slide (per channel). No such cells (tissue from edge to edge): 242 per channel.
2. **Optical density** ``OD = −log10(I / glass)`` per channel, summed over R, G and B — stain of any
   colour adds to it, so it works on H&E, IHC (haematoxylin and DAB), faint tissue and greyscale alike.
3. **Threshold from the glass's own statistics:** the peak of the near-neutral bright cells' summed
   OD gives the glass's level and noise σ (half width on the low side, since tissue only adds OD);
   tissue is a median-blurred (``blur_um``) summed OD above ``max(min_od, peak + 6σ)``, at most 0.12.
4. Marker ink is found (:mod:`wsikit.tissue.ink`) and cut out; closing (``close_um``, 64 µm), opening
   (``open_um``), holes under ``max_hole_um2`` filled, pieces under ``min_object_um2`` dropped.

The saturation channel the issue suggested adds nothing once OD is summed (OD max − min ≤ OD sum, and
on the evaluation set the union scored the same IoU to three decimals), so it is not used.
"""

from __future__ import annotations

import cv2
import numpy as np

from wsikit.settings import MaskError, MaskParams
from wsikit.tissue.base import (
    OD_SCALE,
    MaskResult,
    disk_dilate,
    disk_erode,
    fill_holes,
    od_lut,
    remove_small,
)
from wsikit.tissue.ink import find_ink

DEFAULT_GLASS = 242.0  # per channel, when the picture shows no glass (measured: 238–246 on real scans)
MAX_THRESHOLD = 0.12  # summed OD: a noisy background may raise the threshold, but not above this


def _cells(rgb: np.ndarray, mpp: float, cell_um: float, max_side: int = 256) -> np.ndarray:
    """The picture averaged down to cells of about ``cell_um`` (at most ``max_side`` px a side), float32."""
    h, w = rgb.shape[:2]
    f = max(1.0, cell_um / mpp, max(h, w) / max_side)
    size = (max(1, round(w / f)), max(1, round(h / f)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA).reshape(-1, 3).astype(np.float32)


def glass_level(
    rgb: np.ndarray, mpp: float, cell_um: float = 20.0
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Glass colour per channel and the glass cells' summed OD (centre, σ); (242s, None) without glass.

    Glass: the cells within 3 grey levels of the brightest 2 % that are near-neutral (channels within
    12 levels) and not dark (≥ 150).
    """
    cells = _cells(rgb, mpp, cell_um)
    low, high = cells.min(1), cells.max(1)
    candidates = (high - low <= 12) & (low >= 150)
    if candidates.sum() >= max(8, 0.002 * len(cells)):
        bright = np.percentile(low[candidates], 98) - 3
        glass_cells = cells[candidates & (low >= bright)]
        glass = np.median(glass_cells, axis=0)
        od = -np.log10(np.maximum(cells, 1.0) / glass).sum(1)
        return glass, _glass_peak(od[candidates])
    return np.full(3, DEFAULT_GLASS, np.float32), None


def _glass_peak(od: np.ndarray, width: float = 0.004) -> tuple[float, float]:
    """Centre and σ of the glass's peak in the cells' summed OD: the histogram's mode and its half
    width at half height on the low side (tissue only adds OD, so the high side is not used)."""
    edges = np.arange(-0.1, 0.3 + width, width)
    hist, _ = np.histogram(od, edges)
    mode = int(np.argmax(hist))
    low = mode
    while low > 0 and hist[low - 1] >= hist[mode] / 2:
        low -= 1
    half_width = (mode - low + 0.5) * width
    return float(edges[mode] + width / 2), half_width / 1.1774


def od_sum(rgb: np.ndarray, glass: np.ndarray) -> np.ndarray:
    """Summed OD (uint8, units of 0.01, saturating at 2.55)."""
    per_channel = cv2.LUT(np.ascontiguousarray(rgb), od_lut(glass))
    return cv2.transform(per_channel, np.ones((1, 3), np.float32))


def morph(mask: np.ndarray, size: int, op: int) -> np.ndarray:
    """Closing or opening with a disk of diameter ``size`` px (ellipse kernels when small)."""
    if size < 3:
        return mask
    if size <= 9:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        return cv2.morphologyEx(mask.view(np.uint8), op, kernel).view(bool)
    r = (size - 1) / 2
    if op == cv2.MORPH_CLOSE:
        return disk_erode(disk_dilate(mask, r), r)
    return disk_dilate(disk_erode(mask, r), r)


def fill_holes_beside_ink(tissue: np.ndarray, ink: np.ndarray, max_px: float) -> np.ndarray:
    """Fill holes under ``max_px``: glass pockets of tissue, also those that ink cut open, but not glass
    that mostly ink surrounds (inside a pen loop); ink itself stays out."""
    if not ink.any():
        return fill_holes(tissue, max_px)
    filled = fill_holes(tissue | ink, max_px) & ~tissue & ~ink
    if not filled.any():
        return tissue
    n, labels = cv2.connectedComponents(filled.view(np.uint8), connectivity=4)
    kernel = np.ones((3, 3), np.uint8)
    beside = [np.bincount(labels[cv2.dilate(m.view(np.uint8), kernel).view(bool) & filled], minlength=n)
              for m in (tissue, ink)]  # fmt: skip
    keep = beside[0] >= beside[1]
    keep[0] = False
    return tissue | keep[labels]


def remove_small_beside_ink(tissue: np.ndarray, ink: np.ndarray, min_px: float) -> np.ndarray:
    """Drop tissue pieces under ``min_px``, except those with no glass around them (a disc of tissue
    inside a pen circle stays; a sliver between ink and glass goes)."""
    if not ink.any():
        return remove_small(tissue, min_px)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(tissue.view(np.uint8), connectivity=8)
    glass = ~tissue & ~ink
    near_glass = cv2.dilate(glass.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool) & tissue
    touches = np.bincount(labels[near_glass], minlength=n) > 0
    keep = (stats[:, cv2.CC_STAT_AREA] >= min_px) | ~touches
    keep[0] = False
    return keep[labels]


def is_grey(rgb: np.ndarray) -> bool:
    """True when the picture has no colour (greyscale scans): all channels within 2 levels."""
    sample = rgb[:: max(1, rgb.shape[0] // 256), :: max(1, rgb.shape[1] // 256)].astype(np.int16)
    return int(np.abs(sample - sample[..., 1:2]).max()) <= 2


def od_threshold(glass_stats: tuple[float, float] | None, params: MaskParams) -> float:
    """Summed-OD threshold: ``max(min_od, centre + 6σ)`` of the glass, at most :data:`MAX_THRESHOLD`."""
    if glass_stats is None:
        return params.min_od
    centre, sigma = glass_stats
    return float(min(MAX_THRESHOLD, max(params.min_od, centre + 6 * sigma)))


def od_mask(rgb: np.ndarray, mpp: float, params: MaskParams) -> MaskResult:
    """The ``od`` method on an RGB picture at ``mpp`` µm/px: tissue, the summed-OD threshold, ink labels."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise MaskError(f"expected an (H, W, 3) uint8 RGB picture, got {rgb.shape} {rgb.dtype}")
    p = params.at(mpp)
    glass, stats = glass_level(rgb, mpp, p.blur_um / 2)
    threshold = od_threshold(stats, p)
    k = p.px(p.blur_um)
    summed = od_sum(rgb, glass)
    smooth = cv2.medianBlur(summed, k) if k else summed
    tissue = smooth > threshold * OD_SCALE
    ink = find_ink(rgb, mpp, glass, p) if p.exclude_pen and not is_grey(rgb) else None
    inked = ink > 0 if ink is not None else np.zeros(tissue.shape, bool)
    tissue = morph(tissue, p.px(p.close_um), cv2.MORPH_CLOSE) & ~inked
    tissue = morph(tissue, p.px(p.open_um), cv2.MORPH_OPEN)
    tissue = fill_holes_beside_ink(tissue, inked, p.max_hole_um2 / mpp**2)
    tissue = remove_small_beside_ink(tissue, inked, p.min_object_um2 / mpp**2)
    return MaskResult(tissue, threshold, ink)
