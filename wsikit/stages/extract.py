"""Batched feature extraction: tiles of a job's grids → encoder → one feature bag per slide and spec.

Per slide and spec, a :class:`wsikit.tiles.TileItems` dataset reads each tile of the grid in DataLoader
workers (the slide pickles and reopens there): compressed file tiles decoded directly where that is
pixel-exact, otherwise ``read_region`` from the best pyramid level, resampled once to the encoder's
input size (``--reader``, docs/readers.md). On the device each uint8 batch is optionally stain-normalized, normalized to
the encoder's mean/std and run under ``torch.inference_mode`` with autocast and channels-last; features
stream into the bag file in chunks. A tile that fails to read is skipped and recorded (coordinates and
error); a slide that fails is recorded by :func:`wsikit.jobs.run_batch` and the run goes on.

Job layout: bags at ``<job>/bags/<spec>/<encoder>/<slide_id>.h5`` (see :func:`wsikit.bags.bag_path`);
with several aligned specs, a multi-scale bag at ``<job>/bags/<fine>+<coarse>…/<encoder>/<slide_id>.h5``
joins each fine tile with its parents' features. Status records: stage ``extract-<encoder>``, so
several encoders resume independently in one job.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from wsikit.bags import BagWriter, bag_path, join_context, new_attrs, read_bag, write_bag
from wsikit.claims import claim_extraction
from wsikit.encoders.build import Encoder, get_encoder
from wsikit.grids import TileGrid, grid_inputs, grid_path, list_specs, read_grid, tiled_specs
from wsikit.io import clear_stale_temps
from wsikit.jobs import BatchSummary, JobError, SlideEntry, StageResult, Status, read_status, run_batch
from wsikit.runtime import default_workers, resolve_device, resolve_precision, set_threads, tune_malloc
from wsikit.settings import ExtractConfig
from wsikit.slide import Slide, open_slide
from wsikit.specs import spec_key
from wsikit.stain import load_normalizer
from wsikit.tiles import TileItems, TileSource, assemble_batch, collate_items, read_tile

STAGE = "extract"
_MAX_RECORDED_ERRORS = 50


class ExtractError(RuntimeError):
    """An extraction request that cannot run; the message says what to change."""


def stage_name(encoder_name: str) -> str:
    """Status stage of an encoder: ``extract-<encoder>`` (``/`` and ``:`` become ``_``)."""
    return f"{STAGE}-{encoder_name.replace('/', '_').replace(':', '_')}"


# -- the encoder loop ----------------------------------------------------------------------------------
@dataclass
class Runtime:
    """How batches run: device, autocast dtype, memory format, optional stain normalizer."""

    encoder: Encoder
    device: torch.device
    autocast: torch.dtype | None = None
    channels_last: bool = True
    stain: Any = None  # a wsikit.stain.Normalizer (already for_slide'd), or None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 on any device → (B, D) features on the device (not synchronised)."""
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        if self.stain is not None:
            x = self.stain(x.contiguous())
        x = self.encoder.preprocess(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(
                self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None
            ),
        ):
            return self.encoder.model(x)

    def for_slide(self, slide: Slide, grid: TileGrid, stain: Any, n_sample: int) -> Runtime:
        """This runtime with ``stain`` (a fitted normalizer, or None) estimated on the slide's own tiles."""
        if stain is None:
            return self
        sample = _stain_sample(slide, grid, n_sample, self.encoder.read_size)
        slide_stain = stain.for_slide(sample.to(self.device)) if len(sample) else stain
        return Runtime(self.encoder, self.device, self.autocast, self.channels_last, slide_stain)

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "autocast": str(self.autocast).removeprefix("torch.") if self.autocast else "fp32",
            "channels_last": self.channels_last,
            "torch_threads": torch.get_num_threads(),
        }


def prepare_model(encoder: Encoder, channels_last: bool = True, compile: bool = False) -> None:
    """Move the model to channels-last (and compile it) in place."""
    if channels_last:
        encoder.model.to(memory_format=torch.channels_last)
    if compile:
        encoder.model = torch.compile(encoder.model)  # type: ignore[assignment]


def _worker_init(_: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.reopen()  # type: ignore[union-attr]


def _batches(loader: DataLoader, path: Path, read_timeout: float, times: dict[str, float]) -> Iterator[Any]:
    """The loader's batches, with the time spent waiting for them added to ``times["read_wait"]``; a dead
    or stalled reading worker becomes one :class:`ExtractError` naming the slide and the fix."""
    batches = iter(loader)
    while True:
        t = time.perf_counter()
        try:
            item = next(batches, None)
        except RuntimeError as exc:  # a worker that died (killed, out of memory, a crash in a reader)
            if "DataLoader timed out" in str(exc):
                raise ExtractError(
                    f"{path}: no tiles from the reading workers for {read_timeout:g} s (a stalled read "
                    "on network storage?); rerun with --retry-failed, or raise --read-timeout"
                ) from exc
            if "DataLoader worker" not in str(exc):
                raise
            raise ExtractError(
                f"{path}: a tile-reading worker died ({exc}); rerun with --retry-failed "
                "(--workers 0 shows a reader crash's own error)"
            ) from exc
        times["read_wait"] += time.perf_counter() - t
        if item is None:
            return
        yield item


def _loader(source: TileSource, runtime: Runtime, batch_size: int, workers: int, read_timeout: float):
    dataset = TileItems(source, ship_streams=runtime.device.type == "cuda")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_items,
        pin_memory=runtime.device.type == "cuda",
        prefetch_factor=4 if workers else None,
        worker_init_fn=_worker_init if workers else None,
        timeout=read_timeout if workers else 0,
    )


def extract_grid(
    slide: Slide,
    grid: TileGrid,
    runtime: Runtime,
    writer: BagWriter,
    batch_size: int = 64,
    workers: int = 0,
    on_tiles: Callable[[int], None] | None = None,
    seconds: dict[str, float] | None = None,
    reader: str = "auto",
    read_timeout: float = 0.0,
) -> list[tuple[int, int, str]]:
    """Encode every tile of ``grid`` into ``writer``; returns the skipped tiles as (x, y, error).

    Each batch's features are copied back and written while the next batch runs on the device, so a
    GPU is never idle waiting for the file. ``seconds`` (if given) accumulates where the time went:
    ``read_wait`` (waiting for tiles), ``model`` (device work as seen from here), ``write``. With
    workers, a batch not ready within ``read_timeout`` seconds (0: wait forever) fails the slide.
    """
    # tiles through wsikit.tiles (docs/readers.md): compressed file tiles where exact, read_region
    # elsewhere; on a GPU, workers ship whole JPEG tiles as bytes and nvJPEG decodes each batch
    source = TileSource(slide, grid.coords, grid.size_level0, runtime.encoder.read_size, reader)
    loader = _loader(source, runtime, batch_size, workers, read_timeout)
    times = seconds if seconds is not None else {}
    for key in ("read_wait", "model", "write"):
        times.setdefault(key, 0.0)
    skipped: list[tuple[int, int, str]] = []
    pending: tuple[torch.Tensor, np.ndarray] | None = None

    def flush() -> None:
        t = time.perf_counter()
        feats, rows = pending  # type: ignore[misc]
        host = feats.float().cpu().numpy()
        t2 = time.perf_counter()
        writer.append(host, grid.coords[rows], rows)
        times["model"] += t2 - t
        times["write"] += time.perf_counter() - t2
        if on_tiles:
            on_tiles(len(rows))

    for batch, index, errors in _batches(loader, slide.path, read_timeout, times):
        t = time.perf_counter()
        pixels = assemble_batch(batch, runtime.encoder.read_size, runtime.device)
        times["read_wait"] += time.perf_counter() - t
        ok, idx = np.array([not e for e in errors]), index.numpy()
        t = time.perf_counter()
        feats = runtime.forward(pixels if ok.all() else pixels[torch.from_numpy(ok)])
        times["model"] += time.perf_counter() - t
        if pending is not None:
            flush()
        pending = (feats, idx[ok])
        skipped += [(*(int(v) for v in grid.coords[idx[pos]]), errors[pos]) for pos in np.nonzero(~ok)[0]]  # type: ignore[misc]
    if pending is not None:
        flush()
    if skipped:
        writer.skip(np.array([(x, y) for x, y, _ in skipped], np.int64))
    return skipped


# -- one slide -----------------------------------------------------------------------------------------
def _stain_sample(slide: Slide, grid: TileGrid, n: int, size: int) -> torch.Tensor:
    """Up to ``n`` of the most tissue-rich tiles, spread over the slide, as (n, 3, size, size) uint8."""
    if len(grid) == 0:
        return torch.zeros((0, 3, size, size), torch.uint8)
    order = np.argsort(-np.nan_to_num(grid.tissue_fraction, nan=1.0), kind="stable")
    top = order[: max(n * 4, n)]
    pick = top[np.linspace(0, len(top) - 1, num=min(n, len(top))).astype(int)]
    tiles = []
    for i in pick:
        with contextlib.suppress(Exception):
            tiles.append(read_tile(slide, tuple(grid.coords[i]), grid.size_level0, size))
    if not tiles:
        raise ExtractError(f"{slide.path}: no tile could be read for the stain estimate")
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


def _file_state(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of a file, or None when it is gone."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _bag_attrs(
    grid: TileGrid, slide: Slide, runtime: Runtime, stain: dict[str, Any] | None, cfg: ExtractConfig
) -> dict[str, Any]:
    enc = runtime.encoder.describe()
    return new_attrs(
        slide_id=grid.slide_id,
        slide_path=str(slide.path),
        slide_mpp=grid.slide_mpp,
        encoder=enc["name"],
        encoder_arch=enc["arch"],
        encoder_dim=enc["dim"],
        encoder_embedding=enc["embedding"],
        weights_id=enc["weights_id"],
        encoder_expected_mpp=enc["expected_mpp"],
        encoder_input_mpp=runtime.encoder.input_mpp(grid.effective_mpp or grid.spec.mpp, grid.spec.size),
        preprocessing={**enc["preprocessing"], "read": "best pyramid level, one area resample to read size"},
        stain=stain,
        tile_spec=grid.spec.name,
        tile_mpp=grid.spec.mpp,
        tile_size=grid.spec.size,
        tile_overlap=grid.spec.overlap,
        tile_effective_mpp=grid.effective_mpp,
        size_level0=grid.size_level0,
        runtime=runtime.describe(),
        settings=cfg.key(enc["weights_id"], [grid.spec.name]),
    )


def _join_multiscale(
    job: Path, grids: list[TileGrid], paths: dict[str, Path], encoder_name: str, slide_id: str, fmt: str
) -> Path | None:
    """Write the finest spec's bag with each coarser spec's parent features as ``context``."""
    fine = grids[0]
    coarse = [g for g in grids[1:] if g.spec.name in fine.parents]
    if not coarse:
        return None
    contexts = [
        (g.spec.name, read_bag(paths[g.spec.name]), fine.parents[g.spec.name], len(g)) for g in coarse
    ]
    joined = join_context(read_bag(paths[fine.spec.name]), contexts)
    dest = bag_path(job, joined.attrs["tile_spec"], encoder_name, slide_id, fmt)
    clear_stale_temps(dest)
    return write_bag(dest, joined, fmt=fmt)


def _encode_spec(
    slide: Slide,
    grid: TileGrid,
    run: Runtime,
    dest: Path,
    cfg: ExtractConfig,
    workers: int,
    on_tiles: Callable[[int], None] | None,
    before: tuple[int, int, int] | None,
) -> tuple[list[tuple[int, int, str]], dict[str, float], float]:
    """One spec's bag at ``dest``: (skipped tiles, seconds per part, total seconds). The bag is kept only
    when the slide file is still in its ``before`` state (a slide replaced or truncated meanwhile fails)."""
    clear_stale_temps(dest)  # a killed run's leftovers (run_batch holds the slide's lock)
    stain = run.stain.describe() if run.stain is not None else None
    attrs = _bag_attrs(grid, slide, run, stain, cfg)
    features = "float16" if cfg.fp16_features else "float32"
    t0, parts = time.perf_counter(), {}
    with BagWriter(dest, run.encoder.dim, attrs, grid.attrs, cfg.fmt, features, cfg.compression) as writer:
        skipped = extract_grid(
            slide, grid, run, writer, cfg.batch_size, workers, on_tiles, parts, cfg.reader, cfg.read_timeout
        )
        writer.attrs["skipped_errors"] = [f"({x}, {y}): {e}" for x, y, e in skipped[:_MAX_RECORDED_ERRORS]]
        if (now := _file_state(slide.path)) != before:  # raised inside: the bag is not kept
            raise ExtractError(
                f"{slide.path}: the slide file {'disappeared' if now is None else 'changed'} "
                f"during extraction at {grid.spec.name}; restore it and rerun with --retry-failed"
            )
    return skipped, parts, time.perf_counter() - t0


def _record(info: dict[str, Any], grid: TileGrid, skipped: list, parts: dict[str, float], seconds: float):
    """A spec's counts and timings in the slide's status info; returns its warnings."""
    name = grid.spec.name
    info["tiles"][name] = len(grid) - len(skipped)
    info["skipped"][name] = [[x, y] for x, y, _ in skipped]
    info["tiles_per_s"][name] = round(len(grid) / seconds, 2) if seconds > 0 else None
    info["seconds"][name] = {"total": round(seconds, 3), **{k: round(v, 3) for k, v in parts.items()}}
    warnings = []
    if skipped:
        x, y, error = skipped[0]
        warnings.append(
            f"{len(skipped)} of {len(grid)} tiles at {name} could not be read and were skipped, "
            f"e.g. ({x}, {y}): {error}"
        )
    if len(grid) == 0:
        warnings.append(f"no tiles at {name}: wrote an empty (0, D) bag")
    return warnings


def _read_grids(job: Path, slide_id: str, specs: Sequence[str]) -> list[TileGrid]:
    """The slide's grids for ``specs``, fine → coarse."""
    grids = []
    for name in specs:
        path = grid_path(job, name, slide_id)
        if not path.is_file():
            raise ExtractError(f"{path}: no coordinates for {slide_id} at {name}; run `wsikit tile` first")
        grids.append(read_grid(path))
    return sorted(grids, key=lambda g: spec_key(g.spec))


def extract_one(
    entry: SlideEntry,
    job_dir: str | os.PathLike,
    cfg: ExtractConfig,
    runtime: Runtime,
    specs: Sequence[str],
    stain: Any = None,
    workers: int = 0,
    on_tiles: Callable[[int], None] | None = None,
) -> StageResult:
    """Extract one slide's bags for ``specs`` (fine → coarse) into ``job_dir``."""
    job = Path(job_dir)
    grids = _read_grids(job, entry.slide_id, specs)
    slide_path = Path(grids[0].attrs.get("slide_path") or entry.path)
    outputs: list[str] = []
    warnings: list[str] = []
    info: dict[str, Any] = {"tiles": {}, "skipped": {}, "tiles_per_s": {}, "seconds": {}}
    info["runtime"] = runtime.describe()
    info["reader"] = cfg.reader
    before = _file_state(slide_path)
    with open_slide(slide_path, cfg.backend, mpp=grids[0].slide_mpp, slide_id=entry.slide_id) as slide:  # type: ignore[arg-type]
        run = runtime.for_slide(slide, grids[0], stain, cfg.stain_sample)
        paths: dict[str, Path] = {}
        for grid in grids:
            dest = bag_path(job, grid.spec.name, runtime.encoder.name, entry.slide_id, cfg.fmt)
            skipped, parts, seconds = _encode_spec(slide, grid, run, dest, cfg, workers, on_tiles, before)
            paths[grid.spec.name] = dest
            outputs.append(str(dest))
            warnings += _record(info, grid, skipped, parts, seconds)
            tile_mpp = grid.effective_mpp or grid.spec.mpp
            if (
                off := runtime.encoder.resolution_warning(tile_mpp, grid.spec.size, grid.spec.name)
            ) is not None:
                warnings.append(off)
        if cfg.multiscale and len(grids) > 1:
            joined = _join_multiscale(job, grids, paths, runtime.encoder.name, entry.slide_id, cfg.fmt)
            if joined is not None:
                outputs.append(str(joined))
    info["settings"] = cfg.key(runtime.encoder.weights_id, [g.spec.name for g in grids])
    info["encoder"] = runtime.encoder.name
    info["weights_id"] = runtime.encoder.weights_id
    info["stain"] = run.stain.describe()["method"] if run.stain is not None else None
    return StageResult(outputs, info, warnings)


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
    """Everything built once per run: the encoder on its device, autocast, workers, stain normalizer."""

    cfg: ExtractConfig
    runtime: Runtime
    workers: int
    stain: Any = None

    @classmethod
    def build(cls, cfg: ExtractConfig, encoder: Encoder | None = None) -> Extractor:
        tune_malloc()
        set_threads()
        device = resolve_device(cfg.device)
        enc = encoder or get_encoder(cfg.encoder, cfg.weights, cfg.pretrained, device, cfg.embedding)
        enc.model.to(device)
        prepare_model(enc, cfg.channels_last, cfg.compile)
        autocast = resolve_precision(cfg.precision, device, enc.precision)
        stain = load_normalizer(cfg.stain) if cfg.stain is not None else None
        workers = default_workers(device) if cfg.workers is None else cfg.workers
        return cls(cfg, Runtime(enc, device, autocast, cfg.channels_last), workers, stain)

    def describe(self) -> str:
        """One line: encoder, dimension, weights, device, precision, readers, batch size."""
        rt, enc = self.runtime, self.runtime.encoder
        return (
            f"{enc.name} ({enc.dim}-d, weights {enc.weights_id[:23]}) on {rt.device}, "
            f"{rt.describe()['autocast']}, {self.workers} reader(s), batch {self.cfg.batch_size}"
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
    ) -> BatchSummary:
        """Extract every slide with run_batch semantics; a slide done with other settings is redone."""
        stage, weights_id = stage_name(self.runtime.encoder.name), self.runtime.encoder.weights_id
        key = self.cfg.key(weights_id, specs)
        claim_extraction(job_dir, stage, self.cfg, weights_id, specs, overwrite)  # one set per spec
        return run_batch(
            stage,
            entries,
            lambda e: extract_one(
                e, job_dir, self.cfg, self.runtime, specs, self.stain, self.workers, on_tiles
            ),
            job_dir,
            overwrite,
            retry_failed,
            on_start,
            on_end,
            outdated=lambda previous: previous.info.get("settings") != key,
            inputs=lambda e: grid_inputs(job_dir, specs, e.slide_id),  # a re-tiled slide is re-extracted
        )


def run_extraction(
    job_dir: str | os.PathLike,
    cfg: ExtractConfig,
    entries: Sequence[SlideEntry] | None = None,
    overwrite: bool = False,
    retry_failed: bool = False,
    encoder: Encoder | None = None,
    **callbacks: Any,
) -> BatchSummary:
    """Extract bags for a tiled job (all its slides, or ``entries``); the Python entry point."""
    specs, tiled = extraction_slides(job_dir, cfg)
    return Extractor.build(cfg, encoder).run(
        tiled if entries is None else entries, job_dir, specs, overwrite, retry_failed, **callbacks
    )
