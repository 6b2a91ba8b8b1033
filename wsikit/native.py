"""Native tile reading: a grid's tiles straight from the TIFF's compressed tiles, decoded in batches.

When a tile lines up with a pyramid level's own tiles (same side, origin on the level's tile grid, no
resize) its compressed bytes are read with one ``pread`` at the offset tifffile lists for that tile
(``page.dataoffsets`` / ``page.databytecounts``) and decoded by libjpeg-turbo — no OpenSlide cache, no
region compositing. Everything else (unaligned specs, partial edge tiles, files tifffile cannot map to
the slide's levels) goes through the slide's ``read_region`` exactly as :func:`wsikit.tiling.read_tile`.

JPEG tiles become self-contained streams (:func:`wsikit.decode.jpeg_stream`: ``JPEGTables`` spliced
in, RGB-encoded tiles marked with an Adobe APP14 marker), so libjpeg-turbo decoders give OpenSlide's
colours; on a GPU, YCbCr tiles are shipped as bytes by DataLoader workers (:class:`TileItems`) and
decoded in batches by nvJPEG (:func:`assemble_batch`). Other codecs (JPEG 2000, deflate, LZW, zstd,
WebP…) are decoded by tifffile's codec for the page. Semantics and measured exactness:
``docs/readers.md``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsikit.decode import (
    CPU_DECODERS,
    DEFAULT_DECODER,
    PHOTOMETRIC_RGB,
    PHOTOMETRIC_YCBCR,
    decode_jpeg_batch,
    decode_jpeg_cpu,
    gpu_decode_error,
    jpeg_stream,
    resize_batch,
)
from wsikit.slide import Slide, resize

__all__ = [
    "CPU_DECODERS",
    "READERS",
    "NativeError",
    "NativeFile",
    "NativePlan",
    "TileBatch",
    "TileItems",
    "TileSource",
    "align_specs_to_native",
    "assemble_batch",
    "collate_items",
    "decode_jpeg_batch",
    "decode_jpeg_cpu",
    "gpu_decode_error",
    "jpeg_stream",
    "plan_native",
]

JPEG = 7
#: Decoded file tiles kept per open file for unaligned reads (64 × 256² RGB ≈ 12.6 MB per process).
CACHE_TILES = 64

Reader = Literal["auto", "native", "openslide", "tiffslide"]
READERS: tuple[str, ...] = ("auto", "native", "openslide", "tiffslide")


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


# -- matching a grid to the file's tiles ----------------------------------------------------------------
@dataclass(frozen=True)
class NativePlan:
    """How a grid's tiles are read: at ``level``, from ``xy`` (level pixels; -1: fall back)."""

    level: int
    side: int  # tile side at ``level`` (level pixels); the decoded tile is resized from it if needed
    downsample: int  # integer level downsample the grid geometry uses
    xy: np.ndarray  # int64 (N, 2) top-left in level pixels, -1 where the tile is read by read_region
    tile_size: tuple[int, int]  # the file's tile (width, height) at ``level`` (0, 0 if none)
    reason: str  # why tiles fall back ("" when all are native)

    @property
    def native(self) -> np.ndarray:
        """Tiles decoded from the file (cropped from the file tiles that cover them)."""
        return self.xy[:, 0] >= 0

    @property
    def whole(self) -> np.ndarray:
        """Tiles that are exactly one file tile (one decode, no crop; streamable to a GPU)."""
        tw, th = self.tile_size
        if (tw, th) != (self.side, self.side):
            return np.zeros(len(self.xy), bool)
        return self.native & (self.xy[:, 0] % tw == 0) & (self.xy[:, 1] % th == 0)

    @property
    def fraction(self) -> float:
        return float(self.native.mean()) if len(self.xy) else 0.0


def plan_native(
    slide: Slide, nfile: NativeFile | None, coords: np.ndarray, size_level0: int, out_size: int
) -> NativePlan:
    """Which tiles of a grid can be decoded from the file at the level :func:`read_tile` would read.

    That level's downsample must be an integer ``k`` (level dims = level-0 dims / k, rounded either
    way) with ``size_level0 = k × side``; then every tile whose level-0 origin is a multiple of ``k``
    and that lies inside the level is cut from the file tiles covering it (1 decode when it is exactly
    one file tile — what ``--align-native`` tiling gives — up to 4 or more otherwise). The rest fall
    back to ``read_region``.
    """
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    none = np.full((len(coords), 2), -1, np.int64)
    choice = slide.best_level(slide.mpp0 * size_level0 / out_size)
    level = choice.level
    side = max(1, round(size_level0 / choice.downsample))
    k = round(choice.downsample)
    info = nfile.levels[level] if nfile is not None else None
    tile = (info.tile_width, info.tile_height) if info is not None else (0, 0)

    def fallback(reason: str) -> NativePlan:
        return NativePlan(level, side, k, none, tile, reason)

    if info is None:
        return fallback(f"level {level} is not a tiled 8-bit RGB TIFF level tifffile maps to the slide")
    w0, h0 = slide.level_dimensions[0]
    if k < 1 or not (abs(info.width - w0 / k) < 1 and abs(info.height - h0 / k) < 1):
        return fallback(f"level {level} downsample {choice.downsample:g} is not an integer")
    if size_level0 != k * side:
        return fallback(f"the tile footprint ({size_level0} px) is not {k} × a whole number of level pixels")
    xy = coords // k
    ok = (coords % k == 0).all(axis=1) & (xy >= 0).all(axis=1)
    ok &= (xy[:, 0] + side <= info.width) & (xy[:, 1] + side <= info.height)
    reason = "" if ok.all() else f"{int((~ok).sum())} tile(s) off the level's pixel grid or past its edge"
    return NativePlan(level, side, k, np.where(ok[:, None], xy, -1), tile, reason)


# -- a grid's tile source --------------------------------------------------------------------------------
def _backend_slide(slide: Slide, reader: str) -> Slide:
    if reader in ("openslide", "tiffslide") and slide.backend != reader:
        from wsikit.slide import open_slide

        return open_slide(slide.path, backend=reader, mpp=slide._mpp_override, slide_id=slide.slide_id)  # type: ignore[arg-type]
    return slide


class TileSource:
    """A grid's tiles as ``out_size``² RGB uint8: native where aligned, ``read_region`` elsewhere.

    ``reader``: ``native`` and ``auto`` read aligned tiles natively (``auto`` is the fastest exact
    path: native where a tile coincides with a file tile, the slide's backend otherwise; ``native``
    additionally refuses grids with no native tile at all); ``openslide`` / ``tiffslide`` always use
    that backend's ``read_region``. Pickles (slide and file reopen in each DataLoader worker).
    """

    def __init__(
        self,
        slide: Slide,
        coords: np.ndarray,
        size_level0: int,
        out_size: int,
        reader: str = "auto",
        decoder: str = DEFAULT_DECODER,
    ) -> None:
        if reader not in READERS:
            raise NativeError(f"--reader {reader!r}: use one of {', '.join(READERS)}")
        self.reader = reader
        self.slide = _backend_slide(slide, reader)
        self.coords = np.asarray(coords, np.int64).reshape(-1, 2)
        self.size_level0 = int(size_level0)
        self.out_size = int(out_size)
        self.decoder = decoder
        self.file: NativeFile | None = None
        if reader in ("auto", "native"):
            try:
                self.file = NativeFile(self.slide.path, self.slide.level_dimensions)
            except OSError:
                self.file = None
        self.plan = plan_native(self.slide, self.file, self.coords, self.size_level0, self.out_size)
        self._whole = self.plan.whole
        if reader == "native" and len(self.coords) and not self.plan.native.any():
            raise NativeError(
                f"{self.slide.path}: --reader native but no tile is native ({self.plan.reason}); "
                "use --reader auto"
            )

    def __len__(self) -> int:
        return len(self.coords)

    def is_native(self, i: int) -> bool:
        return bool(self.plan.xy[i, 0] >= 0)

    @property
    def gpu_decodable(self) -> bool:
        """Whether native tiles are YCbCr JPEG, which nvJPEG decodes (RGB-encoded JPEG it decodes
        with wrong colours: those tiles are decoded on the CPU)."""
        info = self.file.levels[self.plan.level] if self.file is not None else None
        return self.jpeg_native and info.photometric == PHOTOMETRIC_YCBCR  # type: ignore[union-attr]

    @property
    def jpeg_native(self) -> bool:
        """Whether native tiles are JPEG (then :meth:`stream` gives bytes a GPU can decode)."""
        info = self.file.levels[self.plan.level] if self.file is not None else None
        return bool(info is not None and info.is_jpeg and self.plan.whole.any())

    def stream(self, i: int) -> bytes | None:
        """Tile ``i`` as a self-contained JPEG stream, or None unless it is exactly one JPEG file tile."""
        if not (self.jpeg_native and self._whole[i]):
            return None
        tx, ty = (int(v) for v in self.plan.xy[i] // self.plan.side)
        return self.file.stream(self.plan.level, tx, ty)  # type: ignore[union-attr]

    def read(self, i: int) -> np.ndarray:
        """Tile ``i`` as (out_size, out_size, 3) uint8 RGB (same pixels as :func:`read_tile`)."""
        if self.is_native(i):
            x, y = (int(v) for v in self.plan.xy[i])
            side = self.plan.side
            tile = self.file.region(self.plan.level, x, y, side, side, self.decoder)  # type: ignore[union-attr]
            return resize(tile, (self.out_size, self.out_size))
        from wsikit.tiling import read_tile

        x, y = (int(v) for v in self.coords[i])
        return read_tile(self.slide, (x, y), self.size_level0, self.out_size)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (stored with bags): reader, level, native fraction, fallback reason."""
        return {
            "reader": self.reader,
            "backend": self.slide.backend,
            "level": self.plan.level,
            "native_fraction": round(self.plan.fraction, 4) if self.file is not None else 0.0,
            "whole_tile_fraction": round(float(self._whole.mean()), 4) if len(self._whole) else 0.0,
            "fallback_reason": self.plan.reason if self.file is not None else "reader is not native",
            "decoder": self.decoder,
        }

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# -- DataLoader items: pixels, or bytes for the GPU ----------------------------------------------------
class TileItems:
    """Map-style dataset over a :class:`TileSource`; items are ``(payload, index, error)``.

    ``payload`` is the tile's (out, out, 3) uint8 pixels, or — with ``ship_streams``, for sources whose
    native tiles a GPU decodes right (:attr:`TileSource.gpu_decodable`) — the native JPEG tile's
    self-contained stream (bytes), so DataLoader workers only read and the GPU decodes
    (:func:`assemble_batch`). A tile that fails to read gives ``None`` and its one-line error; the
    source is reopened, since some readers refuse every later read after a decode error.
    """

    def __init__(self, source: TileSource, ship_streams: bool = False) -> None:
        self.source = source
        self.ship_streams = ship_streams and source.gpu_decodable

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[np.ndarray | bytes | None, int, str]:
        try:
            stream = self.source.stream(i) if self.ship_streams else None
            return (stream if stream is not None else self.source.read(i)), i, ""
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            with contextlib.suppress(Exception):  # the error above is what the caller records
                self.reopen()
            return None, i, error

    def reopen(self) -> None:
        """A fresh handle on slide and file (call in each worker: never share file state)."""
        import pickle

        self.source.close()
        self.source = pickle.loads(pickle.dumps(self.source))


@dataclass
class TileBatch:
    """A collated batch: decoded tiles stacked in one uint8 tensor (it crosses from DataLoader workers
    through shared memory, not a pipe), JPEG streams as bytes, and where each sits in the batch."""

    size: int
    pixels: Any = None  # torch uint8 (M, out, out, 3) or None
    pixel_pos: list[int] = field(default_factory=list)
    streams: list[bytes] = field(default_factory=list)
    stream_pos: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return self.size

    def pin_memory(self) -> TileBatch:
        """Called by a DataLoader with ``pin_memory=True``: page-locks the decoded pixels."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def collate_items(items: list[tuple[Any, int, str]]) -> tuple[TileBatch, Any, list[str]]:
    """:class:`TileBatch` of the payloads, indices as an int64 tensor, the error texts."""
    import torch

    batch = TileBatch(len(items))
    arrays = []
    for k, (payload, _, _) in enumerate(items):
        if isinstance(payload, bytes | bytearray):
            batch.streams.append(bytes(payload))
            batch.stream_pos.append(k)
        elif payload is not None:
            arrays.append(payload)
            batch.pixel_pos.append(k)
    if arrays:
        batch.pixels = torch.from_numpy(np.stack(arrays))
    index = torch.tensor([it[1] for it in items], dtype=torch.int64)
    return batch, index, [it[2] for it in items]


def assemble_batch(batch: TileBatch, out_size: int, device: Any = "cpu", decoder: str = DEFAULT_DECODER):
    """A (B, out, out, 3) uint8 tensor on ``device`` from a :class:`TileBatch`.

    JPEG streams are decoded together by :func:`decode_jpeg_batch` (nvJPEG on a GPU) and resized on
    the device when the tile side differs from ``out_size`` (area averaging equal to the CPU path's up
    to rounding, ±1); failed tiles are zeros.
    """
    import torch

    device = torch.device(device)
    if batch.pixels is not None and len(batch.pixel_pos) == batch.size:
        return batch.pixels.to(device, non_blocking=True)
    out = torch.zeros((batch.size, out_size, out_size, 3), dtype=torch.uint8, device=device)
    if batch.streams:
        decoded = decode_jpeg_batch(batch.streams, device, decoder)
        out[batch.stream_pos] = resize_batch(decoded, out_size)
    if batch.pixels is not None:
        out[batch.pixel_pos] = batch.pixels.to(device)
    return out


# -- tiling on the file's own tile grid ------------------------------------------------------------------
def native_level(slide: Slide, mpp: float) -> tuple[int, int] | None:
    """(level, integer downsample k) of a level within 5% of ``mpp`` whose dims are level 0's / k."""
    from wsikit.slide import same_mpp

    w0, h0 = slide.level_dimensions[0]
    for level, (w, h) in enumerate(slide.level_dimensions):
        k = round(slide.level_downsamples[level])
        if k >= 1 and abs(w - w0 / k) < 1 and abs(h - h0 / k) < 1 and same_mpp(slide.mpp0 * k, mpp):
            return level, k
    return None


def align_specs_to_native(slide: Slide, specs: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """Specs whose tiles coincide with the file's own tiles (same side, aligned origin, no resize).

    Each spec resolving to a stored level with an integer downsample ``k`` becomes that level's tile
    side with no overlap; its MPP stays the requested one when the level-0 footprint is still exactly
    ``k × side`` (otherwise it becomes the level's MPP, rounded to 4 decimals). Specs with no such level,
    or levels without square tiles, are kept. Returns the specs and one note per change or miss.
    """
    from wsikit.tiling import TileSpec

    nfile = NativeFile(slide.path, slide.level_dimensions)
    try:
        out, notes = [], []
        for spec in specs:
            found = native_level(slide, spec.mpp)
            info = nfile.levels[found[0]] if found else None
            if found is None or info is None or info.tile_width != info.tile_height:
                out.append(spec)
                why = "no stored level at this resolution" if found is None else "no square file tiles there"
                notes.append(
                    f"--align-native: {spec.name} kept ({why}); its tiles are read through read_region"
                )
                continue
            level, k = found
            side = info.tile_width
            exact = k == 1 or round(side * spec.mpp / slide.mpp0) == side * k
            mpp = spec.mpp if exact else round(slide.mpp0 * k, 4)
            new = TileSpec(mpp, side, 0)
            if new != spec:
                notes.append(
                    f"--align-native: {spec.name} → {new.name} (the file's {side}-px tiles at level {level})"
                )
            out.append(new)
        return out, notes
    finally:
        nfile.close()
