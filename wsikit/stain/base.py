"""The stain-normalizer interface shared by every method: batch handling, JSON save/load, the registry.

A normalizer maps a torch batch ``(B,3,H,W)`` (uint8 0–255, or float in [0, 1]) on any device to a batch of
the same shape, dtype and device. Tiles with too little tissue (below ``min_tissue``, as each method defines
tissue) pass through unchanged and are counted in ``normalizer.counts``; nothing returns NaN.

Each method estimates the *source* stains either per tile (``source="tile"``, batched) or once per slide
(``source="slide"``: ``normalizer.for_slide(sample_batch)`` returns a copy with the slide's source estimate,
applied to every tile). ``for_slide`` returns ``self`` for per-tile normalizers.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Union

import numpy as np
import torch

from wsikit.io import one_line, write_json

FORMAT = "wsikit-stain"
VERSION = 1
SOURCE_MODES = ("tile", "slide")

ImageLike = Union[np.ndarray, torch.Tensor, str, os.PathLike]  # noqa: UP007 (a runtime alias)


class StainError(ValueError):
    """Bad stain-normalization input or file; the message says what to do."""


@dataclass(frozen=True)
class Params:
    """Parameters every method has; subclasses add their own (all JSON-able scalars)."""

    min_tissue: float = 0.05  # fraction of a tile's pixels that must be tissue, else it passes through
    source: str = "tile"  # "tile": estimate the source per tile; "slide": once via for_slide(sample)
    tile_pixels: int = 16_384  # per-tile estimates use a regular subsample of this many pixels (0: all)

    def __post_init__(self) -> None:
        if self.source not in SOURCE_MODES:
            raise StainError(f"source={self.source!r}: use one of {', '.join(SOURCE_MODES)}")
        if not 0.0 <= self.min_tissue < 1.0:
            raise StainError(f"min_tissue={self.min_tissue}: use a fraction in [0, 1)")
        if self.tile_pixels < 0:
            raise StainError(f"tile_pixels={self.tile_pixels}: use 0 (all pixels) or a positive count")

    def subsample(self, x: torch.Tensor) -> torch.Tensor:
        """Every k-th pixel of (B,C,N) so that about ``tile_pixels`` remain (all when 0 or fewer)."""
        step = x.shape[-1] // self.tile_pixels if self.tile_pixels else 1
        return x[..., :: max(step, 1)]


# -- pixels in and out ---------------------------------------------------------------------------------
def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as (H,W,3) uint8 RGB (alpha composited on white)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im)
            return np.array(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise StainError(f"{path}: cannot read as an image ({exc}); pass a PNG/JPEG/TIFF RGB image") from exc


def as_batch(images: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A (B,3,H,W) or (3,H,W) tensor → (B,3,H,W) uint8 (as given) or float32 in 0–255; whether it was 3-D."""
    if not isinstance(images, torch.Tensor):
        raise StainError(
            f"expected a torch tensor (B,3,H,W), got {type(images).__name__}; use torch.as_tensor"
        )
    single = images.ndim == 3
    x = images.unsqueeze(0) if single else images
    if x.ndim != 4 or x.shape[1] != 3:
        raise StainError(f"expected a batch shaped (B,3,H,W) or (3,H,W), got {tuple(images.shape)}")
    if x.dtype == torch.uint8:
        return x, single
    if not x.is_floating_point():
        raise StainError(f"dtype {x.dtype} not supported: pass uint8 (0–255) or float (0–1)")
    if x.numel() and float(x.amax()) > 1.0 + 1e-3:
        raise StainError("float batches must be in [0, 1]; pass uint8 for 0–255 data or divide by 255")
    return x.float() * 255.0, single


def to_output(y: torch.Tensor, as_uint8: bool, gain: float = 1.0) -> torch.Tensor:
    """Float pixels ``gain``·y in 0–255 (y modified in place) → uint8 (rounded) or float32 in [0, 1]."""
    if as_uint8:
        half = torch.tensor(0.5, dtype=y.dtype, device=y.device)
        return torch.add(half, y, alpha=gain, out=y).clamp_(0.0, 255.0).to(torch.uint8)
    return y.mul_(gain / 255.0).clamp_(0.0, 1.0)


def quantize(y: torch.Tensor, as_uint8: bool) -> torch.Tensor:
    """Out-of-place ``to_output`` for fused (compiled) kernels."""
    if as_uint8:
        return (y + 0.5).clamp(0.0, 255.0).to(torch.uint8)
    return y.clamp(0.0, 255.0) / 255.0


CHUNK_PIXELS = 1 << 20  # pixels per transform call on CPU (16 tiles of 256²)
CACHE_ELEMS = 1 << 18  # float elements per CPU thread and chunk (a 256-px tile's channels): stays in L2


def chunk_size(x: torch.Tensor) -> int:
    """Tiles of x (B,C,N) to process at a time: a cache-sized chunk on CPU, the whole batch elsewhere."""
    if x.device.type != "cpu":
        return max(x.shape[0], 1)
    return max(1, CACHE_ELEMS * torch.get_num_threads() // max(x[0].numel(), 1))


def tile_chunks(x: torch.Tensor, skip: torch.Tensor) -> Iterator[slice]:
    """Cache-sized groups of the tiles of x (B,C,N) (:func:`chunk_size`) as slices; on CPU, groups whose
    tiles all pass through (``skip``, (B,) bool) are left out."""
    k = chunk_size(x)
    todo = (~skip).tolist() if x.device.type == "cpu" else [True] * x.shape[0]
    for s in range(0, x.shape[0], k):
        if any(todo[s : s + k]):
            yield slice(s, s + k)


def write_output(out: torch.Tensor, y: torch.Tensor) -> None:
    """Float pixels y ≥ 0 in 0–255 (modified in place) into ``out``: uint8 (rounded) or float in [0, 1]."""
    if out.dtype == torch.uint8:
        # y + 2²³ holds round(y) in its lowest mantissa bits, so its int32 bit pattern narrows to the
        # rounded byte: cheaper than converting float to uint8 (ties round to even)
        out.copy_(y.clamp_max_(255.0).add_(8388608.0).view(torch.int32))
    else:
        torch.clamp_max(y.mul_(1.0 / 255.0), 1.0, out=out)


_FUSED: dict[Callable, Callable] = {}


def fused(fn: Callable) -> Callable:
    """``torch.compile`` of a pixel kernel (dynamic shapes), built once per process."""
    if fn not in _FUSED:
        _FUSED[fn] = torch.compile(fn, dynamic=True)
    return _FUSED[fn]


_TABLES: dict[tuple[str, float, str], torch.Tensor] = {}


def lookup(
    x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], key: tuple[str, float]
) -> torch.Tensor:
    """``fn`` applied to pixel values x (0–255): a 256-entry table lookup for uint8, else computed."""
    if x.dtype != torch.uint8:
        return fn(x.float())
    k = (*key, str(x.device))
    if k not in _TABLES:
        _TABLES[k] = fn(torch.arange(256, dtype=torch.float32, device=x.device))
    return _TABLES[k].index_select(0, x.reshape(-1).int()).view(x.shape)


def pixels_of(images: ImageLike | Iterable[Any], device: str | torch.device | None = None) -> torch.Tensor:
    """One image or several (paths, HWC uint8 arrays, CHW/BCHW tensors) pooled as float (1,3,N) in 0–255."""
    items = [images] if _is_single(images) else list(images)  # type: ignore[arg-type]
    if not items:
        raise StainError("no images given; pass at least one target image")
    parts = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            item = load_image(item)
        if isinstance(item, np.ndarray):
            arr = item
            if arr.ndim != 3 or arr.shape[2] not in (3, 4):
                raise StainError(f"expected an (H,W,3) RGB array, got shape {arr.shape}")
            arr = arr[..., :3]
            if arr.dtype != np.uint8:
                if not np.issubdtype(arr.dtype, np.floating) or arr.max() > 1.0 + 1e-3:
                    raise StainError("numpy images must be uint8 (0–255) or float in [0, 1]")
                arr = np.rint(arr * 255.0).astype(np.uint8)
            item = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
        x, _ = as_batch(item if device is None else item.to(device))
        parts.append(x.float().permute(1, 0, 2, 3).reshape(3, -1))
    return torch.cat(parts, dim=1).unsqueeze(0)


def _is_single(images: Any) -> bool:
    return isinstance(images, (str, os.PathLike, np.ndarray, torch.Tensor))


# -- the interface ---------------------------------------------------------------------------------------
@dataclass
class Normalizer:
    """A fitted stain normalizer: ``normalizer(batch)`` → same shape, dtype and device.

    ``target`` (and ``source`` once estimated per slide) hold plain lists so the object saves as small JSON.
    """

    params: Params
    target: dict[str, Any]
    source: dict[str, Any] | None = None
    fitted_on: list[str] = field(default_factory=list)  # target image files, when fitted from files

    method: ClassVar[str] = ""
    params_type: ClassVar[type[Params]] = Params

    def __post_init__(self) -> None:
        self.counts = {"tiles": 0, "passed_through": 0}
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self.compiled = getattr(self, "compiled", False)

    # subclasses implement these two on pixels (B,3,N): uint8, or float in 0–255
    def estimate(self, x: torch.Tensor) -> dict[str, Any]:
        """Stain statistics of pooled pixels (1,3,N), as JSON-able lists (the ``target``/``source`` form)."""
        raise NotImplementedError

    def transform(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Normalize pixels x (B,3,N) into ``out`` (B,3,N): uint8, or float in [0, 1]. Returns (B,) bool:
        tiles to pass through (their ``out`` may be left unwritten; ``normalize`` copies them)."""
        raise NotImplementedError

    def chunk_pixels(self, x: torch.Tensor) -> int:
        """Pixels per ``transform`` call on CPU: a few tiles, so temporaries stay small, cached, and are not
        returned to the OS between calls."""
        return CHUNK_PIXELS

    def compile(self, enabled: bool = True) -> Normalizer:
        """Run the per-pixel work as one fused ``torch.compile`` kernel (faster, most for Vahadane).

        The first call compiles (seconds to a minute; cached on disk for later processes), so enable it for
        long runs such as feature extraction. If compilation fails, a warning is given and eager code runs.
        """
        self.compiled = enabled
        return self

    def kernel(
        self,
        eager: Callable[..., None],
        fast: Callable[..., torch.Tensor],
        x: torch.Tensor,
        out: torch.Tensor,
        skip: torch.Tensor,
        *args: Any,
    ) -> None:
        """Run a pixel kernel into ``out``: the fused form when ``compiled``, else the eager one (which
        leaves out cache-sized groups of tiles that all pass through, ``skip``)."""
        if self.compiled:
            try:
                out.copy_(fused(fast)(x, *args, out.dtype == torch.uint8))
                return
            except Exception as exc:  # compilers missing or failing must not stop a run
                import warnings

                warnings.warn(f"stain: torch.compile failed ({one_line(exc)}); running eager", stacklevel=3)
                self.compiled = False
        eager(x, out, skip, *args)

    # -- public API
    @classmethod
    def fit(cls, target_images: ImageLike | Iterable[Any], **params: Any) -> Normalizer:
        """Fit to one or more target images (their tissue pixels pooled)."""
        p = cls.params_type(**params)
        probe = cls(params=p, target={})
        items = [target_images] if _is_single(target_images) else list(target_images)  # type: ignore[arg-type]
        names = [str(Path(i).resolve()) for i in items if isinstance(i, (str, os.PathLike))]
        return cls(params=p, target=probe.estimate(pixels_of(items)), fitted_on=names)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.normalize(batch)[0]

    def normalize(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized batch and a (B,) bool tensor marking tiles passed through unchanged."""
        if self.params.source == "slide" and self.source is None:
            raise StainError(
                f"{self.method} with source='slide' needs the slide's stains first: "
                "call normalizer.for_slide(sample_tiles) and use what it returns"
            )
        x, single = as_batch(batch)
        b, _, h, w = x.shape
        if b == 0:
            return batch, torch.zeros(0, dtype=torch.bool, device=batch.device)
        step = max(1, self.chunk_pixels(x) // (h * w)) if x.device.type == "cpu" else b
        out = torch.empty(x.shape, dtype=batch.dtype, device=x.device)
        # kernels write uint8 or float32; other float types go through a float32 buffer
        work = out if out.dtype in (torch.uint8, torch.float32) else torch.empty(x.shape, device=x.device)
        given = batch.unsqueeze(0) if single else batch
        flags = []
        for s in range(0, b, step):
            n = min(step, b - s)
            oi = work[s : s + n]
            pi = self.transform(x[s : s + n].reshape(n, 3, h * w), oi.view(n, 3, h * w))
            if bool(pi.any()):  # tiles with too little tissue come back exactly as given
                idx = pi.nonzero().squeeze(1)
                if x.device.type == "cpu":  # tile by tile: memcpy speed, unlike uint8 index_copy_
                    for i in idx.tolist():
                        oi[i].copy_(given[s + i])
                else:
                    oi.index_copy_(0, idx, given[s : s + n].index_select(0, idx))
            flags.append(pi)
        passed = torch.cat(flags)
        if work is not out:
            out.copy_(work)
        self.counts["tiles"] += b
        self.counts["passed_through"] += int(passed.sum())
        return (out[0], passed[0]) if single else (out, passed)

    def for_slide(self, sample: torch.Tensor | Iterable[Any]) -> Normalizer:
        """Estimate the source stains once from a slide's sample of tissue tiles (``source="slide"``).

        Returns a copy holding the estimate; returns ``self`` for per-tile normalizers.
        """
        if self.params.source == "tile":
            return self
        x = pixels_of(sample if not isinstance(sample, torch.Tensor) else [sample])
        other = copy.copy(self)
        other.__post_init__()
        other.source = self.estimate(x)
        return other

    def describe(self) -> dict[str, Any]:
        """Everything that defines this normalizer, JSON-able (goes into feature bags' attrs)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "params": asdict(self.params),
            "target": self.target,
            "source": self.source,
            "fitted_on": self.fitted_on,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted normalizer as JSON (atomically); ``load_normalizer`` reads it back."""
        d = self.describe()
        d["source"] = None  # a per-slide estimate belongs to that slide, not to the shared target
        return write_json(path, d)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Normalizer:
        """``load_normalizer`` (any method from the base class; checks the method from a subclass)."""
        norm = load_normalizer(path)
        if cls is not Normalizer and not isinstance(norm, cls):
            raise StainError(f"{path}: holds a {norm.method} normalizer, not {cls.method}")
        return norm

    def tensor(self, name: str, device: torch.device, part: str = "target") -> torch.Tensor:
        """``target``/``source`` entry as a float32 tensor on ``device`` (cached)."""
        key = (f"{part}.{name}", str(device))
        if key not in self._cache:
            table = self.target if part == "target" else (self.source or {})
            self._cache[key] = torch.tensor(table[name], dtype=torch.float32, device=device)
        return self._cache[key]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state


REGISTRY: dict[str, type[Normalizer]] = {}


def register(cls: type[Normalizer]) -> type[Normalizer]:
    REGISTRY[cls.method] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(REGISTRY)


def normalizer_class(method: str) -> type[Normalizer]:
    try:
        return REGISTRY[method.lower()]
    except KeyError:
        raise StainError(f"unknown stain method {method!r}; use one of {', '.join(list_methods())}") from None


def fit_normalizer(method: str, target_images: ImageLike | Iterable[Any], **params: Any) -> Normalizer:
    """Fit ``method`` ("macenko", "vahadane", "reinhard") to target image(s): paths, HWC arrays or tensors."""
    cls = normalizer_class(method)
    try:
        return cls.fit(target_images, **params)
    except TypeError as exc:
        names = ", ".join(f.name for f in fields(cls.params_type))
        raise StainError(f"{method}: bad parameter ({exc}); parameters are {names}") from exc


def from_dict(d: dict[str, Any], origin: str = "<dict>") -> Normalizer:
    """A normalizer from ``describe()``'s dict (e.g. stored in a bag's attrs)."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise StainError(f"{origin}: not a wsikit stain file; write one with `wsikit stain fit`")
    if int(d.get("version", 0)) > VERSION:
        raise StainError(
            f"{origin}: stain file version {d['version']} is newer than this wsikit; upgrade wsikit"
        )
    cls = normalizer_class(str(d.get("method")))
    known = {f.name for f in fields(cls.params_type)}
    try:
        params = cls.params_type(**{k: v for k, v in d.get("params", {}).items() if k in known})
        norm = cls(params=params, target=dict(d["target"]), source=d.get("source"))
        norm.fitted_on = [str(f) for f in d.get("fitted_on", [])]
        norm.tensor(next(iter(norm.target)), torch.device("cpu"))  # the target must hold numbers
    except (KeyError, TypeError, ValueError, StopIteration) as exc:
        raise StainError(
            f"{origin}: damaged stain file ({exc!r}); fit it again with `wsikit stain fit`"
        ) from exc
    return norm


def load_normalizer(path: str | os.PathLike) -> Normalizer:
    """Read a normalizer written by ``Normalizer.save`` / ``wsikit stain fit``."""
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StainError(f"{path}: no such stain file; write one with `wsikit stain fit`") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise StainError(f"{path}: not valid JSON ({exc}); fit it again with `wsikit stain fit`") from exc
    return from_dict(d, str(path))
