"""One slide reader over OpenSlide and tiffslide, with physical resolution (µm/px).

Resolution is always physical. Magnification, where a user gives it, is converted by the one
convention used everywhere in wsikit: ``mpp = 10 / magnification`` (20x = 0.5 µm/px). Nothing is
ever bucketed. A slide whose MPP cannot be trusted raises :class:`MPPError` naming the fix.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsikit.dicom import DicomError, series_volume
from wsikit.io import first_line
from wsikit.specs import MPP_TOLERANCE, mpp_to_mag, same_mpp
from wsikit.tiles import LevelChoice, choose_level, read_area, resize

Backend = Literal["auto", "openslide", "tiffslide"]

#: Plausible range for a microscopy MPP in µm/px; outside it a resolution tag is a default, not a scan.
MPP_PLAUSIBLE = (0.05, 20.0)
#: Longest plausible slide side in pixels (about 1 m at 0.25 µm/px); a header claiming more is damaged.
MAX_SIDE_PX = 2**22
#: Fewest file bytes per level-0 pixel of a scan over 1 Gpx: JPEG tissue takes ~0.5 B/px, so even a slide of
#: 1% tissue holds ~5e-3; a header claiming far more pixels than its bytes can hold is damaged or synthetic.
MIN_BYTES_PER_PX = 1e-4
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_TIFF_CHAIN_ERRORS = ("invalid page offset", "corrupted tag list", "invalid offset to page")
_UNIT_TO_UM = {"centimeter": 1e4, "cm": 1e4, "inch": 25400.0, "millimeter": 1e3, "mm": 1e3, "micrometer": 1.0}


class SlideError(RuntimeError):
    """A slide cannot be opened or read; the message names the file and the fix."""


class MPPError(SlideError):
    """A slide has no trustworthy physical resolution."""


def _plausible(mpp: float) -> bool:
    return MPP_PLAUSIBLE[0] <= mpp <= MPP_PLAUSIBLE[1]


def _float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _tiff_resolution_mpp(path: Path) -> tuple[float, float] | None:
    """MPP from TIFF XResolution/YResolution with their unit, or None when absent or not microscopy."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            xres, yres, unit = (tags.get(n) for n in ("XResolution", "YResolution", "ResolutionUnit"))
            if xres is None or yres is None or unit is None:
                return None
            unit_name = getattr(unit.value, "name", str(unit.value)).lower()
            factor = _UNIT_TO_UM.get(unit_name)
            if factor is None:
                return None
            px_per_unit = [
                v[0] / v[1] if isinstance(v, tuple) else float(v) for v in (xres.value, yres.value)
            ]
    except Exception:  # not a TIFF, or unreadable tags: simply no resolution from here
        return None
    if min(px_per_unit) <= 0:
        return None
    mpp = (factor / px_per_unit[0], factor / px_per_unit[1])
    return mpp if all(_plausible(m) for m in mpp) else None


class _Records(logging.Handler):
    """Collects log records (tifffile reports a broken page list only through its logger)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _tiff_damage(path: Path, size: int) -> str | None:
    """Why a TIFF-family file is unusable (cut short, or a header claiming more than it holds), else None.

    Checked before any reader opens the file: readers otherwise open a truncated slide and return blank
    tiles, or try to allocate whatever a damaged header claims. Files tifffile cannot parse are left to
    the readers' own errors.
    """
    import tifffile

    with open(path, "rb") as fh:
        if fh.read(4) not in _TIFF_MAGIC:
            return None
    log, records = logging.getLogger("tifffile"), _Records()
    log.addHandler(records)
    try:
        with tifffile.TiffFile(path) as tif:
            for i, page in enumerate(tif.pages):
                w, h = int(page.imagewidth), int(page.imagelength)
                if max(w, h) > MAX_SIDE_PX:
                    return f"page {i} claims {w}x{h} px, beyond any slide scanner; the header is damaged"
                offsets, counts = np.asarray(page.dataoffsets), np.asarray(page.databytecounts)
                needed = math.prod(int(c) for c in page.chunked)
                if offsets.size < needed:
                    return f"page {i} claims {w}x{h} px but holds {offsets.size} of its {needed} tiles; the header is damaged"
                if i == 0 and w * h > 2**30 and size / (w * h) < MIN_BYTES_PER_PX:
                    return (
                        f"claims {w}x{h} px ({w * h / 1e9:.1f} Gpx) in {size / 1e3:.0f} KB ({size / (w * h):.1g} "
                        "bytes/px, far below any scan); the header is damaged or the image is synthetic"
                    )
                end = int((offsets.astype(np.int64) + counts).max(initial=0))
                if end > size:
                    return (
                        f"truncated: page {i}'s pixel data runs to byte {end} but the file has {size} bytes"
                    )
    except Exception:  # not parseable as TIFF here: the readers report it
        return None
    finally:
        log.removeHandler(records)
    broken = [m for m in records.messages if any(e in m for e in _TIFF_CHAIN_ERRORS)]
    if broken:
        return f"truncated: its list of pages breaks off ({broken[0].split('> ')[-1]}, file of {size} bytes)"
    return None


class Slide:
    """An open whole-slide image. Use :func:`open_slide`; pickles as its path and reopens in workers."""

    def __init__(
        self,
        path: str | os.PathLike,
        backend: Backend = "auto",
        mpp: float | tuple[float, float] | None = None,
        slide_id: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.slide_id = slide_id or self.path.stem
        self._requested_backend = backend
        if mpp is not None:
            pair = (float(mpp), float(mpp)) if np.isscalar(mpp) else tuple(float(m) for m in mpp)
            if len(pair) != 2 or not all(_plausible(m) for m in pair):
                raise MPPError(f"{self.path}: mpp override {mpp!r} is outside {MPP_PLAUSIBLE} µm/px")
            self._mpp_override: tuple[float, float] | None = pair  # type: ignore[assignment]
        else:
            self._mpp_override = None
        self._open()

    # -- opening ---------------------------------------------------------------------------------------
    def _open(self) -> None:
        if self.path.is_dir():  # a DICOM-WSI series: OpenSlide opens it through one of its files
            try:
                self.path = series_volume(self.path)
            except DicomError as exc:
                raise SlideError(str(exc)) from exc
        path = self.path
        try:
            st = path.stat()
            size = st.st_size
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SlideError(f"{path}: symbolic link loop; point the link at the slide file") from exc
            if path.is_symlink():
                raise SlideError(
                    f"{path}: broken symbolic link to {os.readlink(path)}; point it at the slide file"
                ) from exc
            raise SlideError(f"{path}: no such file ({exc.strerror}); check the path") from exc
        if not stat.S_ISREG(st.st_mode):
            kind = (
                "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "device"
            )
            raise SlideError(f"{path}: not a regular file (a {kind}); give the slide file")
        if not os.access(path, os.R_OK):
            raise SlideError(f"{path}: not readable (permission denied); fix the file's permissions")
        if size == 0:
            raise SlideError(f"{path}: empty file (0 bytes); the copy is incomplete, copy the slide again")
        damage = _tiff_damage(path, size)
        if damage:
            raise SlideError(f"{path}: {damage}; copy the slide again (or re-export it)")
        order = ["openslide", "tiffslide"] if self._requested_backend == "auto" else [self._requested_backend]
        errors = []
        for name in order:
            try:
                self._handle = _OPENERS[name](path)
                self.backend = name
                break
            except Exception as exc:  # each backend raises its own types; collect and report them all
                errors.append(f"{name}: {first_line(exc)}")
        else:
            raise SlideError(
                f"{path}: cannot be opened as a slide ({'; '.join(errors)}); "
                f"check it is a complete whole-slide file ({size} bytes) in a format OpenSlide or tiffslide reads"
            )
        if max(self.dimensions) > MAX_SIDE_PX:
            self.close()
            raise SlideError(
                f"{path}: claims {self.dimensions[0]}x{self.dimensions[1]} px, beyond any slide scanner; "
                "the header is damaged, copy the slide again (or re-export it)"
            )
        self._mpp_source, self._mpp = self._find_mpp()

    def __getstate__(self) -> dict:
        return {
            "path": self.path,
            "backend": self.backend,
            "mpp": self._mpp_override,
            "slide_id": self.slide_id,
        }

    def __setstate__(self, state: dict) -> None:
        self.path, self.slide_id = state["path"], state["slide_id"]
        self._requested_backend, self._mpp_override = state["backend"], state["mpp"]
        self._open()

    def reopen(self, backend: Backend) -> Slide:
        """This slide opened with another reader (itself when it already uses ``backend``)."""
        if backend == self.backend:
            return self
        return Slide(self.path, backend=backend, mpp=self._mpp_override, slide_id=self.slide_id)

    def close(self) -> None:
        """Release the file handle."""
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.close()
            self._handle = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, backend={self.backend!r}, dimensions={self.dimensions})"

    # -- metadata --------------------------------------------------------------------------------------
    @property
    def properties(self) -> Mapping[str, Any]:
        return self._handle.properties

    @property
    def associated_images(self) -> Mapping[str, Any]:
        """Label, macro, thumbnail… as PIL images, read on access."""
        return self._handle.associated_images

    @property
    def vendor(self) -> str | None:
        return self.properties.get(f"{self.backend}.vendor")

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return tuple(self._handle.dimensions)  # type: ignore[return-value]

    @property
    def level_count(self) -> int:
        return self._handle.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(d) for d in self._handle.level_dimensions)  # type: ignore[misc]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._handle.level_downsamples)

    @property
    def objective_power(self) -> float | None:
        return _float(self.properties.get(f"{self.backend}.objective-power"))

    def _find_mpp(self) -> tuple[str | None, tuple[float, float] | None]:
        if self._mpp_override is not None:
            return "override", self._mpp_override
        props = self.properties
        pair = (_float(props.get(f"{self.backend}.mpp-x")), _float(props.get(f"{self.backend}.mpp-y")))
        if pair[0] and pair[1] and _plausible(pair[0]) and _plausible(pair[1]):
            return f"{self.backend}.mpp", pair  # type: ignore[return-value]
        aperio = _float(props.get("aperio.MPP"))
        if aperio and _plausible(aperio):
            return "aperio.MPP", (aperio, aperio)
        tiff = _tiff_resolution_mpp(self.path)
        if tiff is not None:
            return "tiff resolution", tiff
        return None, None

    @property
    def mpp_source(self) -> str | None:
        """Where the MPP came from (vendor property, TIFF tags, override), or None when unknown."""
        return self._mpp_source

    @property
    def has_mpp(self) -> bool:
        return self._mpp is not None

    @property
    def mpp(self) -> tuple[float, float]:
        """Level-0 (x, y) resolution in µm/px. Raises :class:`MPPError` when unknown."""
        if self._mpp is None:
            raise MPPError(
                f"{self.path}: no trustworthy MPP in the file (no vendor MPP, no microscopy resolution tags); "
                "pass mpp= (CLI: --slide-mpp, e.g. --slide-mpp 0.25) or add an 'mpp' column to the slide list"
            )
        return self._mpp

    @property
    def mpp0(self) -> float:
        """Level-0 resolution as one number (mean of x and y) in µm/px."""
        x, y = self.mpp
        return (x + y) / 2.0

    def level_mpp(self, level: int) -> float:
        return self.mpp0 * self.level_downsamples[level]

    # -- geometry --------------------------------------------------------------------------------------
    def level0_extent(self, size_px: int, mpp: float) -> int:
        """Side in level-0 pixels of ``size_px`` pixels at ``mpp`` (exactly ``size_px`` at level-0 MPP)."""
        ratio = mpp / self.mpp0
        return int(size_px) if same_mpp(mpp, self.mpp0) else round(size_px * ratio)

    def best_level(self, mpp: float, tol: float = MPP_TOLERANCE) -> LevelChoice:
        """The coarsest level not coarser than ``mpp`` (within ``tol``), and the resize scale from it."""
        return choose_level(self.level_downsamples, mpp / self.mpp0, tol)

    # -- pixels ----------------------------------------------------------------------------------------
    def read_region(self, xy_level0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size`` (w, h) pixels of ``level`` at level-0 ``xy``; RGB uint8, transparent areas white."""
        x, y = (int(v) for v in xy_level0)
        w, h = (int(v) for v in size)
        try:
            if self.backend == "tiffslide":
                arr = self._handle.read_region((x, y), level, (w, h), as_array=True)
            else:
                arr = np.asarray(self._handle.read_region((x, y), level, (w, h)))
        except Exception as exc:
            reason = first_line(exc)
            raise SlideError(
                f"{self.path}: failed to read {w}x{h} px at ({x}, {y}) level {level} ({reason}); "
                "the file may be damaged there, copy the slide again"
            ) from exc
        return _to_rgb(arr)

    def read_at_mpp(
        self, xy_level0: tuple[int, int], size_px: int | tuple[int, int], mpp: float
    ) -> np.ndarray:
        """Read a ``size_px`` tile at resolution ``mpp`` whose top-left is ``xy_level0``.

        Reads from the best pyramid level and resizes with antialiasing (:func:`wsikit.tiles.read_area`).
        """
        w, h = (size_px, size_px) if isinstance(size_px, int | np.integer) else size_px
        return read_area(self, xy_level0, (self.level0_extent(w, mpp), self.level0_extent(h, mpp)), (w, h))

    def thumbnail(self, max_side: int | None = 1024, mpp: float | None = None) -> np.ndarray:
        """Whole-slide RGB picture at ``mpp`` µm/px, or with its longer side ``max_side`` pixels.

        Reads the coarsest sufficient level in horizontal strips, so memory stays bounded on
        single-level slides.
        """
        W, H = self.dimensions
        if mpp is not None:
            factor = mpp / self.mpp0
        elif max_side is not None:
            factor = max(W, H) / max_side
        else:
            raise ValueError("thumbnail needs max_side or mpp")
        out_w, out_h = max(1, round(W / factor)), max(1, round(H / factor))
        level = choose_level(self.level_downsamples, factor).level
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        level_rows_per_strip = max(1, 2**22 // max(lw, 1))  # about 12 MB of RGB per strip
        out_rows_per_strip = max(1, level_rows_per_strip * out_h // lh)
        out = np.empty((out_h, out_w, 3), np.uint8)
        r0 = 0
        while r0 < out_h:
            r1 = min(out_h, r0 + out_rows_per_strip)
            ly0, ly1 = int(r0 * lh / out_h), min(lh, math.ceil(r1 * lh / out_h))
            strip = self.read_region((0, round(ly0 * ds)), level, (lw, max(1, ly1 - ly0)))
            out[r0:r1] = resize(strip, (out_w, r1 - r0))
            r0 = r1
        return out


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """RGBA/RGB/grey (8 or 16 bit) → RGB uint8, compositing transparent pixels on white."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] in (1, 2):  # grey, grey + alpha
        arr = arr[..., [0, 0, 0, 1][: arr.shape[2] + 2]]
    if arr.dtype == np.uint16:  # full 16-bit range onto 8 bits, as OpenSlide does
        arr = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4].astype(np.uint32)
        if alpha.min() == 255:
            return np.ascontiguousarray(arr[..., :3])
        rgb = arr[..., :3].astype(np.uint32)
        return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


def _open_openslide(path: Path):
    import openslide

    return openslide.OpenSlide(str(path))


def _open_tiffslide(path: Path):
    import tiffslide

    log, records = logging.getLogger("tifffile"), _Records()
    log.addHandler(records)  # tifffile logs a broken file to stderr before failing: its error is reported
    try:
        handle = tiffslide.TiffSlide(str(path))
        handle.dimensions  # noqa: B018 - forces the first page to be parsed so broken files fail here
    finally:
        log.removeHandler(records)
    return handle


_OPENERS = {"openslide": _open_openslide, "tiffslide": _open_tiffslide}


def open_slide(
    path: str | os.PathLike,
    backend: Backend = "auto",
    mpp: float | tuple[float, float] | None = None,
    slide_id: str | None = None,
) -> Slide:
    """Open a whole-slide image. ``auto`` tries OpenSlide, then tiffslide (OME-TIFF, plain tiled TIFF).

    ``mpp`` overrides the file's resolution (µm/px); ``slide.backend`` says which reader was used.
    Usable as a context manager.
    """
    if backend not in ("auto", "openslide", "tiffslide"):
        raise ValueError(f"unknown backend {backend!r}; use auto, openslide or tiffslide")
    return Slide(path, backend=backend, mpp=mpp, slide_id=slide_id)


def slide_facts(slide: Slide) -> dict[str, Any]:
    """A JSON-able summary of a slide (what ``wsikit info`` prints)."""
    return {
        "slide_id": slide.slide_id,
        "path": str(slide.path),
        "backend": slide.backend,
        "vendor": slide.vendor,
        "dimensions": list(slide.dimensions),
        "level_count": slide.level_count,
        "level_dimensions": [list(d) for d in slide.level_dimensions],
        "level_downsamples": [round(d, 4) for d in slide.level_downsamples],
        "mpp": list(slide.mpp) if slide.has_mpp else None,
        "mpp_source": slide.mpp_source,
        "magnification": round(mpp_to_mag(slide.mpp0), 2) if slide.has_mpp else None,
        "objective_power": slide.objective_power,
        "associated_images": sorted(slide.associated_images),
    }


def describe_slides(
    paths: Sequence[str | os.PathLike], backend: Backend = "auto", slide_mpp: float | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """:func:`slide_facts` of each slide that opens, and the one-line error of each that does not."""
    facts, errors = [], []
    for path in paths:
        try:
            with open_slide(path, backend=backend, mpp=slide_mpp) as slide:
                facts.append(slide_facts(slide))
        except SlideError as exc:
            errors.append(str(exc))
    return facts, errors


#: The real slide bundled with wsikit (CMU-1-Small-Region.svs, CC0), used by the demo and the tests.
SAMPLE_SLIDE = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"
