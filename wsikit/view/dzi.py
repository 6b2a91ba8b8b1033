"""DeepZoom pyramid tiles read from a slide through :mod:`wsikit.slide`, JPEG-encoded and cached.

DeepZoom level ``L`` (0 … ``max_level``) is the slide at downsample ``2^(max_level - L)``, cut into
254-px tiles with a 1-px overlap (OpenSeadragon's layout). A tile is read from the coarsest slide level
not coarser than the DeepZoom level (as ``Slide.best_level`` chooses levels) and area-resized to size. On a
slide whose pyramid lacks coarse levels (a single-level TIFF), DeepZoom levels coarser than a base picture
of at most 4096 px a side are cut from that picture (read once, in strips, by ``Slide.thumbnail``) instead
of reading millions of level-0 pixels per tile. Encoded tiles are kept in a byte-bounded LRU cache shared
by all slides.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from wsikit.slide import SlideError, open_slide
from wsikit.specs import MPP_TOLERANCE
from wsikit.tiles import resize

TILE = 254
OVERLAP = 1
QUALITY = 85
BASE_SIDE = 4096  # longest side of the base picture coarse levels are cut from
MAX_READ_RATIO = 8  # read directly while a tile needs at most 8× its side of slide-level pixels (4 Mpx)


class TileCache:
    """A thread-safe LRU of encoded tiles bounded by total bytes."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return data

    def put(self, key: tuple, data: bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes and self._items:
                _, old = self._items.popitem(last=False)
                self.bytes -= len(old)


SHARED_CACHE = TileCache()


def encode_jpeg(rgb: np.ndarray, quality: int = QUALITY) -> bytes:
    import simplejpeg

    return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality, colorspace="RGB")


class DeepZoom:
    """One slide as a DeepZoom pyramid; ``tile(level, col, row)`` gives JPEG bytes."""

    def __init__(
        self,
        path: str | os.PathLike,
        key: str,
        mpp: float | None = None,
        slide_id: str | None = None,
        cache: TileCache = SHARED_CACHE,
    ) -> None:
        try:
            self.slide = open_slide(path, mpp=mpp, slide_id=slide_id)
        except SlideError as exc:
            raise SlideError(f"{exc} (pass --slides to point the viewer at the slide file)") from exc
        self.key, self.cache = key, cache
        self.width, self.height = self.slide.dimensions
        self.max_level = max(0, math.ceil(math.log2(max(self.width, self.height))))
        # OpenSlide reads concurrently; tiffslide's handle is guarded
        self._read_lock = threading.Lock() if self.slide.backend == "tiffslide" else None
        self._base: np.ndarray | None = None
        self._base_lock = threading.Lock()
        side = max(self.width, self.height)
        self.base_downsample = 2 ** max(0, math.ceil(math.log2(side / BASE_SIDE)))

    def descriptor(self) -> dict[str, Any]:
        """What OpenSeadragon needs: size, tile size, overlap, format and level range."""
        return {
            "width": self.width,
            "height": self.height,
            "tile_size": TILE,
            "overlap": OVERLAP,
            "format": "jpeg",
            "max_level": self.max_level,
            "mpp": self.slide.mpp0 if self.slide.has_mpp else None,
        }

    def dzi_xml(self) -> str:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="jpeg" Overlap="{OVERLAP}" '
            f'TileSize="{TILE}"><Size Width="{self.width}" Height="{self.height}"/></Image>\n'
        )

    def level_size(self, level: int) -> tuple[int, int]:
        d = 2 ** (self.max_level - level)
        return max(1, math.ceil(self.width / d)), max(1, math.ceil(self.height / d))

    def tile_count(self, level: int) -> tuple[int, int]:
        w, h = self.level_size(level)
        return math.ceil(w / TILE), math.ceil(h / TILE)

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """The tile's (x, y, w, h) in that level's pixels; ``KeyError`` outside the pyramid."""
        if not 0 <= level <= self.max_level:
            raise KeyError(level)
        cols, rows = self.tile_count(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise KeyError((col, row))
        w, h = self.level_size(level)
        x0, y0 = col * TILE - (OVERLAP if col else 0), row * TILE - (OVERLAP if row else 0)
        x1, y1 = min(w, (col + 1) * TILE + OVERLAP), min(h, (row + 1) * TILE + OVERLAP)
        return x0, y0, x1 - x0, y1 - y0

    def tile(self, level: int, col: int, row: int) -> bytes:
        """The tile's JPEG bytes (cached); ``KeyError`` for a tile outside the pyramid."""
        key = (id(self), level, col, row)
        data = self.cache.get(key)
        if data is None:
            data = encode_jpeg(self.pixels(level, col, row))
            self.cache.put(key, data)
        return data

    def pixels(self, level: int, col: int, row: int) -> np.ndarray:
        """The tile's RGB pixels (uncached)."""
        x, y, w, h = self.tile_box(level, col, row)
        d = 2 ** (self.max_level - level)
        downsamples = self.slide.level_downsamples
        lv = max(
            (i for i, ds in enumerate(downsamples) if ds <= d * (1 + MPP_TOLERANCE)),
            key=lambda i: downsamples[i],
            default=0,
        )
        ds = downsamples[lv]
        if d / ds > MAX_READ_RATIO and d >= self.base_downsample:
            return self._from_base(x * d, y * d, w * d, h * d, (w, h))
        x0, y0 = x * d, y * d
        # clip the level-0 extent to the slide: edge tiles are narrower than the tile side
        w0, h0 = min(w * d, self.width - x0), min(h * d, self.height - y0)
        size = (max(1, round(w0 / ds)), max(1, round(h0 / ds)))
        if self._read_lock is None:
            region = self.slide.read_region((x0, y0), lv, size)
        else:
            with self._read_lock:
                region = self.slide.read_region((x0, y0), lv, size)
        return resize(region, (w, h))

    def _from_base(self, x0: int, y0: int, w0: int, h0: int, out: tuple[int, int]) -> np.ndarray:
        with self._base_lock:
            if self._base is None:
                side = math.ceil(max(self.width, self.height) / self.base_downsample)
                self._base = self.slide.thumbnail(max_side=side)
        bh, bw = self._base.shape[:2]
        fx, fy = bw / self.width, bh / self.height
        crop = self._base[
            int(y0 * fy) : max(int(y0 * fy) + 1, math.ceil((y0 + h0) * fy)),
            int(x0 * fx) : max(int(x0 * fx) + 1, math.ceil((x0 + w0) * fx)),
        ]
        return resize(crop, out)

    @property
    def path(self) -> Path:
        return self.slide.path
