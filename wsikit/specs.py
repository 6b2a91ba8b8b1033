"""Tile specs and physical units: what a tile is (resolution, side, overlap), how magnification converts to
µm/px, and how several specs' grids nest on a slide in level-0 pixels. Pure Python: settings and the
command line use it without loading numpy or the readers.

Magnification, where a user gives it, is converted by the one convention used everywhere in wsikit:
``mpp = 10 / magnification`` (20x = 0.5 µm/px), never bucketed. Level-0 geometry of a spec on a slide
of ``slide_mpp`` µm/px (the rules, and how aligned grids nest: :mod:`wsikit.tiling`)::

    size_level0    = size                          when the spec MPP is within 5% of the slide MPP,
                     round(size * mpp / slide_mpp) otherwise
    overlap_level0 = round(overlap * size_level0 / size)
    stride_level0  = size_level0 - overlap_level0
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

#: Relative tolerance within which two resolutions count as the same (0.499 vs 0.5 µm/px).
MPP_TOLERANCE = 0.05
#: Target resolutions a tile spec accepts, µm/px (the slide layer's plausible range: 200x … 0.5x).
TARGET_MPP_RANGE = (0.05, 20.0)


class TilingError(ValueError):
    """Impossible tiling request or unreadable coordinates file; the message says what to change."""


def mag_to_mpp(magnification: float) -> float:
    """Convert an objective magnification to µm/px by wsikit's convention (10 / magnification)."""
    if not magnification > 0:
        raise TilingError(f"magnification must be > 0 (e.g. 20 for 0.5 µm/px), got {magnification:g}")
    return 10.0 / magnification


def mpp_to_mag(mpp: float) -> float:
    """Inverse of :func:`mag_to_mpp`: the nominal magnification of a resolution (10 / mpp)."""
    return 10.0 / mpp


def same_mpp(a: float, b: float, tol: float = MPP_TOLERANCE) -> bool:
    """True when two resolutions differ by less than ``tol`` (relative)."""
    return abs(a / b - 1.0) <= tol


#: ``mpp<µm/px>_<size>px_<overlap>ov``; the MPP has 2–4 decimals (0.5 → ``0.50``, 0.499 → ``0.499``).
SPEC_NAME_RE = re.compile(r"^mpp(\d+\.\d{2,4})_(\d+)px_(\d+)ov$")


def _fmt_mpp(mpp: float) -> str:
    text = f"{mpp:.4f}".rstrip("0")
    whole, frac = text.split(".")
    return f"{whole}.{frac.ljust(2, '0')}"


@dataclass(frozen=True)
class TileSpec:
    """A tile's physical definition: ``mpp`` µm/px, ``size`` px side, ``overlap`` px (both at ``mpp``)."""

    mpp: float
    size: int = 256
    overlap: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise TilingError(f"tile spec: mpp must be a positive number of µm/px, got {self.mpp:g}")
        lo, hi = TARGET_MPP_RANGE
        if not lo <= self.mpp <= hi:  # checked before rounding, so the message shows what was given
            raise TilingError(
                f"tile spec: {self.mpp:g} µm/px is outside {lo:g}–{hi:g} µm/px (0.25 ≈ 40x, 0.5 ≈ 20x, 1.0 ≈ 10x)"
            )
        if int(self.size) != self.size or self.size < 1:
            raise TilingError(f"tile spec: size must be a positive integer (px), got {self.size!r}")
        if int(self.overlap) != self.overlap or not 0 <= self.overlap < self.size:
            raise TilingError(f"tile spec: overlap must be an integer in [0, size), got {self.overlap!r}")
        # normalise so equal specs compare (and name) equal
        object.__setattr__(self, "mpp", float(round(self.mpp, 4)))
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "overlap", int(self.overlap))

    @classmethod
    def from_mag(cls, mag: float, size: int = 256, overlap: int = 0) -> TileSpec:
        """Spec at magnification ``mag`` by wsikit's convention ``mpp = 10 / mag`` (never bucketed)."""
        return cls(mag_to_mpp(mag), size, overlap)

    @classmethod
    def from_name(cls, name: str) -> TileSpec:
        """Inverse of :attr:`name`."""
        match = SPEC_NAME_RE.match(name)
        if not match:
            raise TilingError(f"{name!r} is not a tile spec name (expected e.g. mpp0.50_256px_0ov)")
        return cls(float(match[1]), int(match[2]), int(match[3]))

    @property
    def name(self) -> str:
        """Stable, filesystem-safe name, e.g. ``mpp0.50_256px_0ov`` (resolution, size, overlap)."""
        return f"mpp{_fmt_mpp(self.mpp)}_{self.size}px_{self.overlap}ov"

    @property
    def stride(self) -> int:
        """Step between tiles in pixels at the spec's resolution."""
        return self.size - self.overlap

    @property
    def magnification(self) -> float:
        return mpp_to_mag(self.mpp)


def parse_spec(text: str, size: int = 256, overlap: int = 0) -> TileSpec:
    """Parse ``20x``, ``20x/256``, ``20x/256/32``, ``0.5/224``, ``mpp0.50_256px_0ov`` into a spec.

    A trailing ``x`` means magnification (converted by ``mpp = 10 / mag``), otherwise µm/px;
    missing size / overlap default to ``size`` / ``overlap``.
    """
    text = text.strip()
    if SPEC_NAME_RE.match(text):
        return TileSpec.from_name(text)
    parts = text.split("/")
    try:
        res = parts[0].strip().lower()
        size_ = int(parts[1]) if len(parts) > 1 and parts[1] else size
        overlap_ = int(parts[2]) if len(parts) > 2 and parts[2] else overlap
        if len(parts) > 3:
            raise ValueError
        if res.endswith("x"):
            return TileSpec.from_mag(float(res[:-1]), size_, overlap_)
        return TileSpec(float(res.removeprefix("mpp")), size_, overlap_)
    except ValueError as exc:
        if isinstance(exc, TilingError):
            raise TilingError(f"tile spec {text!r}: {str(exc).removeprefix('tile spec: ')}") from exc
        raise TilingError(
            f"tile spec {text!r}: expected RESOLUTION[/SIZE[/OVERLAP]], e.g. 20x/256/0 or 0.5/224"
        ) from exc


def spec_key(spec: TileSpec) -> tuple[float, float, float]:
    """How specs sort everywhere, fine → coarse: physical tile extent (µm), then stride, then MPP."""
    return (spec.size * spec.mpp, spec.stride * spec.mpp, spec.mpp)


def order_specs(specs: list[TileSpec]) -> list[TileSpec]:
    """Specs fine → coarse (:func:`spec_key`); duplicates removed."""
    unique = {s.name: s for s in specs}
    return sorted(unique.values(), key=spec_key)


# -- level-0 geometry --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """A grid's level-0 geometry: tile side and stride (the overlap is their difference)."""

    size_level0: int
    stride_level0: int

    @property
    def overlap_level0(self) -> int:
        return self.size_level0 - self.stride_level0

    def shape(self, dims: tuple[int, int]) -> tuple[int, int]:
        """(columns, rows) of tiles that fit inside a ``dims`` = (W, H) level-0 slide."""
        return tuple(  # type: ignore[return-value]
            (d - self.size_level0) // self.stride_level0 + 1 if d >= self.size_level0 else 0 for d in dims
        )


def nominal_layout(spec: TileSpec, slide_mpp: float) -> Layout:
    """A spec's level-0 geometry on a slide of ``slide_mpp`` µm/px (see the module docstring)."""
    size_level0 = (
        spec.size if same_mpp(spec.mpp, slide_mpp) else max(1, round(spec.size * spec.mpp / slide_mpp))
    )
    overlap_level0 = min(size_level0 - 1, round(spec.overlap * size_level0 / spec.size))
    return Layout(size_level0, size_level0 - overlap_level0)


def aligned_layouts(specs: list[TileSpec], slide_mpp: float, align: bool = True) -> list[Layout]:
    """Level-0 layouts of ``specs`` (ordered fine → coarse); with ``align`` each nests in the next.

    Raises :class:`TilingError` when a coarser stride is not within 5% of a multiple of the finer one,
    or a coarser spec overlaps less than a finer one (then a fine tile could straddle two coarse tiles).
    """
    layouts = [nominal_layout(s, slide_mpp) for s in specs]
    if not align:
        return layouts
    for i in range(1, len(specs)):
        fine, nominal = layouts[i - 1], layouts[i]
        ratio = specs[i].stride * specs[i].mpp / (specs[i - 1].stride * specs[i - 1].mpp)  # physical
        m = max(1, round(ratio))
        stride_level0 = m * fine.stride_level0
        if not same_mpp(m, ratio):
            raise TilingError(
                f"cannot nest {specs[i - 1].name} in {specs[i].name}: the coarse stride "
                f"({nominal.stride_level0} level-0 px) is not a multiple of the fine one ({fine.stride_level0}); "
                "use sizes/resolutions with integer ratios (e.g. 20x, 10x, 5x at 256 px) or --no-align"
            )
        if nominal.overlap_level0 < fine.overlap_level0:
            need = math.ceil(fine.overlap_level0 * specs[i].size / nominal.size_level0)
            raise TilingError(
                f"cannot nest {specs[i - 1].name} in {specs[i].name}: a coarser grid needs at least the "
                f"finer grid's overlap ({fine.overlap_level0} level-0 px); give {specs[i].name} an overlap of "
                f">= {need} px, or pass --no-align"
            )
        layouts[i] = Layout(stride_level0 + nominal.overlap_level0, stride_level0)
    return layouts
