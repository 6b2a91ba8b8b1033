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

import yaml

from wsikit.bags import bag_path
from wsikit.io import jsonable, write_text
from wsikit.jobs import BatchSummary, SlideEntry, Status, with_slide_mpp
from wsikit.settings import PipelineConfig
from wsikit.stages.extract import Extractor, resolve_specs
from wsikit.stages.heatmap import heatmap_job
from wsikit.stages.tile import run_tiling


def record_config(job_dir: str | os.PathLike, cfg: PipelineConfig) -> Path:
    """Save the resolved config beside the outputs (``<job>/configs/run-<time>-<pid>.yaml``)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = Path(job_dir) / "configs" / f"run-{stamp}-{os.getpid()}.yaml"
    return write_text(dest, yaml.safe_dump(jsonable(cfg), sort_keys=False))


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
    for entry in with_slide_mpp(entries, cfg.slide_mpp):
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
                bag = bag_path(job_dir, spec, extractor.runtime.encoder.name, entry.slide_id, cfg.extract.fmt)
                part = heatmap_job(entry, job_dir, cfg.heatmap, bag, overwrite)
                summary.add("heatmap", part)
                last = (part.done or part.failed or [last])[0]
        if on_end:
            on_end(entry, last)
    return summary
