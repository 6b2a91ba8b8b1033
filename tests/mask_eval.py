"""A labelled evaluation set for tissue masks, built at run time from real public images.

Imported by ``tests/test_mask_quality.py`` (small scenes) and ``benchmarks/bench_mask.py`` (2,048-px
scenes). Every pixel of tissue and glass is real; what is made up is only *where* it lies, so the
reference masks are known exactly. How each class is made (also in ``docs/tissue.md``):

- **H&E** — fragments of real H&E (TIAToolbox's and torchstain's targets/sources, a crop of the bundled
  CMU slide, mosaics of Kather 2016 lymphocyte and tumour tiles) resampled to :data:`SCENE_MPP`, each
  cut by a smooth random outline and laid on real glass (histolab's and Kather's empty tiles, mirror-tiled).
  Layers combine by Beer–Lambert: ``pixel = glass · 10^(−α · OD_tissue)``, ``α`` the outline softened
  by a 2-px Gaussian. Reference tissue: ``α ≥ 0.5``.
- **IHC** — the same scenes with each tissue pixel's optical density colour-deconvolved into
  haematoxylin and eosin (Ruifrok & Johnston's H/E/DAB matrix, ``skimage.color.rgb_from_hed``), then
  recombined with the haematoxylin and DAB vectors measured (Macenko) on scikit-image's real IHC image:
  haematoxylin at 0.6 of its H&E density (a pale counterstain), DAB where eosin was (cytoplasm) and on
  the darkest nuclei, inside smooth random "positive" regions covering 15–60 % of the tissue.
- **faint** — the H&E scenes with the tissue's optical density scaled by :data:`FAINT` (lowered stain
  density; ``very faint`` by :data:`VERY_FAINT`).
- **grey8 / grey16** — the H&E scenes' luminance (0.299 R + 0.587 G + 0.114 B), as 8-bit RGB and as a
  16-bit single-channel tiled TIFF read back through :func:`wsikit.slide.open_slide` (tiffslide).
- **pen-<colour>** — the H&E scenes with marker strokes added as a further absorbing layer
  (``OD += s · a · ink``): a loop around one fragment, a line across another, a circle over the largest
  fragment (drawn over tissue only) and a tick on glass; 5–10 % of the scene's short side wide
  (150–300 µm on the benchmark's 1,536 × 2,048 scenes), soft edges (Gaussian σ = width / 8), opacity
  ``a`` 0.55–1.0 per stroke, varying by ±25 % along it. Ink colours are optical densities measured on real
  marker ink: blue on histolab's ``wsi-blue-pen.png`` fixture (not shipped; the three numbers only),
  green/teal on ``no-tissue-green-pen.png``, red on ``tcga-red-pen.png``, black on the black circles of
  ``diagnostic-slide-thumb-rgb.png`` (the ink pixels less the tissue around them). Reference ink: stroke
  optical density (summed over channels) ≥ :data:`INK_VISIBLE`; reference tissue: tissue and not ink.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image

SCENE_MPP = 2.0  # µm/px of every scene
FAINT = 0.3  # optical-density scale of the faint class
VERY_FAINT = 0.15
INK_VISIBLE = 0.15  # summed OD from which a stroke's pixels count as ink in the reference

#: Marker ink optical density per channel (R, G, B) at full strength, measured on real ink (see above).
INK_OD = {
    "blue": (0.64, 0.33, 0.08),
    "green": (0.69, 0.18, 0.24),
    "black": (0.93, 1.18, 1.05),
    "red": (0.10, 1.21, 1.24),
}
#: Source images and their resolution (µm/px): real H&E that is tissue from edge to edge.
TISSUE_SOURCES = (
    ("stain/tiatoolbox_stain_norm_target.png", 0.5),
    ("stain/torchstain_source.png", 0.5),
    ("stain/torchstain_target.png", 0.5),
    ("patches/tissue_tiles/tissue-level0-4302-10273-4814-10785.png", 0.5),
)
KATHER = ("04_LYMPHO", "01_TUMOR")  # mosaics: dense haematoxylin; tumour
CMU_CROP = np.s_[475:725, 200:350]  # dense epidermis and dermis of the bundled slide at 2 µm/px
GLASS_SOURCES = ("patches/tissue_tiles/almost-white-1.png", "patches/tissue_tiles/no-tissue.png")
RUIFROK = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])  # H, E, DAB rows


@dataclass
class Case:
    """One labelled picture: the RGB the mask sees and what is really where."""

    name: str
    kind: str
    rgb: np.ndarray
    tissue: np.ndarray  # reference tissue, ink excluded
    ink: np.ndarray = field(default=None)  # type: ignore[assignment]  # reference ink (visible strokes)
    covered: np.ndarray = field(default=None)  # type: ignore[assignment]  # tissue under that ink
    mpp: float = SCENE_MPP

    def __post_init__(self) -> None:
        if self.ink is None:
            self.ink = np.zeros(self.tissue.shape, bool)
        if self.covered is None:
            self.covered = np.zeros(self.tissue.shape, bool)


@dataclass
class Scene:
    """Layers of one scene: glass intensity (float RGB), tissue optical density and its coverage."""

    glass: np.ndarray
    od: np.ndarray
    alpha: np.ndarray
    boxes: list[tuple[int, int, int, int]]  # fragments' (x, y, w, h)

    @property
    def tissue(self) -> np.ndarray:
        return self.alpha >= 0.5


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def optical_density(rgb: np.ndarray, white: np.ndarray | float) -> np.ndarray:
    """``−log10(I / white)`` per channel, float32, not below 0."""
    od = -np.log10(np.maximum(rgb.astype(np.float32), 1.0) / np.asarray(white, np.float32))
    return np.maximum(od, 0.0)


def _to_scene_mpp(rgb: np.ndarray, mpp: float) -> np.ndarray:
    k = mpp / SCENE_MPP
    size = (max(1, round(rgb.shape[1] * k)), max(1, round(rgb.shape[0] * k)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)


def _white(rgb: np.ndarray) -> np.ndarray:
    """A source's own glass level: its brightest pixels per channel, at least 235."""
    return np.maximum(np.percentile(rgb.reshape(-1, 3), 99.5, axis=0), 235.0)


@functools.lru_cache(maxsize=2)
def tissue_sources(data: Path) -> tuple[np.ndarray, ...]:
    """Real H&E fragments (optical density at :data:`SCENE_MPP`), each tissue from edge to edge."""
    from wsikit.slide import SAMPLE_SLIDE, open_slide

    rgbs = [_to_scene_mpp(_rgb(data / p), mpp) for p, mpp in TISSUE_SOURCES]
    for cls in KATHER:  # 3 tiles and their mirror images, 3 × 3
        tiles = [_rgb(p) for p in sorted((data / "patches/kather2016" / cls).glob("*.tif"))]
        rows = [np.concatenate([t, t[:, ::-1], t[::-1]], 1) for t in tiles]
        rgbs.append(_to_scene_mpp(np.concatenate(rows, 0), 0.495))
    with open_slide(SAMPLE_SLIDE) as slide:
        rgbs.append(slide.thumbnail(mpp=SCENE_MPP)[CMU_CROP])
    return tuple(optical_density(rgb, _white(rgb)) for rgb in rgbs)


def _glass(data: Path, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Real glass (float RGB) mirror-tiled to ``shape`` from a random offset."""
    src = _rgb(data / GLASS_SOURCES[rng.integers(len(GLASS_SOURCES))]).astype(np.float32)
    tile = np.concatenate([src, src[:, ::-1]], 1)
    tile = np.concatenate([tile, tile[::-1]], 0)
    reps = (shape[0] // tile.shape[0] + 2, shape[1] // tile.shape[1] + 2, 1)
    big = np.tile(tile, reps)
    y, x = rng.integers(0, tile.shape[0]), rng.integers(0, tile.shape[1])
    return np.ascontiguousarray(big[y : y + shape[0], x : x + shape[1]])


def blob(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random outline inscribed in an ``h`` × ``w`` box (bool)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = (yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2)
    r, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
    amps = [rng.uniform(0, 0.12 / k**0.5) for k in range(2, 6)]
    edge = np.ones_like(r)
    for k, a in zip(range(2, 6), amps, strict=True):
        edge += a * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return r < 0.96 * edge / (1 + sum(amps))


def _texture(src: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """``src`` rotated, mirror-tiled to ``h`` × ``w`` from a random offset (real pixels, seamless)."""
    src = np.rot90(src, rng.integers(4))
    tile = np.concatenate([src, src[:, ::-1]], 1)
    tile = np.concatenate([tile, tile[::-1]], 0)
    big = np.tile(tile, (h // tile.shape[0] + 2, w // tile.shape[1] + 2, 1))
    y, x = rng.integers(0, tile.shape[0]), rng.integers(0, tile.shape[1])
    return big[y : y + h, x : x + w]


def _place(
    occupied: np.ndarray, h: int, w: int, gap: int, rng: np.random.Generator
) -> tuple[int, int] | None:
    H, W = occupied.shape
    if h + 2 * gap > H or w + 2 * gap > W:
        return None
    for _ in range(200):
        y, x = int(rng.integers(gap, H - h - gap + 1)), int(rng.integers(gap, W - w - gap + 1))
        if not occupied[y - gap : y + h + gap, x - gap : x + w + gap].any():
            return y, x
    return None


def scene(data: Path, shape: tuple[int, int], seed: int, fragments: int = 7) -> Scene:
    """Real tissue fragments (0.2–0.45 of the short side, any source, any turn) on real glass."""
    rng = np.random.default_rng(seed)
    sources = tissue_sources(data)
    H, W = shape
    od = np.zeros((H, W, 3), np.float32)
    cover = np.zeros((H, W), np.float32)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(fragments * 3):
        side = rng.uniform(0.2, 0.45) * min(H, W)
        aspect = rng.uniform(0.6, 1.6)
        h, w = int(side / aspect**0.5), int(side * aspect**0.5)
        spot = _place(cover > 0, h, w, 40, rng)
        if spot is None:
            continue
        y, x = spot
        cover[y : y + h, x : x + w] = blob(h, w, rng)
        od[y : y + h, x : x + w] = _texture(sources[rng.integers(len(sources))], h, w, rng)
        boxes.append((x, y, w, h))
        if len(boxes) == fragments:
            break
    alpha = cv2.GaussianBlur(cover, (0, 0), 2.0)
    return Scene(_glass(data, shape, rng), od * alpha[..., None], alpha, boxes)


def render(glass: np.ndarray, od: np.ndarray) -> np.ndarray:
    """Beer–Lambert: ``glass · 10^(−od)`` as uint8 RGB."""
    return np.clip(np.rint(glass * np.power(10.0, -od)), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=2)
def ihc_stains(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and DAB unit vectors measured on scikit-image's real IHC image (Macenko's angles)."""
    rgb = _rgb(data / "stain/skimage_ihc.png")
    od = optical_density(rgb, _white(rgb)).reshape(-1, 3).astype(np.float64)
    od = od[od.sum(1) > 0.15]
    v = np.linalg.svd(od, full_matrices=False)[2][:2].T
    v *= np.sign(v.sum(0))
    angle = np.arctan2(od @ v[:, 1], od @ v[:, 0])
    a, b = (v @ [np.cos(t), np.sin(t)] for t in np.percentile(angle, [1, 99]))
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    return (a, b) if a[0] > b[0] else (b, a)  # haematoxylin absorbs more red than DAB


def _smooth_field(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth random values (mean 0, sd 1), drawn coarse and enlarged (fast at any ``sigma``)."""
    k = max(1.0, sigma / 4)
    small = (max(2, round(shape[0] / k)), max(2, round(shape[1] / k)))
    f = cv2.GaussianBlur(rng.standard_normal(small).astype(np.float32), (0, 0), sigma / k)
    f = cv2.resize(f, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return (f - f.mean()) / (f.std() + 1e-9)


def ihc_od(data: Path, sc: Scene, seed: int) -> np.ndarray:
    """The scene's tissue deconvolved into H and E and recombined as haematoxylin + DAB."""
    rng = np.random.default_rng(seed + 1000)
    od = sc.od
    conc = od.reshape(-1, 3) @ np.linalg.inv(RUIFROK).astype(np.float32)
    h, e = (np.maximum(conc[:, i], 0).reshape(od.shape[:2]) for i in (0, 1))
    positive_share = rng.uniform(0.15, 0.6)
    field_ = _smooth_field(od.shape[:2], 40.0, rng)
    positive = field_ > np.quantile(field_[sc.tissue], 1 - positive_share) if sc.tissue.any() else field_ > 9
    dark_nuclei = h > np.quantile(h[sc.tissue], 0.8) if sc.tissue.any() else h > 9
    dab = positive * (0.8 * e + 0.6 * h * dark_nuclei)
    stain_h, stain_dab = ihc_stains(data)
    return (0.6 * h)[..., None] * stain_h.astype(np.float32) + dab[..., None] * stain_dab.astype(np.float32)


def _strokes(sc: Scene, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Polylines (points, width in px) of a loop around a fragment, a line across one, a circle over
    the largest and a tick on glass; 5–10 % of the scene's short side wide (150–300 µm at 1,536 px)."""
    boxes = sorted(sc.boxes, key=lambda b: -b[2] * b[3])
    widths = [int(rng.uniform(0.05, 0.1) * min(sc.alpha.shape)) for _ in range(4)]
    t = np.linspace(0, 2 * np.pi, 120)
    x, y, w, h = boxes[min(1, len(boxes) - 1)]  # loop around the second largest fragment
    wobble = 1 + 0.08 * np.sin(3 * t + rng.uniform(0, 6))
    rx, ry = w * rng.uniform(0.5, 0.6) * wobble, h * rng.uniform(0.5, 0.6) * wobble
    out = [np.stack([x + w / 2 + rx * np.cos(t), y + h / 2 + ry * np.sin(t)], 1)]
    x, y, w, h = boxes[-1]  # a line across the smallest fragment, from glass to glass
    a = rng.uniform(0, np.pi)
    c, d = np.array([x + w / 2, y + h / 2]), np.array([np.cos(a), np.sin(a)]) * 0.8 * max(w, h)
    out.append(np.stack([c - d, c + 0.3 * d + 0.2 * np.array([d[1], -d[0]]), c + d]))
    x, y, w, h = boxes[0]  # a circle over the largest fragment
    r = 0.22 * min(w, h)
    widths[2] = min(widths[2], int(0.25 * min(w, h)))
    out.append(np.stack([x + w / 2 + r * np.cos(t), y + h / 2 + r * np.sin(t)], 1))
    reach = widths[3]
    away = cv2.dilate(sc.tissue.view(np.uint8), np.ones((2 * reach + 1,) * 2, np.uint8)) == 0
    free = np.argwhere(away[reach:-reach:20, reach:-reach:20])
    if len(free):  # a tick on glass
        py, px = free[rng.integers(len(free))] * 20 + reach
        tick = np.array([[-0.6, -0.2], [0.0, 0.4], [1.0, -0.8]])
        out.append(np.array([px, py]) + reach * tick)
    return list(zip(out, widths, strict=False))


def ink_od(sc: Scene, colour: str, seed: int) -> np.ndarray:
    """Marker strokes of ``colour`` as an optical-density layer (float32 H × W × 3)."""
    rng = np.random.default_rng(seed + 2000)
    H, W = sc.alpha.shape
    ink = np.zeros((H, W, 3), np.float32)
    base = np.asarray(INK_OD[colour], np.float32)
    for pts, width in _strokes(sc, rng):
        canvas = np.zeros((H, W), np.uint8)
        cv2.polylines(canvas, [np.rint(pts).astype(np.int32)], False, 255, width, cv2.LINE_AA)
        profile = cv2.GaussianBlur(canvas.astype(np.float32) / 255, (0, 0), width / 8)
        opacity = rng.uniform(0.55, 1.0) * (1 + 0.25 * np.tanh(_smooth_field((H, W), 30.0, rng)))
        tint = base * rng.uniform(0.92, 1.08, 3).astype(np.float32)
        ink += (profile * np.minimum(opacity, 1.0))[..., None] * tint
    return ink


def grey16_via_slide(rgb_float: np.ndarray, path: Path) -> np.ndarray:
    """Luminance as a 16-bit single-channel tiled TIFF, read back through the slide layer (tiffslide)."""
    from wsikit.slide import open_slide

    lum = rgb_float @ np.array([0.299, 0.587, 0.114], np.float32)
    grey = np.clip(np.rint(lum * 257), 0, 65535).astype(np.uint16)
    res = 1e4 / SCENE_MPP  # pixels per cm
    tifffile.imwrite(path, grey, photometric="minisblack", tile=(256, 256), resolution=(res, res),
                     resolutionunit="CENTIMETER", metadata=None)  # fmt: skip
    with open_slide(path, backend="tiffslide") as slide:
        return slide.read_region((0, 0), 0, (grey.shape[1], grey.shape[0]))


def cases(data: Path, tmp: Path, shape: tuple[int, int], seeds: tuple[int, ...]) -> Iterator[Case]:
    """Every class on every seed's scene."""
    for seed in seeds:
        sc = scene(data, shape, seed)
        t, tissue = sc.od, sc.tissue
        he = sc.glass * np.power(10.0, -t)
        yield Case(f"he/{seed}", "H&E", render(sc.glass, t), tissue)
        yield Case(f"ihc/{seed}", "IHC", render(sc.glass, ihc_od(data, sc, seed)), tissue)
        yield Case(f"faint/{seed}", "faint", render(sc.glass, t * FAINT), tissue)
        yield Case(f"very-faint/{seed}", "very faint", render(sc.glass, t * VERY_FAINT), tissue)
        grey = np.clip(np.rint(he @ np.array([0.299, 0.587, 0.114], np.float32)), 0, 255).astype(np.uint8)
        yield Case(f"grey8/{seed}", "grey 8-bit", np.repeat(grey[..., None], 3, 2), tissue)
        yield Case(f"grey16/{seed}", "grey 16-bit", grey16_via_slide(he, tmp / f"grey16-{seed}.tif"), tissue)
        for colour in INK_OD:
            ink = ink_od(sc, colour, seed)
            visible = ink.sum(2) >= INK_VISIBLE
            rgb = render(sc.glass, t + ink)
            yield Case(
                f"pen-{colour}/{seed}", f"pen {colour}", rgb, tissue & ~visible, visible, tissue & visible
            )
