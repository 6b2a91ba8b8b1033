"""Compressed-tile access: a TIFF pyramid's own tiles, read with one ``pread`` and decoded directly.

When a tile lines up with a pyramid level's own tiles (same side, origin on the level's tile grid, no
resize) its compressed bytes are read at the offset tifffile lists for that tile (``page.dataoffsets`` /
``page.databytecounts``) and decoded by libjpeg-turbo — no OpenSlide cache, no region compositing. Which
tiles of a grid can be read this way, and the fallback to ``read_region`` for the rest, is
:class:`wsikit.tiles.TileSource`'s business.

JPEG tiles become self-contained streams (:func:`wsikit.decode.jpeg_stream`: ``JPEGTables`` spliced
in, RGB-encoded tiles marked with an Adobe APP14 marker), so libjpeg-turbo decoders give OpenSlide's
colours; a GPU decodes them in batches with nvJPEG. Other codecs (JPEG 2000, deflate, LZW, zstd,
WebP…) are decoded by tifffile's codec for the page. Semantics and measured exactness:
``docs/readers.md``.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsikit.decode import (
    DEFAULT_DECODER,
    PHOTOMETRIC_RGB,
    PHOTOMETRIC_YCBCR,
    decode_jpeg_cpu,
    jpeg_stream,
)

JPEG = 7
#: Decoded file tiles kept per open file for unaligned reads (64 × 256² RGB ≈ 12.6 MB per process).
CACHE_TILES = 64


class NativeError(ValueError):
    """The native reader cannot serve a request; the message says what to use instead."""


# -- the TIFF's levels -----------------------------------------------------------------------------------
@dataclass
class NativeLevel:
    """One pyramid level's tiles in the file."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    compression: int
    photometric: int
    jpegtables: bytes | None
    offsets: np.ndarray  # int64 (tiles,), row-major
    bytecounts: np.ndarray
    page: Any  # the tifffile page (its codec decodes non-JPEG tiles)

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_width)

    @property
    def is_jpeg(self) -> bool:
        return self.compression == JPEG and self.photometric in (PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR)

    def index(self, tx: int, ty: int) -> int:
        return ty * self.tiles_across + tx


def _tiff_levels(tif: Any) -> list[Any]:
    """tifffile pages of the main pyramid (SVS, generic tiled TIFF, OME-TIFF with SubIFDs), fine first."""
    series = tif.series[0]
    pages = []
    for level in series.levels:
        page = level.keyframe
        pages.append(page)
    return pages


def _level_info(page: Any) -> NativeLevel | None:
    if not page.is_tiled or page.planarconfig != 1 or page.samplesperpixel != 3 or page.tiledepth > 1:
        return None
    if np.dtype(page.dtype) != np.uint8:
        return None
    return NativeLevel(
        width=int(page.imagewidth),
        height=int(page.imagelength),
        tile_width=int(page.tilewidth),
        tile_height=int(page.tilelength),
        compression=int(page.compression),
        photometric=int(page.photometric),
        jpegtables=bytes(page.jpegtables) if page.jpegtables else None,
        offsets=np.asarray(page.dataoffsets, np.int64),
        bytecounts=np.asarray(page.databytecounts, np.int64),
        page=page,
    )


class NativeFile:
    """The compressed tiles of a slide file, indexed by the slide's level numbers.

    ``levels[L]`` is None where the file's level L cannot be served natively (not tiled, not 8-bit
    RGB, or tifffile's pyramid does not match the slide's level dimensions). Pickles as its path and
    reopens (one file handle per process, reads with ``os.pread``: thread-safe, no seek).
    """

    def __init__(self, path: str | os.PathLike, level_dimensions: Sequence[tuple[int, int]]) -> None:
        self.path = Path(path)
        self.level_dimensions = [tuple(int(v) for v in d) for d in level_dimensions]
        self._open()

    def _open(self) -> None:
        import tifffile

        self.levels: list[NativeLevel | None] = [None] * len(self.level_dimensions)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._tif = tifffile.TiffFile(self.path)
            pages = _tiff_levels(self._tif)
        except Exception:  # not a TIFF tifffile understands: nothing native, everything falls back
            self._tif, pages = None, []
        by_dims = {(int(p.imagewidth), int(p.imagelength)): p for p in pages if p.is_tiled}
        for lv, dims in enumerate(self.level_dimensions):
            page = by_dims.get(dims)
            if page is not None:
                self.levels[lv] = _level_info(page)
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        return {"path": self.path, "level_dimensions": self.level_dimensions}

    def __setstate__(self, state: dict) -> None:
        self.path, self.level_dimensions = state["path"], state["level_dimensions"]
        self._open()

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        if getattr(self, "_tif", None) is not None:
            self._tif.close()
            self._tif = None

    def raw(self, level: int, tx: int, ty: int) -> bytes:
        """The compressed bytes of the file's tile (tx, ty) at ``level``, as stored."""
        info = self.levels[level]
        if info is None:
            raise NativeError(f"{self.path}: level {level} has no native tiles")
        i = info.index(tx, ty)
        count = int(info.bytecounts[i])
        data = os.pread(self._fd, count, int(info.offsets[i]))
        if len(data) != count:
            raise NativeError(
                f"{self.path}: tile ({tx}, {ty}) of level {level} is truncated; the file is incomplete"
            )
        return data

    def stream(self, level: int, tx: int, ty: int) -> bytes:
        """A self-contained JPEG stream of a JPEG tile (see :func:`jpeg_stream`)."""
        info = self.levels[level]
        return jpeg_stream(self.raw(level, tx, ty), info.jpegtables, info.photometric)  # type: ignore[union-attr]

    def decode(self, level: int, tx: int, ty: int, decoder: str = DEFAULT_DECODER) -> np.ndarray:
        """The file's tile (tx, ty) at ``level`` as (tile_h, tile_w, 3) uint8 RGB."""
        info = self.levels[level]
        if info is not None and info.is_jpeg:
            return decode_jpeg_cpu(self.stream(level, tx, ty), decoder)
        data = self.raw(level, tx, ty)
        with self._lock:  # tifffile's page decoders are not documented as thread-safe
            arr = info.page.decode(data, info.index(tx, ty), jpegtables=info.jpegtables)[0]  # type: ignore[union-attr]
        return np.asarray(arr).reshape(info.tile_height, info.tile_width, -1)[..., :3]  # type: ignore[union-attr]

    def _cached(self, level: int, tx: int, ty: int, decoder: str) -> np.ndarray:
        """A decoded file tile, kept in a small LRU (unaligned neighbours share file tiles)."""
        key = (level, tx, ty)
        with self._lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
        tile = self.decode(level, tx, ty, decoder)
        with self._lock:
            self._cache[key] = tile
            while len(self._cache) > CACHE_TILES:
                self._cache.popitem(last=False)
        return tile

    def region(
        self, level: int, x: int, y: int, w: int, h: int, decoder: str = DEFAULT_DECODER
    ) -> np.ndarray:
        """Pixels [y, y+h) × [x, x+w) of ``level`` (inside the level), decoded from the file tiles
        that cover them and cropped — what OpenSlide's ``read_region`` returns at integer coordinates."""
        info = self.levels[level]
        if info is None:
            raise NativeError(f"{self.path}: level {level} has no native tiles")
        tw, th = info.tile_width, info.tile_height
        if x % tw == 0 and y % th == 0 and (w, h) == (tw, th):
            return self.decode(level, x // tw, y // th, decoder)
        out = np.empty((h, w, 3), np.uint8)
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                tile = self._cached(level, tx, ty, decoder)
                x0, y0 = max(x, tx * tw), max(y, ty * th)
                x1, y1 = min(x + w, (tx + 1) * tw), min(y + h, (ty + 1) * th)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[
                    y0 - ty * th : y1 - ty * th, x0 - tx * tw : x1 - tx * tw
                ]
        return out
