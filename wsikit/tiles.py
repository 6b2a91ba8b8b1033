"""Reading tiles: the one level-0 footprint → pyramid level → resize rule, a grid's tile source (native
compressed tiles where exact, the slide's ``read_region`` elsewhere) and DataLoader batching.

Every read of a square tile in wsikit — tiling's tile images, extraction, stain samples, heatmap montages,
:meth:`wsikit.slide.Slide.read_at_mpp` — goes through :func:`read_area`: the coarsest pyramid level whose
downsample is not coarser than the tile's (within :data:`MPP_TOLERANCE`), read once, then resized with area
averaging. :class:`TileSource` reads a grid's tiles with the same pixels, straight from the file's
compressed tiles where a tile coincides with them (``wsikit.native``, ``docs/readers.md``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from wsikit.decode import DEFAULT_DECODER, PHOTOMETRIC_YCBCR, decode_jpeg_batch, resize_batch
from wsikit.io import one_line
from wsikit.native import NativeError, NativeFile
from wsikit.settings import READERS
from wsikit.specs import MPP_TOLERANCE

if TYPE_CHECKING:
    from wsikit.slide import Slide


# -- the one level rule ------------------------------------------------------------------------------------
def resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, C) uint8 image to ``size`` (w, h): area averaging down, bilinear up."""
    w, h = size
    if img.shape[1] == w and img.shape[0] == h:
        return img
    shrinking = w < img.shape[1] or h < img.shape[0]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


@dataclass(frozen=True)
class LevelChoice:
    """The pyramid level to read for a target downsample and the scale from that level to the target."""

    level: int
    downsample: float
    scale: float  # level pixels per target pixel (1.0 = no resize)


def choose_level(downsamples: Sequence[float], target: float, tol: float = MPP_TOLERANCE) -> LevelChoice:
    """The coarsest level whose downsample is not coarser than ``target`` (within ``tol``; a target within
    ``tol`` of 1 is level 0 itself), and the resize scale from it (1.0 when within ``tol``)."""
    target = 1.0 if abs(target - 1.0) <= tol else target
    best = 0
    for level, ds in enumerate(downsamples):
        if ds <= target * (1.0 + tol) and ds >= downsamples[best]:
            best = level
    scale = target / downsamples[best]
    return LevelChoice(best, downsamples[best], 1.0 if abs(scale - 1.0) <= tol else scale)


def tile_level(slide: Slide, size_level0: int, out_size: int) -> tuple[LevelChoice, int]:
    """Level to read a square of ``size_level0`` level-0 px shown at ``out_size`` px, and its side there."""
    choice = choose_level(slide.level_downsamples, size_level0 / out_size)
    return choice, max(1, round(size_level0 / choice.downsample))


def read_area(
    slide: Slide, xy: tuple[int, int], size_level0: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    """The (h, w, 3) RGB picture of the level-0 rectangle ``size_level0`` (w, h) at ``xy``, at ``size``.

    Reads the coarsest sufficient level (:func:`choose_level`), then resizes with area averaging; with a
    grid's ``size_level0`` the pixels match the coordinates exactly. Needs no MPP.
    """
    (w0, h0), (w, h) = size_level0, size
    choice = choose_level(slide.level_downsamples, max(w0 / w, h0 / h))
    side = (max(1, round(w0 / choice.downsample)), max(1, round(h0 / choice.downsample)))
    region = slide.read_region((int(xy[0]), int(xy[1])), choice.level, side)
    return resize(region, (w, h))


def read_tile(slide: Slide, xy: tuple[int, int], size_level0: int, size: int) -> np.ndarray:
    """The ``size``×``size`` RGB tile whose level-0 footprint is the ``size_level0`` square at ``xy``."""
    return read_area(slide, xy, (size_level0, size_level0), (size, size))


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
    choice, side = tile_level(slide, size_level0, out_size)
    level = choice.level
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
        self.slide = slide.reopen(reader) if reader in ("openslide", "tiffslide") else slide
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
            error = one_line(exc)
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
