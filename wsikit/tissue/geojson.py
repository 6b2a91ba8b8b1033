"""Masks as GeoJSON in level-0 pixel coordinates (QuPath imports, edits and exports them).

Tissue outlines (with holes) are ``Tissue`` annotations; excluded marker ink is written as ``Ink``
annotations with ``properties.ink_colour`` (blue, green, black, red, other) and the ink's colour as
seen as the classification colour. Reading back, ``Ink`` and the other :data:`EXCLUDE_CLASSES` are
cut out of the rest. Layout: ``docs/formats.md``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsikit.io import write_text
from wsikit.settings import MaskError
from wsikit.tissue.base import INK_COLOURS, TissueMask

#: Classification names (lower case) of GeoJSON annotations that are cut out of the mask, not added.
EXCLUDE_CLASSES = (
    "ignore", "ignore*", "exclude", "excluded", "artefact", "artifact", "background", "pen", "ink",
)  # fmt: skip
TISSUE_COLOUR = [0, 160, 0]


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


def polygons(mask: np.ndarray, scale: tuple[float, float]) -> list[list[list[list[float]]]]:
    """Each outer contour of ``mask`` with its holes, as GeoJSON polygon rings in level-0 px."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    if hierarchy is not None:
        hier = hierarchy[0]
        for i, contour in enumerate(contours):
            if hier[i][3] != -1:
                continue  # a hole; added to its outer contour below
            rings = [_ring(contour, scale)]
            child = hier[i][2]
            while child != -1:
                rings.append(_ring(contours[child], scale))
                child = hier[child][0]
            out.append(rings)
    return out


def _feature(rings: list, name: str, colour: list[int], **extra: Any) -> dict[str, Any]:
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": rings},
        "properties": {
            "objectType": "annotation",
            "classification": {"name": name, "color": colour},
            "isLocked": False,
            **extra,
        },
    }


def mask_to_geojson(mask: TissueMask, classification: str = "Tissue") -> dict[str, Any]:
    """Tissue contours with holes, then excluded ink, as a GeoJSON FeatureCollection in level-0 px."""
    features = [_feature(rings, classification, TISSUE_COLOUR) for rings in polygons(mask.mask, mask.scale)]
    if mask.ink is not None:
        for i, name in enumerate(INK_COLOURS, start=1):
            region = mask.ink == i
            if region.any():
                colour = mask.ink_colours.get(name, [128, 128, 128])
                features += [
                    _feature(r, "Ink", colour, ink_colour=name) for r in polygons(region, mask.scale)
                ]
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


def _polygons(obj: dict[str, Any]) -> list[tuple[list, str]]:
    """(polygon rings, role) for every Polygon/MultiPolygon in a GeoJSON object; role is ``include``,
    ``exclude`` or ``ink:<colour>``."""
    kind = obj.get("type")
    if kind == "FeatureCollection":
        return [p for f in obj.get("features", []) for p in _polygons(f)]
    if kind == "Feature":
        props = obj.get("properties") or {}
        cls = props.get("classification") or {}
        name = ((cls.get("name") if isinstance(cls, dict) else str(cls)) or "").strip().lower()
        role = "exclude" if name in EXCLUDE_CLASSES else "include"
        if name == "ink":
            colour = str(props.get("ink_colour", "other"))
            role = f"ink:{colour if colour in INK_COLOURS else 'other'}"
        return [(rings, role) for rings, _ in _polygons(obj.get("geometry") or {})]
    if kind == "Polygon":
        return [(obj["coordinates"], "include")]
    if kind == "MultiPolygon":
        return [(rings, "include") for rings in obj["coordinates"]]
    if kind == "GeometryCollection":
        return [p for g in obj.get("geometries", []) for p in _polygons(g)]
    return []  # points, lines: no area


def _fill(target: np.ndarray, rings: list, scale: np.ndarray, value: int) -> None:
    """Set the pixels of one polygon (outer ring less its holes) in ``target`` to ``value``."""
    pts = [np.round(np.asarray(r, np.float64)[:, :2] / scale - 0.5).astype(np.int32) for r in rings]
    h, w = target.shape
    x0, y0 = np.clip(pts[0].min(0), 0, [w, h])
    x1, y1 = np.clip(pts[0].max(0) + 1, 0, [w, h])
    if x1 <= x0 or y1 <= y0:
        return
    shifted = [p - [x0, y0] for p in pts]
    layer = np.zeros((y1 - y0, x1 - x0), np.uint8)  # the polygon's box only
    cv2.fillPoly(layer, shifted[:1], 1)
    if len(shifted) > 1:
        cv2.fillPoly(layer, shifted[1:], 0)
        cv2.polylines(layer, shifted[1:], True, 1)  # hole rings run on tissue pixels
    target[y0:y1, x0:x1][layer > 0] = value


def mask_from_geojson(
    path: str | os.PathLike, level0_size: tuple[int, int], slide_mpp: float, mpp: float = 8.0
) -> TissueMask:
    """Rasterise a (QuPath-edited) GeoJSON of level-0 polygons into a mask at ``mpp`` µm/px.

    Polygon holes are cut out; annotations classified as one of :data:`EXCLUDE_CLASSES`
    (e.g. "Ignore*", "Artefact", "Ink") are subtracted from the others; ``Ink`` ones also come back
    as the mask's ink layer (for the QC picture).
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
    ink = np.zeros((h, w), np.uint8)
    try:
        for rings, role in _polygons(obj):
            if role.startswith("ink:"):
                _fill(ink, rings, scale, INK_COLOURS.index(role[4:]) + 1)
            _fill(include if role == "include" else exclude, rings, scale, 1)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise MaskError(f"{path}: malformed GeoJSON polygon ({exc}); export it again from QuPath") from exc
    mask = include.astype(bool) & ~exclude.astype(bool)
    mpp_out = slide_mpp * float(scale.mean())
    return TissueMask(
        mask, (W, H), slide_mpp, mpp_out, "geojson", {"source": str(path)}, ink=ink if ink.any() else None
    )
