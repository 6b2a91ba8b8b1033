"""The mask result and the small image operations every mask method shares (settings: ``wsikit.settings``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import cv2
import numpy as np

#: Ink colour names; label ``i`` of an ink map is ``INK_COLOURS[i - 1]`` (0: no ink).
INK_COLOURS = ("blue", "green", "black", "red", "other")
OD_SCALE = 100.0  # optical-density maps are uint8 in units of 0.01


class MaskResult(NamedTuple):
    """What a mask method returns: tissue, the threshold it used and, for ``od``, an ink label map."""

    mask: np.ndarray
    threshold: float
    ink: np.ndarray | None = None  # uint8, 0 = no ink, i = INK_COLOURS[i - 1]


@dataclass
class TissueMask:
    """A boolean mask over the whole slide at ``mpp`` µm/px, and how it was made.

    ``scale`` is level-0 pixels per mask pixel (x, y), exact for this mask's shape. ``ink`` (same
    shape, uint8 labels into :data:`INK_COLOURS`) is the marker ink cut out of the tissue, and
    ``ink_colours`` the colour of each ink as seen (RGB).
    """

    mask: np.ndarray
    level0_size: tuple[int, int]
    slide_mpp: float
    mpp: float
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    ink: np.ndarray | None = None
    ink_colours: dict[str, list[int]] = field(default_factory=dict)

    @property
    def scale(self) -> tuple[float, float]:
        h, w = self.mask.shape
        return self.level0_size[0] / w, self.level0_size[1] / h

    @property
    def pixel_um2(self) -> float:
        sx, sy = self.scale
        return sx * sy * self.slide_mpp**2

    @property
    def area_um2(self) -> float:
        return float(self.mask.sum()) * self.pixel_um2

    @property
    def fraction(self) -> float:
        """Share of the slide area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def ink_fraction(self) -> float:
        """Share of the slide area that is excluded marker ink."""
        return float((self.ink > 0).mean()) if self.ink is not None and self.ink.size else 0.0

    @property
    def ink_area_um2(self) -> float:
        return float((self.ink > 0).sum()) * self.pixel_um2 if self.ink is not None else 0.0

    @property
    def empty(self) -> bool:
        return not bool(self.mask.any())


#: Pixels of the picture handled per step by per-pixel rules (bounded temporaries on large thumbnails).
STRIP_PIXELS = 1 << 18


def by_strips(rgb: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` (a per-pixel rule: (h, W, 3) → (h, W)) applied in horizontal strips of about
    :data:`STRIP_PIXELS` pixels, so its float temporaries never span the whole picture."""
    rows = max(1, STRIP_PIXELS // max(1, rgb.shape[1]))
    first = fn(rgb[:rows])
    if rgb.shape[0] <= rows:
        return first
    out = np.empty(rgb.shape[:2], first.dtype)
    out[:rows] = first
    for y in range(rows, rgb.shape[0], rows):
        out[y : y + rows] = fn(rgb[y : y + rows])
    return out


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 ``values`` (any shape): pixels ``> t`` form the upper class."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 / total - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return float(np.argmax(between))


def remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected components smaller than ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels]


def fill_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill background components smaller than ``max_px`` that do not touch the border."""
    if max_px <= 0:
        return mask
    background = ~mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats(background.view(np.uint8), connectivity=4)
    h, w = mask.shape
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    touches = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    fill = (area < max_px) & ~touches
    fill[0] = False
    return mask | fill[labels]


def disk_dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Dilation by a disk of ``radius`` px through a distance transform (cost independent of the radius)."""
    if radius <= 0 or not mask.any():
        return mask
    return cv2.distanceTransform((~mask).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE) <= radius


def disk_erode(mask: np.ndarray, radius: float) -> np.ndarray:
    """Erosion by a disk of ``radius`` px; beyond the picture counts as inside (as OpenCV's erosion)."""
    if radius <= 0 or not mask.any():
        return mask
    padded = cv2.copyMakeBorder(mask.view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    return dist > radius


def od_lut(glass: np.ndarray) -> np.ndarray:
    """A (1, 256, 3) uint8 lookup table: each channel's OD against ``glass`` in units of 0.01, ≥ 0."""
    levels = np.maximum(np.arange(256, dtype=np.float64), 1.0)[:, None]
    od = -OD_SCALE * np.log10(levels / np.asarray(glass, np.float64)[None, :])
    return np.clip(np.rint(od), 0, 255).astype(np.uint8)[None]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
