"""Settings, the mask result and the small image operations every mask method shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import cv2
import numpy as np

#: Mask methods by name (the functions are registered in ``wsikit.tissue.MASK_METHODS``).
METHODS = ("od", "otsu")
#: Settings whose default depends on the method (``None`` in :class:`MaskParams` means "the method's").
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "od": {"close_um": 64.0, "pen_min_um2": 20_000.0},
    "otsu": {"close_um": 32.0, "pen_min_um2": 40_000.0},
}
#: Ink colour names; label ``i`` of an ink map is ``INK_COLOURS[i - 1]`` (0: no ink).
INK_COLOURS = ("blue", "green", "black", "red", "other")
OD_SCALE = 100.0  # optical-density maps are uint8 in units of 0.01


class MaskError(ValueError):
    """Bad mask settings or an unreadable GeoJSON mask; the message names the file and the fix."""


@dataclass(frozen=True)
class MaskParams:
    """Tissue-mask settings; sizes are physical so they hold at any scan resolution.

    ``od`` (the default) and ``otsu`` share the size settings; ``channel``, ``min/max_saturation``,
    ``exclude_black/white``, ``black_max`` and ``white_min`` are ``otsu``'s only, ``min_od`` is ``od``'s.
    """

    method: str = "od"
    mpp: float = 8.0  # working resolution of the mask thumbnail, µm/px (coarsest used)
    min_side_px: int = 128  # a finer working resolution when the slide's short side would be fewer px
    finest_mpp: float = 1.0  # ... but never finer than this (nor than the slide)
    min_od: float = 0.03  # od: floor of the optical-density threshold (summed over R, G, B)
    channel: str = "saturation"  # otsu: "saturation" | "darkness" | "both"
    min_saturation: int = 15  # otsu: floor of the saturation threshold (0–255): glass stays glass
    max_saturation: int = 30  # otsu: cap, so saturated ink, dye or blood cannot push pale tissue out
    blur_um: float = 40.0  # median-blur kernel side
    close_um: float | None = None  # closing kernel (bridges gaps); od 64, otsu 32
    open_um: float = 16.0  # opening kernel (drops specks and thin lines)
    max_hole_um2: float = 20_000.0  # holes smaller than this are filled
    min_object_um2: float = 20_000.0  # tissue pieces smaller than this are dropped
    exclude_pen: bool = True  # marker ink (od: blue, green, black, red; otsu: red, green, blue)
    pen_min_um2: float | None = None  # ink smaller than this is stain, not pen; od 20,000, otsu 40,000
    pen_margin_um: float = 24.0  # ink's blurred rim, removed with it
    ink_grow_um: float = 2000.0  # od: how far ink is followed over tissue from where it is unmistakable
    exclude_black: bool = True  # otsu: near-black (max channel < black_max)
    exclude_white: bool = True  # otsu: near-white (min channel > white_min)
    black_max: int = 40
    white_min: int = 230

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MaskError(f"unknown mask method {self.method!r}; use one of {sorted(METHODS)}")
        if self.channel not in ("saturation", "darkness", "both"):
            raise MaskError(f"mask channel {self.channel!r}: use saturation, darkness or both")
        if not 0.1 <= self.mpp <= 200:
            raise MaskError(f"mask working resolution {self.mpp} µm/px: use 0.1–200 (e.g. 8)")
        if self.min_side_px < 0 or not 0.1 <= self.finest_mpp <= 200:
            raise MaskError("mask min_side_px must be ≥ 0 and finest_mpp 0.1–200 µm/px (e.g. 512 and 1.0)")
        for name, value in METHOD_DEFAULTS[self.method].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    def px(self, um: float) -> int:
        """An odd kernel side in working pixels for ``um`` micrometres (0 when ``um`` is under a pixel)."""
        n = round(um / self.mpp)
        return 0 if n < 2 else n | 1

    def at(self, mpp: float) -> MaskParams:
        """The same settings at working resolution ``mpp``."""
        if mpp == self.mpp:
            return self
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return MaskParams(**{**fields, "mpp": mpp})


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
