"""The QC picture: thumbnail, tissue outlines and holes, excluded ink in its own colour, tile grid."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from wsikit.tiles import resize
from wsikit.tissue.base import INK_COLOURS, TissueMask

TISSUE = (0, 170, 0)
HOLE = (255, 140, 0)  # orange: blue is an ink colour
GRID = (230, 200, 0)
#: How each ink is drawn (hatched and outlined): its own colour, strengthened so it shows on the ink.
INK_DRAW = {
    "blue": (0, 60, 255),
    "green": (0, 200, 140),
    "black": (0, 0, 0),
    "red": (255, 0, 0),
    "other": (255, 0, 255),
}


def _scaled(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return resize(mask.astype(np.uint8) * 255, (shape[1], shape[0])) > 127


def _draw_ink(img: np.ndarray, ink: np.ndarray, thick: int) -> None:
    """Each ink region lightened, hatched (diagonal lines every 6 px) and outlined in its
    :data:`INK_DRAW` colour."""
    h, w = img.shape[:2]
    hatch = np.add.outer(np.arange(h, dtype=np.int32), np.arange(w, dtype=np.int32)) % 6 < 2
    labels = cv2.resize(ink, (w, h), interpolation=cv2.INTER_NEAREST)
    for i, name in enumerate(INK_COLOURS, start=1):
        region = labels == i
        if not region.any():
            continue
        colour = INK_DRAW[name]
        img[region] = img[region] // 2 + 127  # lightened, so the hatching shows on dark ink
        img[region & hatch] = colour
        contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, colour, thick)


def qc_image(
    thumbnail: np.ndarray,
    mask: TissueMask,
    tiles: Sequence[tuple[np.ndarray, int]] = (),
    max_side: int = 2048,
) -> np.ndarray:
    """The thumbnail with tile outlines (yellow), tissue contours (green), holes (orange) and excluded
    ink hatched and outlined in its own colour (:data:`INK_DRAW`).

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
            cv2.rectangle(img, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), GRID, 1)
    thick = max(1, round(max(img.shape[:2]) / 500))
    if mask.ink is not None and mask.ink.any():
        _draw_ink(img, mask.ink, thick)
    m = _scaled(mask.mask, img.shape)
    contours, hierarchy = cv2.findContours(m.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is not None:
        for i, contour in enumerate(contours):
            cv2.drawContours(img, [contour], -1, TISSUE if hierarchy[0][i][3] == -1 else HOLE, thick)
    return img
