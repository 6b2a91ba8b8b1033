"""The chained pipeline behind `wsikit run`: tile → extract (→ heatmap) slide by slide, from one config.

Streaming slide by slide means the first bags appear while later slides are still waiting, and a job
array task killed at its time limit loses at most the slide it was on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsikit.bags import bag_path
from wsikit.config import ConfigError, build, load_yaml, merge, to_plain
from wsikit.extract import ExtractConfig, Extractor, resolve_specs
from wsikit.jobs import BatchSummary, SlideEntry, StageResult, Status, atomic_path, run_batch
from wsikit.tile_stage import TileConfig, run_tiling
from wsikit.tiling import TilingError, parse_spec


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


def record_config(job_dir: str | os.PathLike, cfg: PipelineConfig) -> Path:
    """Save the resolved config beside the outputs (``<job>/configs/run-<time>-<pid>.yaml``)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = Path(job_dir) / "configs" / f"run-{stamp}-{os.getpid()}.yaml"
    with atomic_path(dest) as tmp:
        tmp.write_text(yaml.safe_dump(to_plain(cfg), sort_keys=False))
    return dest


@dataclass
class PipelineSummary:
    """Each stage's batch summary."""

    stages: dict[str, BatchSummary] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.stages.values())

    def add(self, stage: str, part: BatchSummary) -> None:
        self.stages.setdefault(stage, BatchSummary()).extend(part)


def run_pipeline(
    entries: Sequence[SlideEntry],
    job_dir: str | os.PathLike,
    cfg: PipelineConfig,
    overwrite: bool = False,
    retry_failed: bool = False,
    on_start: Callable[[SlideEntry], None] | None = None,
    on_end: Callable[[SlideEntry, Status | None], None] | None = None,
) -> PipelineSummary:
    """Tile, extract and draw heatmaps slide by slide with every stage's resume/lock/failure semantics."""
    record_config(job_dir, cfg)
    extractor = Extractor.build(cfg.extract) if cfg.extract else None
    summary = PipelineSummary()
    for entry in entries:
        if cfg.slide_mpp and entry.mpp is None:
            entry = SlideEntry(entry.path, entry.slide_id, cfg.slide_mpp, entry.patient_id, entry.label)
        if on_start:
            on_start(entry)
        tiled = run_tiling([entry], job_dir, cfg.tile, overwrite, retry_failed)
        summary.add("tile", tiled)
        last: Status | None = (tiled.done or tiled.failed or [None])[0]
        tiled_ok = not tiled.failed and not tiled.busy
        if extractor is not None and tiled_ok:
            specs = resolve_specs(job_dir, [s.name for s in cfg.tile.specs])
            part = extractor.run([entry], job_dir, specs, overwrite, retry_failed)
            summary.add("extract", part)
            last = (part.done or part.failed or [last])[0]
            if cfg.heatmap is not None and not part.failed and not part.busy:
                spec = cfg.heatmap.spec or specs[0]
                part = _heatmap(entry, job_dir, cfg, extractor.runtime.encoder.name, spec, overwrite)
                summary.add("heatmap", part)
                last = (part.done or part.failed or [last])[0]
        if on_end:
            on_end(entry, last)
    return summary


def _heatmap(
    entry: SlideEntry,
    job_dir: str | os.PathLike,
    cfg: PipelineConfig,
    encoder: str,
    spec: str,
    overwrite: bool,
) -> BatchSummary:
    from wsikit.heatmap import heatmap_for_slide

    assert cfg.heatmap is not None and cfg.extract is not None
    hm = cfg.heatmap
    bag = bag_path(job_dir, spec, encoder, entry.slide_id, cfg.extract.fmt)

    def work(e: SlideEntry) -> StageResult:
        out = Path(job_dir) / "heatmaps" / f"{e.slide_id}.png"
        written = heatmap_for_slide(
            hm.model, e.path, bag, out, hm.normalize, hm.cmap, hm.alpha, hm.max_side, hm.top_k, mpp=e.mpp
        )
        return StageResult(outputs=[str(p) for p in written.values()])

    return run_batch("heatmap", [entry], work, job_dir, overwrite=overwrite)
