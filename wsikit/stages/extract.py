"""Batched feature extraction: tiles of a job's grids → encoder → one feature bag per slide and spec.

:class:`Extractor` builds what a run needs once (the encoder on its device, autocast, compiled graph,
stain normalizer, reading workers, batch size) and runs the extraction engine over the job's slides
(:mod:`wsikit.stages.engine`): tiles are read natively where that is pixel-exact, otherwise with
``read_region`` from the best pyramid level, resampled once to the encoder's input size (``--reader``,
docs/readers.md); batches span slide boundaries; each bag streams to disk and is renamed into place when
complete, then the slide's status record is written. A tile that fails to read is skipped and recorded; a
slide that fails is recorded failed and the run goes on. With several devices one engine runs per device
(:mod:`wsikit.stages.devices`), slides shared out through their locks.

Job layout: bags at ``<job>/bags/<spec>/<encoder>/<slide_id>.h5`` (see :func:`wsikit.bags.bag_path`);
with several aligned specs, a multi-scale bag at ``<job>/bags/<fine>+<coarse>…/<encoder>/<slide_id>.h5``
joins each fine tile with its parents' features. Status records: stage ``extract-<encoder>``, so
several encoders resume independently in one job.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsikit.bags.format import safe_encoder_name
from wsikit.claims import claim_extraction
from wsikit.encoders.build import Encoder, get_encoder
from wsikit.grids import grid_path, list_specs, read_grid, tiled_specs
from wsikit.jobs import JobError, SlideEntry, Status, read_status
from wsikit.runtime import (
    default_workers,
    resolve_device,
    resolve_devices,
    resolve_precision,
    set_threads,
    tune_malloc,
)
from wsikit.settings import ExtractConfig
from wsikit.stages.encode import (
    ExtractError,
    Runtime,
    auto_batch_size,
    model_rate,
    prepare_model,
    warm_up,
)
from wsikit.stages.engine import Engine, ExtractProgress, ExtractSummary
from wsikit.stages.writing import Callbacks
from wsikit.stain import load_normalizer

__all__ = [
    "ExtractError",
    "ExtractProgress",
    "ExtractSummary",
    "Extractor",
    "Runtime",
    "extraction_slides",
    "job_slides",
    "resolve_specs",
    "run_extraction",
    "stage_name",
]

STAGE = "extract"


def stage_name(encoder_name: str) -> str:
    """Status stage of an encoder: ``extract-<encoder>`` (``/`` and ``:`` become ``_``)."""
    return f"{STAGE}-{safe_encoder_name(encoder_name)}"


# -- many slides ---------------------------------------------------------------------------------------
def job_slides(job_dir: str | os.PathLike, specs: Sequence[str]) -> list[SlideEntry]:
    """Slides with coordinates for every spec in ``specs``: those whose tiling is recorded done
    (or, in a job without tiling records, e.g. imported TRIDENT coordinates, those with files)."""
    job = Path(job_dir)
    per_spec = [
        {p.stem for p in (job / "tiles" / s).glob("*.h5") if not p.name.startswith(".")} for s in specs
    ]
    ids = set.intersection(*per_spec) if per_spec else set()
    if (job / "status" / "tile").is_dir():  # tiled, and at these specs by its current tiling
        ids = {i for i in ids if (st := read_status(job, "tile", i)) is not None and st.state == "done"
               and set(specs) <= set(st.info.get("specs", specs))}  # fmt: skip
    entries = []
    for slide_id in sorted(ids):
        path = grid_path(job, specs[0], slide_id)
        entries.append(SlideEntry(Path(read_grid(path).attrs.get("slide_path") or path), slide_id))
    return entries


def resolve_specs(job_dir: str | os.PathLike, names: Sequence[str]) -> list[str]:
    """Spec names to extract: the given ones (checked) or every spec tiled in the job."""
    available = list_specs(job_dir)
    if not available:
        raise ExtractError(
            f"{job_dir}: no tiles/ folder with coordinates; run `wsikit tile --out {job_dir}` first"
        )
    if not names:  # stale folders of an earlier tiling are named by the CLI (wsikit.grids.tiled_specs)
        return tiled_specs(job_dir)[0] or available
    missing = [n for n in names if n not in available]
    if missing:
        raise ExtractError(
            f"{job_dir}: no coordinates for {', '.join(missing)}; tiled specs are {', '.join(available)}"
        )
    return [n for n in available if n in names]


def extraction_slides(job_dir: str | os.PathLike, cfg: ExtractConfig) -> tuple[list[str], list[SlideEntry]]:
    """The specs to encode (``cfg.specs`` or every tiled one) and the slides tiled at all of them."""
    specs = resolve_specs(job_dir, cfg.specs)
    entries = job_slides(job_dir, specs)
    if not entries:
        raise JobError(f"{job_dir}: no slides tiled at {', '.join(specs)}; run `wsikit tile` first")
    return specs, entries


@dataclass
class Extractor:
    """Everything built once per run: the encoder on its device, autocast, compiled graph, batch size,
    reading workers, stain normalizer."""

    cfg: ExtractConfig
    runtime: Runtime
    workers: int
    stain: Any = None
    batch_size: int = 64
    model_rate: float | None = None  # tiles/s of the bare forward (measured on a GPU, for --decode auto)
    build_seconds: float = 0.0

    @classmethod
    def build(
        cls,
        cfg: ExtractConfig,
        encoder: Encoder | None = None,
        device: str | None = None,
        cpus: int | None = None,
    ) -> Extractor:
        """Build the run's model side on ``device`` (default ``cfg.device``); ``cpus``: this engine's
        share of the allotted CPUs (default all of them)."""
        t0 = time.perf_counter()
        tune_malloc()
        dev = resolve_device(device or cfg.device)
        set_threads(cpus if dev.type == "cpu" else None if cpus is None else 1)
        seed = None if cfg.pretrained or cfg.weights is not None else cfg.seed
        enc = encoder or get_encoder(cfg.encoder, cfg.weights, cfg.pretrained, dev, cfg.embedding, seed=seed)
        enc.model.to(dev)
        channels_last = prepare_model(enc, cfg.channels_last, cfg.compile)
        autocast = resolve_precision(cfg.precision, dev, enc.precision)
        runtime = Runtime(enc, dev, autocast, channels_last, compiled=cfg.compile)
        stain = load_normalizer(cfg.stain) if cfg.stain is not None else None
        workers = default_workers(dev, cpus) if cfg.workers is None else cfg.workers
        batch = cfg.batch_size or auto_batch_size(runtime)
        rate = None
        if dev.type == "cuda" and cfg.decode == "auto":
            rate = model_rate(runtime, batch)  # also the compile warm-up
        elif cfg.compile:
            warm_up(runtime, batch)
        return cls(cfg, runtime, workers, stain, batch, rate, time.perf_counter() - t0)

    @property
    def stage(self) -> str:
        return stage_name(self.runtime.encoder.name)

    def describe(self) -> str:
        """One line: encoder, dimension, weights, device, precision, fast path, readers, batch size."""
        rt, enc = self.runtime, self.runtime.encoder
        d = rt.describe()
        fast = ", ".join(x for x in (d["attention"], "channels-last" if rt.channels_last else None,
                                     "compiled" if rt.compiled else None) if x)  # fmt: skip
        return (
            f"{enc.name} ({enc.dim}-d, weights {enc.weights_id[:23]}) on {rt.device}, {d['autocast']}"
            f"{', ' + fast if fast else ''}, {self.workers} reader(s), batch {self.batch_size}"
        )

    def run(
        self,
        entries: Sequence[SlideEntry],
        job_dir: str | os.PathLike,
        specs: Sequence[str],
        overwrite: bool = False,
        retry_failed: bool = False,
        on_start: Callable[[SlideEntry], None] | None = None,
        on_end: Callable[[SlideEntry, Status | None], None] | None = None,
        on_tiles: Callable[[int], None] | None = None,
        on_progress: Callable[[ExtractProgress], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> ExtractSummary:
        """Extract every slide with run_batch semantics (skip done, locks, failure records); a slide done
        with other settings, or whose grids changed since (re-tiled), is redone. Once ``stop()`` is true no further slide is claimed (those in
        flight are finished)."""
        callbacks = Callbacks(on_start, on_end, on_tiles, on_progress)
        claim_extraction(job_dir, self.stage, self.cfg, self.runtime.encoder.weights_id, specs, overwrite)
        engine = Engine(self, Path(job_dir), specs, overwrite, retry_failed, callbacks, stop)
        summary = engine.run(entries)
        summary.build_seconds = self.build_seconds
        return summary


def run_extraction(
    job_dir: str | os.PathLike,
    cfg: ExtractConfig,
    entries: Sequence[SlideEntry] | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    encoder: Encoder | None = None,
    on_ready: Callable[[str], None] | None = None,
    **callbacks: Any,
) -> ExtractSummary:
    """Extract bags for a tiled job (all its slides, or ``entries``); the Python entry point.

    With ``cfg.devices`` naming several devices, one engine per device shares the slides
    (:func:`wsikit.stages.devices.run_on_devices`). ``on_ready`` receives each engine's one-line
    description once it is built; ``callbacks`` are :meth:`Extractor.run`'s.
    """
    specs, tiled = extraction_slides(job_dir, cfg)
    todo = tiled if entries is None else list(entries)
    devices = resolve_devices(cfg.devices, cfg.device)
    if len(devices) > 1:
        from wsikit.stages.devices import run_on_devices

        return run_on_devices(
            devices, job_dir, cfg, todo, specs, overwrite, retry_failed, encoder, on_ready, **callbacks
        )
    extractor = Extractor.build(cfg, encoder, devices[0])
    if on_ready:
        on_ready(extractor.describe())
    return extractor.run(todo, job_dir, specs, overwrite, retry_failed, **callbacks)
