"""Marker ink of the common colours (blue, green/teal, black, red), over glass and over tissue.

Ink is an absorbing layer: where it lies on tissue the optical density (OD) is the tissue's plus the
ink's (Beer–Lambert). Found at a resolution of at least :data:`INK_MPP` µm/px (strokes are ≥ 0.2 mm):

1. **Unmistakable ink** (seeds): pieces of at least ``pen_min_um2`` whose OD colour no stain has —
   blue/green: red OD exceeds green OD by ≥ 0.2 of the sum (haematoxylin: ≤ 0.1, pale IHC
   haematoxylin included); red: summed OD ≥ 0.8 with red OD ≤ 0.08 of it and blue OD ≥ 0.33
   (eosin, even strongly red eosin, keeps more red OD; DAB much more); black: summed OD ≥ 1.2 with
   the channels' shares within 0.12 of each other, or ≥ 2.2 within 0.16 (dark haematoxylin transmits
   blue). Blue vs green: blue OD under 0.6 × green OD is blue. On the pen-free real images of the
   tests these rules fire on ≤ 0.3 % of tissue pixels, in specks the size filter removes.
2. **Local contrast** against the tissue around (the mean OD of tissue cells within ~0.75 mm,
   recomputed four times leaving out cells that look like ink): a pixel's extra OD is split into its
   component ``β`` along the ink's colour and a residual, and its colour's shift toward the ink's is
   measured. Ink adds ``β`` with little residual; darker tissue of another kind (haematoxylin-rich
   epidermis beside pink dermis) leaves a large residual. Strong contrast (``β`` ≥ 0.45 of the ink's
   strength, residual ≤ ρ·β, shift ≥ 0.18 of the way) starts ink over tissue (circles drawn inside
   tissue) — for green and black always, for blue and red (like haematoxylin and eosin) only on
   slides where that ink is also unmistakable; weak contrast (``β`` ≥ 0.08, residual ≤ ρ·β, shift ≥
   0.12) and faint ink of the ink's own colour on glass only extend ink already found, at most
   ``ink_grow_um`` from it.
3. The ink's blurred rim goes with it (``pen_margin_um``).

The ink colours come from the seeds when there are any, else from real marker ink measured on public
thumbnails (:data:`INK_OD`). Greyscale pictures have no ink colours and are not searched.
"""

from __future__ import annotations

import cv2
import numpy as np

from wsikit.settings import MaskParams
from wsikit.tissue.base import INK_COLOURS, OD_SCALE, od_lut, remove_small

INK_MPP = 8.0  # ink is judged at this resolution or coarser
INK_MAX_PIXELS = 1 << 19  # ... and on at most about this many pixels
#: Strong marker-ink OD (R, G, B): the 90th percentile (by summed OD) of real strokes' pixels — blue:
#: histolab's ``wsi-blue-pen.png``; green (teal), red and black: ``diagnostic-slide-thumb-rgb.png``
#: (black: the circles drawn over tissue, less the tissue's OD around them).
INK_OD = {
    "blue": (0.64, 0.33, 0.08),
    "green": (0.97, 0.41, 0.42),
    "black": (0.93, 1.18, 1.05),
    "red": (0.13, 0.94, 0.71),
}
#: How far a tissue-like darkening may stray from the pure ink direction (residual / β) in a seed.
RHO = {"blue": 0.35, "green": 0.35, "black": 0.12, "red": 0.3}
#: Inks whose strokes lying over tissue only are always searched by contrast: colours no stain has.
#: Blue (like haematoxylin) and red (like eosin) only on slides where that ink is also unmistakable.
OVER_TISSUE = ("green", "black")
LOCAL_UM = 50.0  # cell of the local tissue mean
LOCAL_CELLS = 15  # window of the local mean, in cells
RHO_WEAK = 1.0  # growing ink: the same residual bound, a weaker shift
SHIFT_WEAK, SHIFT_STRONG = 0.12, 0.18
BETA_WEAK, BETA_STRONG = 0.08, 0.45  # extra OD along the ink (fraction of its typical strength)


def _label(name: str) -> int:
    return INK_COLOURS.index(name) + 1


Planes = list[np.ndarray]  # R, G, B as separate float32 pictures (fast element-wise arithmetic)


def ink_seeds(share: Planes, total: np.ndarray) -> dict[str, np.ndarray]:
    """Pixels whose OD colour is unmistakably marker ink, per colour (before the size filter)."""
    r, g, b = share
    cyan = (total >= 0.25) & (r - g >= 0.2)
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    neutral, dark_neutral = spread <= 0.12, spread <= 0.16
    return {
        "blue": cyan & (b < 0.6 * g),
        "green": cyan & (b >= 0.6 * g),
        "black": ((total >= 1.2) & neutral) | ((total >= 2.2) & dark_neutral),
        "red": (total >= 0.8) & (r <= 0.08) & (b >= 0.33),
    }


def _share(od: Planes) -> tuple[Planes, np.ndarray]:
    total = od[0] + od[1] + od[2]
    inv = 1.0 / np.maximum(total, 1e-3)
    return [c * inv for c in od], total


def contrast(od: Planes, share: Planes, background: Planes, ink: np.ndarray) -> tuple[np.ndarray, ...]:
    """(β, residual, shift) of every pixel against its local ``background`` for ink OD ``ink``:
    the extra OD along the ink, the rest of the extra OD, and how far the colour moved toward the ink's."""
    unit, ink_share = ink / np.linalg.norm(ink), ink / ink.sum()
    d = [o - b for o, b in zip(od, background, strict=True)]
    beta = d[0] * unit[0] + d[1] * unit[1] + d[2] * unit[2]
    residual = np.sqrt(np.maximum(d[0] * d[0] + d[1] * d[1] + d[2] * d[2] - beta * beta, 0))
    bg_share, _ = _share(background)
    way = [k - b for k, b in zip(ink_share, bg_share, strict=True)]
    moved = sum((s - b) * w for s, b, w in zip(share, bg_share, way, strict=True))
    shift = moved / np.maximum(way[0] * way[0] + way[1] * way[1] + way[2] * way[2], 1e-4)
    return beta, residual, shift


def tissue_background(
    od: Planes, seeded: np.ndarray, inks: dict[str, np.ndarray], strength: dict[str, float], cell: float
) -> Planes:
    """Local mean OD of the tissue around each pixel, leaving out what looks like ink.

    Worked on cells of ``cell`` px: the mean over ``LOCAL_CELLS`` × ``LOCAL_CELLS`` tissue cells,
    recomputed four times without the cells that look like ink against the previous mean.
    """
    h, w = seeded.shape
    size = (max(1, round(w / cell)), max(1, round(h / cell)))
    cells = [cv2.resize(c, size, interpolation=cv2.INTER_AREA) for c in od]
    share, total = _share(cells)
    tissue = total >= 0.1
    seeded = cv2.resize(seeded.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0.25
    excluded = seeded
    k = (LOCAL_CELLS, LOCAL_CELLS)
    for _ in range(4):
        weight = (tissue & ~excluded).astype(np.float32)
        norm = cv2.blur(weight, k)
        inv = np.where(norm >= 0.02, 1.0 / np.maximum(norm, 1e-4), 0).astype(np.float32)
        background = [cv2.blur(c * weight, k) * inv for c in cells]
        excluded = seeded.copy()
        for c, ink in inks.items():
            beta, _, shift = contrast(cells, share, background, ink)
            excluded |= (shift >= SHIFT_WEAK) & (beta >= BETA_WEAK * strength[c])
    return [cv2.resize(b, (w, h), interpolation=cv2.INTER_LINEAR) for b in background]


def grow(seeds: np.ndarray, allowed: np.ndarray, steps: int) -> np.ndarray:
    """``seeds`` grown within ``allowed``, at most ``steps`` pixels (geodesic dilation)."""
    current = (seeds & allowed).view(np.uint8)
    allowed8 = allowed.view(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    for _ in range(steps):
        grown = cv2.dilate(current, kernel) & allowed8
        if np.array_equal(grown, current):
            break
        current = grown
    return current.view(bool)


def _ink_of(pixels: np.ndarray) -> np.ndarray:
    """A seed's ink: its median colour direction at the 90th percentile of its strength (as :data:`INK_OD`)."""
    norms = np.linalg.norm(pixels, axis=1)
    unit = np.median(pixels / np.maximum(norms, 1e-6)[:, None], axis=0)
    return (unit / np.linalg.norm(unit) * np.percentile(norms, 90)).astype(np.float32)


def _ink_lowres(rgb: np.ndarray, mpp: float, lut: np.ndarray, p: MaskParams) -> dict[str, np.ndarray]:
    """Ink masks per colour on a picture at ``mpp`` ≥ :data:`INK_MPP`."""
    od3 = cv2.GaussianBlur(cv2.LUT(rgb, lut).astype(np.float32) / OD_SCALE, (0, 0), max(0.5, 10 / mpp))
    od = list(cv2.split(od3))
    share, total = _share(od)
    area = (p.pen_min_um2 or 0) / mpp**2
    seeds = {c: remove_small(s, area) for c, s in ink_seeds(share, total).items()}
    # inks to look for: those seen unmistakably (first), and those no stain resembles
    names = sorted((c for c in seeds if seeds[c].any() or c in OVER_TISSUE), key=lambda c: not seeds[c].any())
    if not names:
        return {}
    inks = {c: _ink_of(od3[seeds[c]]) if seeds[c].any() else np.asarray(INK_OD[c], np.float32) for c in names}
    strength = {c: float(np.linalg.norm(v)) for c, v in inks.items()}
    background = tissue_background(
        od, np.logical_or.reduce(list(seeds.values())), inks, strength, LOCAL_UM / mpp
    )
    found = {}
    for c in names:
        beta, residual, shift = contrast(od, share, background, inks[c])
        s, ink_share = strength[c], inks[c] / inks[c].sum()
        strong = (beta >= BETA_STRONG * s) & (residual <= RHO[c] * beta) & (shift >= SHIFT_STRONG)
        strong = seeds[c] | remove_small(strong, area / 4)
        pure = sum(np.abs(sh - k) for sh, k in zip(share, ink_share, strict=True)) <= 0.12  # faint, on glass
        weak = (shift >= SHIFT_WEAK) & (beta >= BETA_WEAK * s) & (residual <= RHO_WEAK * RHO[c] * beta)
        weak |= (pure & (total >= 0.03)) | strong
        found[c] = grow(strong, weak, int(p.ink_grow_um / mpp))
    return found


def find_ink(rgb: np.ndarray, mpp: float, glass: np.ndarray, params: MaskParams) -> np.ndarray:
    """Ink label map (uint8, same height/width; 0 none, ``i`` = ``INK_COLOURS[i - 1]``) of a picture,
    with the ink's blurred rim (``pen_margin_um``) included."""
    h, w = rgb.shape[:2]
    f = max(1.0, INK_MPP / mpp, (h * w / INK_MAX_PIXELS) ** 0.5)
    small = (
        rgb
        if f == 1.0
        else cv2.resize(rgb, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA)
    )
    found = _ink_lowres(np.ascontiguousarray(small), mpp * f, od_lut(glass), params)
    low = np.zeros(small.shape[:2], np.uint8)
    for name, m in found.items():  # inks seen unmistakably first
        low[m & (low == 0)] = _label(name)
    if not low.any():
        return np.zeros((h, w), np.uint8)
    if f == 1.0:
        core = low
    else:  # smooth outlines from the enlarged union, colours from the nearest low-resolution pixel
        union = cv2.resize((low > 0).view(np.uint8) * 255, (w, h), interpolation=cv2.INTER_LINEAR) >= 128
        core = cv2.resize(low, (w, h), interpolation=cv2.INTER_NEAREST) * union
    margin = params.px(params.pen_margin_um)
    if margin:  # the rim takes the colour of the ink beside it (the higher label where two meet)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (margin, margin))
        core = np.where(core > 0, core, cv2.dilate(core, kernel))
    return core


def ink_colours_seen(rgb: np.ndarray, labels: np.ndarray | None) -> dict[str, list[int]]:
    """Mean RGB of each ink present (the colour of the ink as seen on the thumbnail)."""
    if labels is None:
        return {}
    out = {}
    for i in np.unique(labels):
        if i:
            out[INK_COLOURS[int(i) - 1]] = [round(float(v)) for v in rgb[labels == i].mean(0)]
    return out
