"""Slide embeddings: one vector per slide from its feature bag, resumable like every stage.

A slide encoder turns a bag's (N, D) tile features into one vector. ``mean`` (the mean of the tile
features, accumulated in float64) is built in and accepts any bag. A registered slide encoder states
which patch encoder, resolution and tile size its bags must come from; a bag that does not match is
refused with the reason (a slide vector from the wrong features is silently meaningless).

Job layout::

    <job>/slide_embeddings/<slide_encoder>/<spec>/<patch_encoder>/<slide_id>.h5
    <job>/status/embed-<slide_encoder>-<spec>-<patch_encoder>/<slide_id>.json

Each file holds ``embedding`` (D,) float32 and root attributes ``format = "wsikit-slide-embedding"``,
``format_version``, ``slide_id``, ``slide_encoder``, ``patch_encoder``, ``patch_weights_id``,
``patch_embedding``, ``tile_spec``, ``tile_mpp``, ``tile_size``, ``n_tiles``, ``bag`` (source path),
``wsikit_version``, ``created``; written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wsikit import __version__
from wsikit.bags import read_bag
from wsikit.io import atomic_path, clear_stale_temps
from wsikit.jobs import BatchSummary, SlideEntry, StageResult, Status, run_batch

FORMAT = "wsikit-slide-embedding"
FORMAT_VERSION = 1
MPP_TOLERANCE = 0.1  # relative: a bag tiled within 10 % of the required µm/px is accepted


class SlideEmbedError(ValueError):
    """A slide-embedding request that cannot run; the message says what to change."""


@dataclass(frozen=True)
class SlideEncoder:
    """A slide encoder and the bags it accepts (None: any)."""

    name: str
    description: str
    embed: Callable[[np.ndarray], np.ndarray]  # (N, D) tile features -> (D',) slide vector
    patch_encoder: str | None = None
    mpp: float | None = None
    tile_size: int | None = None

    def refusal(self, attrs: dict[str, Any]) -> str | None:
        """Why a bag with root attributes ``attrs`` cannot feed this encoder, or None."""
        if self.patch_encoder and attrs.get("encoder") != self.patch_encoder:
            return (
                f"needs bags from patch encoder {self.patch_encoder}, this one is from {attrs.get('encoder')}"
            )
        mpp = attrs.get("tile_mpp")
        if self.mpp and (not mpp or abs(float(mpp) / self.mpp - 1) > MPP_TOLERANCE):
            return f"needs tiles at {self.mpp:g} µm/px, this bag's are at {mpp}"
        if self.tile_size and attrs.get("tile_size") != self.tile_size:
            return f"needs {self.tile_size}-px tiles, this bag's are {attrs.get('tile_size')} px"
        return None


def mean_pool(features: np.ndarray) -> np.ndarray:
    """The mean tile feature (float64 accumulation, float32 result)."""
    return features.astype(np.float64, copy=False).mean(axis=0).astype(np.float32)


_SLIDE_ENCODERS: dict[str, SlideEncoder] = {}


def register_slide_encoder(encoder: SlideEncoder, overwrite: bool = False) -> None:
    """Add a slide encoder (a plugin may register its own)."""
    if encoder.name in _SLIDE_ENCODERS and not overwrite:
        raise SlideEmbedError(f"slide encoder {encoder.name!r} is already registered; pass overwrite=True")
    _SLIDE_ENCODERS[encoder.name] = encoder


def list_slide_encoders() -> list[str]:
    return sorted(_SLIDE_ENCODERS)


def slide_encoder(name: str) -> SlideEncoder:
    if name not in _SLIDE_ENCODERS:
        raise SlideEmbedError(
            f"unknown slide encoder {name!r}; choose one of {', '.join(list_slide_encoders())}"
        )
    return _SLIDE_ENCODERS[name]


register_slide_encoder(SlideEncoder("mean", "mean of the tile features (any patch encoder)", mean_pool))


# -- the stage -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbedConfig:
    """Which bags (spec, patch encoder) and which slide encoder; empty names: the job's only choice."""

    slide_encoder: str = "mean"
    spec: str = ""
    patch_encoder: str = ""

    def key(self) -> str:
        return json.dumps([self.slide_encoder, self.spec, self.patch_encoder])


def embedding_path(job_dir: str | os.PathLike, cfg: EmbedConfig, slide_id: str) -> Path:
    return (
        Path(job_dir)
        / "slide_embeddings"
        / cfg.slide_encoder
        / cfg.spec
        / cfg.patch_encoder
        / f"{slide_id}.h5"
    )


def stage_name(cfg: EmbedConfig) -> str:
    return f"embed-{cfg.slide_encoder}-{cfg.spec}-{cfg.patch_encoder}"


def _choose(job: Path, cfg: EmbedConfig) -> EmbedConfig:
    """Fill in the spec and patch encoder from the job's bags when there is one choice."""
    root = job / "bags"
    pairs = sorted(
        (s.name, e.name)
        for s in root.glob("*")
        if s.is_dir()
        for e in s.glob("*")
        if e.is_dir() and any(e.glob("*.h5"))
    )
    fits = [(s, e) for s, e in pairs if cfg.spec in ("", s) and cfg.patch_encoder in ("", e)]
    if len(fits) == 1:
        return EmbedConfig(cfg.slide_encoder, *fits[0])
    listed = (
        ", ".join(f"--spec {s} --patch-encoder {e}" for s, e in pairs) or "none; run `wsikit extract` first"
    )
    what = "no h5 bags match" if not fits else "several bag sets match"
    raise SlideEmbedError(f"{root}: {what}; choose one of: {listed}")


def embed_one(bag: Path, dest: Path, encoder: SlideEncoder) -> StageResult:
    """One slide: read its bag, check it fits the encoder, write the vector atomically."""
    data = read_bag(bag)
    if (why := encoder.refusal(data.attrs)) is not None:
        raise SlideEmbedError(f"{bag}: slide encoder {encoder.name} {why}")
    if len(data.features) == 0:
        raise SlideEmbedError(f"{bag}: no tiles, so no slide embedding; check the tissue mask and tiling")
    vector = encoder.embed(np.asarray(data.features))
    attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "slide_id": data.attrs.get("slide_id", bag.stem),
        "slide_encoder": encoder.name,
        "patch_encoder": data.attrs.get("encoder"),
        "patch_weights_id": data.attrs.get("weights_id"),
        "patch_embedding": data.attrs.get("encoder_embedding"),
        "tile_spec": data.attrs.get("tile_spec"),
        "tile_mpp": data.attrs.get("tile_mpp"),
        "tile_size": data.attrs.get("tile_size"),
        "n_tiles": len(data.features),
        "bag": str(bag),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write(dest, vector, attrs)
    info = {"dim": int(vector.shape[0]), "n_tiles": len(data.features), "bag_mtime": bag.stat().st_mtime_ns}
    return StageResult([str(dest)], info)


def _write(dest: Path, vector: np.ndarray, attrs: dict[str, Any]) -> None:
    clear_stale_temps(dest)
    with atomic_path(dest) as tmp, h5py.File(tmp, "w") as fh:
        fh.create_dataset("embedding", data=vector)
        for key, value in {**attrs, "wsikit_version": __version__}.items():
            fh.attrs[key] = "json:null" if value is None else value


def read_embedding(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """A slide embedding file's vector and attributes."""
    with h5py.File(path, "r") as fh:
        if fh.attrs.get("format") != FORMAT:
            raise SlideEmbedError(f"{path}: not a {FORMAT} file")
        attrs = {k: (None if v == "json:null" else v) for k, v in fh.attrs.items()}
        return fh["embedding"][()], attrs


def resolve_bags(job_dir: str | os.PathLike, cfg: EmbedConfig) -> tuple[EmbedConfig, dict[str, Path]]:
    """The bag set to embed (spec and patch encoder filled in) and its bags by slide id."""
    job = Path(job_dir)
    slide_encoder(cfg.slide_encoder)
    cfg = _choose(job, cfg)
    folder = job / "bags" / cfg.spec / cfg.patch_encoder
    return cfg, {p.stem: p for p in sorted(folder.glob("*.h5")) if not p.name.startswith(".")}


def run_embedding(
    job_dir: str | os.PathLike,
    cfg: EmbedConfig,
    slide_ids: Sequence[str] | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    on_start: Callable[[SlideEntry], None] | None = None,
    on_end: Callable[[SlideEntry, Status | None], None] | None = None,
) -> tuple[EmbedConfig, BatchSummary]:
    """Embed every slide with a bag in ``<job>/bags/<spec>/<patch_encoder>/`` (or ``slide_ids``).

    Slides already embedded are skipped unless their bag changed since (re-extracted) or ``overwrite``.
    """
    cfg, bags = resolve_bags(job_dir, cfg)
    if slide_ids is not None:
        missing = [s for s in slide_ids if s not in bags]
        if missing:
            raise SlideEmbedError(
                f"{job_dir}: no bag for {', '.join(missing[:5])} in {cfg.spec}/{cfg.patch_encoder}"
            )
        bags = {s: bags[s] for s in slide_ids}
    encoder = slide_encoder(cfg.slide_encoder)
    summary = run_batch(
        stage_name(cfg),
        [SlideEntry(path, slide_id) for slide_id, path in bags.items()],
        lambda e: embed_one(e.path, embedding_path(job_dir, cfg, e.slide_id), encoder),
        job_dir,
        overwrite,
        retry_failed,
        on_start,
        on_end,
        outdated=lambda previous: (
            previous.info.get("bag_mtime") != bags[previous.slide_id].stat().st_mtime_ns
        ),
    )
    return cfg, summary
