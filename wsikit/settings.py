"""Every stage's settings as dataclasses: what a config file's sections and the CLI's options build.

``wsikit run CONFIG`` reads one YAML file with the sections ``tile`` (:class:`TileConfig`), ``extract``
(:class:`ExtractConfig`), ``heatmap`` (:class:`HeatmapConfig`) and ``slide_mpp``; each command's
``--config`` reads its own section. :mod:`wsikit.config` validates the YAML into these classes, refusing
unknown keys by name, so a config file and a Python call never drift apart. Nothing here loads torch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wsikit.config import ConfigError, build, fingerprint, load_yaml, merge
from wsikit.images.settings import ModelConfig as ImageModelConfig
from wsikit.images.settings import TrainConfig as ImageTrainConfig
from wsikit.io import jsonable
from wsikit.specs import TileSpec, TilingError, aligned_layouts, order_specs, parse_spec


class SettingsError(ValueError):
    """Settings that cannot work together; the message names the option to change."""


class MaskError(ValueError):
    """Bad mask settings or an unreadable GeoJSON mask; the message names the file and the fix."""


#: Tissue-mask methods (implemented in :mod:`wsikit.tissue`) and tile readers (:mod:`wsikit.tiles`).
MASK_METHODS = ("od", "otsu")
READERS = ("auto", "native", "openslide", "tiffslide")
#: Where JPEG tiles are decoded during extraction: measured (auto), CPU reading workers, or the GPU (nvJPEG).
DECODES = ("auto", "cpu", "gpu")
#: Mask settings whose default depends on the method (``None`` in :class:`MaskParams`: the method's).
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "od": {"close_um": 64.0, "pen_min_um2": 20_000.0},
    "otsu": {"close_um": 32.0, "pen_min_um2": 40_000.0},
}


@dataclass(frozen=True)
class MaskParams:
    """Tissue-mask settings; sizes are physical so they hold at any scan resolution.

    ``od`` (the default) and ``otsu`` share the size settings; ``channel``, ``min/max_saturation``,
    ``exclude_black/white``, ``black_max`` and ``white_min`` are ``otsu``'s only, ``min_od`` and
    ``ink_grow_um`` are ``od``'s. ``MaskParams(method="otsu")`` is the earlier default exactly.
    """

    method: str = "od"
    mpp: float = 8.0  # working resolution of the mask thumbnail, µm/px (coarsest used)
    min_side_px: int = 128  # a finer working resolution when the slide's short side would be fewer px
    finest_mpp: float = 1.0  # ... but never finer than this (nor than the slide)
    min_od: float = 0.03  # od: floor of the optical-density threshold (summed over R, G, B)
    channel: str = "saturation"  # otsu: "saturation" | "darkness" | "both"
    min_saturation: int = 15  # otsu: floor of the saturation threshold (0–255): glass stays glass
    max_saturation: int = 30  # otsu: cap, so saturated ink, dye or blood cannot push pale tissue out
    blur_um: float = 40.0  # median-blur kernel side
    close_um: float | None = None  # closing kernel (bridges gaps); od 64, otsu 32
    open_um: float = 16.0  # opening kernel (drops specks and thin lines)
    max_hole_um2: float = 20_000.0  # holes smaller than this are filled
    min_object_um2: float = 20_000.0  # tissue pieces smaller than this are dropped
    exclude_pen: bool = True  # marker ink (od: blue, green, black, red; otsu: red, green, blue)
    pen_min_um2: float | None = None  # ink smaller than this is stain, not pen; od 20,000, otsu 40,000
    pen_margin_um: float = 24.0  # ink's blurred rim, removed with it
    ink_grow_um: float = 2000.0  # od: how far ink is followed over tissue from where it is unmistakable
    exclude_black: bool = True  # otsu: near-black (max channel < black_max)
    exclude_white: bool = True  # otsu: near-white (min channel > white_min)
    black_max: int = 40
    white_min: int = 230

    def __post_init__(self) -> None:
        if self.method not in MASK_METHODS:
            raise MaskError(f"unknown mask method {self.method!r}; use one of {', '.join(MASK_METHODS)}")
        if self.channel not in ("saturation", "darkness", "both"):
            raise MaskError(f"mask channel {self.channel!r}: use saturation, darkness or both")
        if not 0.1 <= self.mpp <= 200:
            raise MaskError(f"mask working resolution {self.mpp} µm/px: use 0.1–200 (e.g. 8)")
        if self.min_side_px < 0 or not 0.1 <= self.finest_mpp <= 200:
            raise MaskError("mask min_side_px must be ≥ 0 and finest_mpp 0.1–200 µm/px (e.g. 128 and 1.0)")
        for name, value in METHOD_DEFAULTS[self.method].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    def px(self, um: float) -> int:
        """An odd kernel side in working pixels for ``um`` micrometres (0 when ``um`` is under a pixel)."""
        n = round(um / self.mpp)
        return 0 if n < 2 else n | 1

    def at(self, mpp: float) -> MaskParams:
        """The same settings at working resolution ``mpp``."""
        if mpp == self.mpp:
            return self
        return MaskParams(**{**asdict(self), "mpp": mpp})


def tile_specs(
    mpp: float | None = None,
    mag: float | None = None,
    size: int = 256,
    overlap: int = 0,
    more: Sequence[str] = (),
) -> list[TileSpec]:
    """The specs a `tile` command asks for: the target ``mpp`` (µm/px, default 0.5) or ``mag``
    (``mpp = 10 / mag``) at ``size`` px with ``overlap``, plus ``more`` written like ``10x`` or
    ``1.0/256/0`` (size and overlap defaulting to the first spec's)."""
    if mpp is not None and mag is not None:
        raise SettingsError("give --mpp or --mag, not both")
    option, value = ("--mag", mag) if mag is not None else ("--mpp", mpp)
    try:
        if mag is not None:
            first = TileSpec.from_mag(mag, size, overlap)
        else:  # 0 is refused, never replaced by the default
            first = TileSpec(0.5 if mpp is None else mpp, size, overlap)
    except TilingError as exc:
        raise SettingsError(f"{option} {value:g}: {str(exc).removeprefix('tile spec: ')}") from exc
    return [first, *(parse_spec(text, size, overlap) for text in more)]


@dataclass(frozen=True)
class TileConfig:
    """Settings of a tiling run; ``key()`` fingerprints them so a resumed run redoes changed slides."""

    specs: tuple[TileSpec, ...]
    min_tissue: float = 0.5
    mask: MaskParams = field(default_factory=MaskParams)
    align: bool = True
    complete_parents: bool = True
    geojson_dir: Path | None = None  # user masks: <geojson_dir>/<slide_id>.geojson replace computed ones
    save_tiles: bool = False  # also write tile images: <job>/patches/<spec>/<slide_id>/
    tile_format: str = "png"  # png | jpg
    backend: str = "auto"
    align_native: bool = False  # per slide, snap specs to the file's own tiles (wsikit.native)

    def __post_init__(self) -> None:
        if not self.specs:
            raise TilingError("no tile spec given; pass --mpp/--mag or --spec")
        if self.tile_format not in ("png", "jpg"):
            raise TilingError(f"tile image format {self.tile_format!r}: use png or jpg")
        object.__setattr__(self, "specs", tuple(order_specs(list(self.specs))))
        if self.align:  # refuse impossible nestings before touching any slide
            aligned_layouts(list(self.specs), self.specs[0].mpp)
        if not 0.0 <= self.min_tissue <= 1.0:
            raise TilingError(f"--min-tissue {self.min_tissue}: use a fraction in [0, 1]")

    def key(self) -> str:
        """Fingerprint of what changes the outputs (a resumed run redoes slides done with other settings)."""
        return fingerprint(self.settings())

    def settings(self) -> dict[str, Any]:
        """What changes the outputs, as plain data (what :meth:`key` fingerprints)."""
        settings = {
            "specs": [s.name for s in self.specs],
            "min_tissue": self.min_tissue,
            "mask": asdict(self.mask),
            "align": self.align,
            "complete_parents": self.complete_parents,
            "geojson_dir": str(self.geojson_dir) if self.geojson_dir else None,
            "save_tiles": self.save_tiles and self.tile_format,
        }
        if self.align_native:  # only when set, so earlier jobs keep their fingerprint
            settings["align_native"] = True
        return settings


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of an extraction run; ``key()`` fingerprints what changes the bags."""

    encoder: str = "resnet50-trunc"
    embedding: str | None = None  # None: the encoder's own rule (wsikit.encoders.pooling)
    weights: Path | None = None
    pretrained: bool = True  # False: random initialisation from ``seed`` (weights_id "random:seed=N")
    seed: int = 0  # seeds random weights, so two runs encode with the same ones
    specs: tuple[str, ...] = ()  # spec names; empty: every spec tiled in the job
    batch_size: int | None = None  # None: automatic (64 on a CPU; on a GPU from its measured memory per tile)
    workers: int | None = None  # None: default_workers(device)
    device: str = "auto"
    devices: str | None = None  # several engines, one per device: "0,1,2,3", "all" (GPUs), "cpu,cpu"
    decode: str = "auto"  # auto | cpu | gpu: where JPEG tiles are decoded (auto: measured on a GPU)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    fmt: str = "h5"
    fp16_features: bool = False
    compression: str | None = None
    stain: Path | None = None  # a fitted normalizer (JSON) from `wsikit stain fit`
    stain_sample: int = 32  # tiles sampled per slide for slide-level stain estimation
    multiscale: bool = True
    channels_last: bool = True
    compile: bool = False
    backend: str = "auto"
    reader: str = "auto"  # auto | native | openslide | tiffslide (wsikit.native)
    read_timeout: float = (
        600.0  # seconds reader workers may take for one batch before the slide fails; 0: no limit
    )

    def __post_init__(self) -> None:
        if self.reader not in READERS:
            raise SettingsError(f"--reader {self.reader!r}: use one of {', '.join(READERS)}")
        if self.fmt not in ("h5", "zarr"):
            raise SettingsError(f"--format {self.fmt!r}: use h5 or zarr")
        if self.batch_size is not None and self.batch_size < 1:
            raise SettingsError(f"--batch-size {self.batch_size}: must be ≥ 1 (or leave it out: automatic)")
        if self.decode not in DECODES:
            raise SettingsError(f"--decode {self.decode!r}: use one of {', '.join(DECODES)}")
        if self.read_timeout < 0:
            raise SettingsError(f"--read-timeout {self.read_timeout}: must be ≥ 0 (0: no limit)")

    def key(self, weights_id: str, specs: Sequence[str]) -> str:
        """Fingerprint of what changes the bags (a resumed run redoes slides done with other settings)."""
        return fingerprint(self.settings(weights_id, specs))

    def settings(self, weights_id: str, specs: Sequence[str]) -> dict[str, Any]:
        """What changes the bags, as plain data (what :meth:`key` fingerprints)."""
        settings = {
            "encoder": self.encoder,
            "weights_id": weights_id,
            "specs": sorted(specs),
            "precision": self.precision,
            "fmt": self.fmt,
            "fp16_features": self.fp16_features,
            "stain": hashlib.sha1(self.stain.read_bytes()).hexdigest() if self.stain else None,
            "multiscale": self.multiscale,
        }
        if self.embedding is not None:  # absent otherwise, so that earlier runs keep their fingerprint
            settings["embedding"] = self.embedding
        return settings


@dataclass(frozen=True)
class HeatmapConfig:
    """Draw each slide's heatmap with a trained model (a `wsikit train` fold directory)."""

    model: Path
    spec: str | None = None  # the bag spec to score; default: the finest tiled spec
    normalize: str = "rank"
    cmap: str = "jet"
    alpha: float = 0.5
    max_side: int = 2048
    top_k: int = 8


@dataclass(frozen=True)
class PipelineConfig:
    """One config file: tiling (required), extraction and heatmaps (optional sections)."""

    tile: TileConfig
    extract: ExtractConfig | None = None
    heatmap: HeatmapConfig | None = None
    slide_mpp: float | None = None  # resolution for slides whose file has none (a slide list's column wins)


def expand_specs(section: dict[str, Any], where: str) -> dict[str, Any]:
    """Allow tile specs written as strings (``20x/256``, ``0.5/224/16``) as well as mappings."""
    specs = section.get("specs")
    if not isinstance(specs, list):
        return section
    out = []
    for i, spec in enumerate(specs):
        if isinstance(spec, str):
            try:
                s = parse_spec(spec)
            except TilingError as exc:
                raise ConfigError(f"{where}.specs[{i}]: {exc}") from exc
            spec = {"mpp": s.mpp, "size": s.size, "overlap": s.overlap}
        out.append(spec)
    return {**section, "specs": out}


def pipeline_config(data: dict[str, Any], where: str = "config") -> PipelineConfig:
    """Validate a config mapping (sections ``tile``, ``extract``, ``heatmap``, ``slide_mpp``)."""
    allowed = {
        "tile",
        "extract",
        "heatmap",
        "slide_mpp",
        "description",
        "mil",
    }  # mil: `wsikit train --config`
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown section(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    if "tile" not in data:
        raise ConfigError(f"{where}: a pipeline config needs a 'tile' section with at least one spec")
    return PipelineConfig(
        tile=build(TileConfig, expand_specs(data["tile"] or {}, f"{where}:tile"), f"{where}:tile"),
        extract=build(ExtractConfig, data["extract"] or {}, f"{where}:extract")
        if "extract" in data
        else None,
        heatmap=build(HeatmapConfig, data["heatmap"], f"{where}:heatmap") if data.get("heatmap") else None,
        slide_mpp=data.get("slide_mpp"),
    )


def load_pipeline_config(
    path: str | os.PathLike | None, overrides: dict[str, Any] | None = None
) -> PipelineConfig:
    """Read a YAML config (or none) and lay command-line ``overrides`` over it."""
    data = load_yaml(path) if path else {}
    data.pop("description", None)
    return pipeline_config(merge(data, overrides or {}), str(path or "options"))


def resolved_config(path: str | os.PathLike) -> dict[str, Any]:
    """A config file validated and with every default filled in, as plain data (`wsikit config show`):
    a pipeline config, or a patch-classifier recipe (sections ``model`` and ``train``)."""
    data = load_yaml(path)
    if "model" in data or "train" in data:
        return {
            "model": jsonable(build(ImageModelConfig, data.get("model"), f"{path}:model")),
            "train": jsonable(build(ImageTrainConfig, data.get("train"), f"{path}:train")),
        }
    return jsonable(load_pipeline_config(path))
