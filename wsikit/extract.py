"""Batched feature extraction: tiles of a job's grids → encoder → one feature bag per slide and spec.

Per slide and spec, a :class:`wsikit.native.TileItems` dataset reads each tile of the grid in DataLoader
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
import ctypes
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from wsikit.bags import BagWriter, bag_path, new_attrs, read_bag, write_bag
from wsikit.encoders import Encoder, get_encoder
from wsikit.jobs import (
    BatchSummary,
    JobError,
    SlideEntry,
    StageResult,
    Status,
    allotted_cpus,
    clear_stale_temps,
    read_status,
    run_batch,
)
from wsikit.native import READERS, TileItems, TileSource, assemble_batch, collate_items
from wsikit.slide import Slide, open_slide
from wsikit.tiling import TileGrid, grid_path, list_specs, read_grid, read_tile

STAGE = "extract"
_MAX_RECORDED_ERRORS = 50


class ExtractError(RuntimeError):
    """An extraction request that cannot run; the message says what to change."""


def stage_name(encoder_name: str) -> str:
    """Status stage of an encoder: ``extract-<encoder>`` (``/`` and ``:`` become ``_``)."""
    return f"{STAGE}-{encoder_name.replace('/', '_').replace(':', '_')}"


# -- run-time tuning -----------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def tune_malloc() -> bool:
    """Stop glibc returning large blocks to the kernel after every batch (the page-fault cost of big
    activations); returns whether it applied. Off with ``WSIKIT_TUNE_MALLOC=0``; a no-op off glibc."""
    if os.environ.get("WSIKIT_TUNE_MALLOC", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        return False
    return bool(ok)


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExtractError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    return dev


def resolve_precision(precision: str, device: torch.device, encoder: Encoder) -> torch.dtype | None:
    """Autocast dtype for ``precision`` (auto | fp32 | bf16 | fp16) on ``device``; None means fp32."""
    if precision == "auto":
        precision = encoder.precision if device.type == "cuda" else "bf16" if cpu_has_bf16() else "fp32"
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ExtractError(f"--precision {precision!r}: use auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type == "cpu":
        raise ExtractError("--precision fp16 is for GPUs; use bf16 or fp32 on a CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return table[precision]


# -- reading tiles ------------------------------------------------------------------------------------
def _worker_init(_: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.reopen()  # type: ignore[union-attr]


def default_workers(device: torch.device, cpus: int | None = None) -> int:
    """DataLoader workers: on a GPU all allotted CPUs but one (≤ 16). On a CPU the model already uses
    every allotted core and reading costs 2–3 ms of CPU per tile (5–10% of a bf16 ResNet-50 forward);
    a reader process then only competes with the model's threads, which all wait for the slowest one,
    so small CPU jobs (≤ 8 CPUs) read in the main process and larger ones use one reader per 8 CPUs."""
    cpus = cpus or allotted_cpus()
    if device.type == "cuda":
        return max(1, min(16, cpus - 1))
    return 0 if cpus <= 8 else cpus // 8


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
    # tiles through wsikit.native (docs/readers.md): compressed file tiles where exact, read_region
    # elsewhere; on a GPU, workers ship whole JPEG tiles as bytes and nvJPEG decodes each batch
    source = TileSource(slide, grid.coords, grid.size_level0, runtime.encoder.read_size, reader)
    dataset = TileItems(source, ship_streams=runtime.device.type == "cuda")
    loader = DataLoader(
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

    batches = iter(loader)
    while True:
        t = time.perf_counter()
        try:
            item = next(batches, None)
        except RuntimeError as exc:  # a worker that died (killed, out of memory, a crash in a reader)
            if "DataLoader timed out" in str(exc):
                raise ExtractError(
                    f"{slide.path}: no tiles from the reading workers for {read_timeout:g} s (a stalled read "
                    "on network storage?); rerun with --retry-failed, or raise --read-timeout"
                ) from exc
            if "DataLoader worker" not in str(exc):
                raise
            raise ExtractError(
                f"{slide.path}: a tile-reading worker died ({exc}); rerun with --retry-failed "
                "(--workers 0 shows a reader crash's own error)"
            ) from exc
        times["read_wait"] += time.perf_counter() - t
        if item is None:
            break
        batch, index, errors = item
        t = time.perf_counter()
        pixels = assemble_batch(batch, runtime.encoder.read_size, runtime.device)
        times["read_wait"] += time.perf_counter() - t
        ok = np.array([not e for e in errors])
        idx = index.numpy()
        t = time.perf_counter()
        feats = runtime.forward(pixels if ok.all() else pixels[torch.from_numpy(ok)])
        times["model"] += time.perf_counter() - t
        if pending is not None:
            flush()
        pending = (feats, idx[ok])
        for pos in np.nonzero(~ok)[0]:
            x, y = (int(v) for v in grid.coords[idx[pos]])
            skipped.append((x, y, errors[pos]))
    if pending is not None:
        flush()
    if skipped:
        writer.skip(np.array([(x, y) for x, y, _ in skipped], np.int64))
    return skipped


# -- one slide -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtractConfig:
    """Settings of an extraction run; ``key()`` fingerprints what changes the bags."""

    encoder: str = "resnet50-trunc"
    embedding: str | None = None  # None: the encoder's own rule (wsikit.encoders.pooling)
    weights: Path | None = None
    pretrained: bool = True  # False: random initialisation (timing and tests only; weights_id "random")
    specs: tuple[str, ...] = ()  # spec names; empty: every spec tiled in the job
    batch_size: int = 64
    workers: int | None = None  # None: default_workers(device)
    device: str = "auto"
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
            raise ExtractError(f"--reader {self.reader!r}: use one of {', '.join(READERS)}")
        if self.fmt not in ("h5", "zarr"):
            raise ExtractError(f"--format {self.fmt!r}: use h5 or zarr")
        if self.batch_size < 1:
            raise ExtractError(f"--batch-size {self.batch_size}: must be ≥ 1")
        if self.read_timeout < 0:
            raise ExtractError(f"--read-timeout {self.read_timeout}: must be ≥ 0 (0: no limit)")

    def key(self, weights_id: str, specs: Sequence[str]) -> str:
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
        return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


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


def _input_mpp(grid: TileGrid, encoder: Encoder) -> float | None:
    """µm/px of the pixels the model sees: the tiles' resolution scaled by the resize to its input."""
    mpp = grid.effective_mpp or grid.spec.mpp
    return round(mpp * grid.spec.size / encoder.read_size, 4) if mpp else None


def resolution_warning(grid: TileGrid, encoder: Encoder, tolerance: float = 0.25) -> str | None:
    """A warning when the model sees tiles more than ``tolerance`` off its training resolution."""
    seen = _input_mpp(grid, encoder)
    if not seen or not encoder.mpp or abs(seen / encoder.mpp - 1) <= tolerance:
        return None
    return (
        f"{encoder.name} was trained at {encoder.mpp:g} µm/px but sees {seen:g} µm/px at {grid.spec.name} "
        f"({grid.spec.size} px tiles resized to {encoder.read_size}); tile at "
        f"{encoder.mpp * encoder.read_size / grid.spec.size:.3g} µm/px to match"
    )


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
        encoder_input_mpp=_input_mpp(grid, runtime.encoder),
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
    base = read_bag(paths[fine.spec.name])
    rows = base.tile_index if base.tile_index is not None else np.arange(len(base))
    for grid in coarse:
        other = read_bag(paths[grid.spec.name])
        lut = np.full(len(grid), -1, np.int64)
        if other.tile_index is not None:
            lut[other.tile_index] = np.arange(len(other))
        parent = fine.parents[grid.spec.name][rows]
        row = np.full(len(parent), -1, np.int64)
        row[parent >= 0] = lut[parent[parent >= 0]]  # a coarse grid may keep no tile at all
        feats = np.zeros((len(base), other.dim), other.features.dtype)
        feats[row >= 0] = other.features[row[row >= 0]]
        base.context[grid.spec.name] = feats
        base.context_index[grid.spec.name] = row
    name = "+".join(g.spec.name for g in [fine, *coarse])
    base.attrs.update(tile_spec=name, multiscale_specs=[g.spec.name for g in [fine, *coarse]])
    base.attrs.pop("source_format", None)
    base.attrs.pop("coords_unit", None)
    dest = bag_path(job, name, encoder_name, slide_id, fmt)
    clear_stale_temps(dest)
    return write_bag(dest, base, fmt=fmt)


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
    grids = []
    for name in specs:
        path = grid_path(job, name, entry.slide_id)
        if not path.is_file():
            raise ExtractError(
                f"{path}: no coordinates for {entry.slide_id} at {name}; run `wsikit tile` first"
            )
        grids.append(read_grid(path))
    grids.sort(key=lambda g: (g.spec.size * g.spec.mpp, g.spec.mpp))
    slide_path = Path(grids[0].attrs.get("slide_path") or entry.path)
    outputs: list[str] = []
    warnings: list[str] = []
    info: dict[str, Any] = {"tiles": {}, "skipped": {}, "tiles_per_s": {}, "seconds": {}}
    info["runtime"] = runtime.describe()
    info["reader"] = cfg.reader
    before = _file_state(slide_path)
    with open_slide(slide_path, cfg.backend, mpp=grids[0].slide_mpp, slide_id=entry.slide_id) as slide:  # type: ignore[arg-type]
        slide_stain = None
        if stain is not None:
            sample = _stain_sample(slide, grids[0], cfg.stain_sample, runtime.encoder.read_size)
            slide_stain = stain.for_slide(sample.to(runtime.device)) if len(sample) else stain
        run = Runtime(runtime.encoder, runtime.device, runtime.autocast, runtime.channels_last, slide_stain)
        stain_info = slide_stain.describe() if slide_stain is not None else None
        paths: dict[str, Path] = {}
        for grid in grids:
            dest = bag_path(job, grid.spec.name, runtime.encoder.name, entry.slide_id, cfg.fmt)
            clear_stale_temps(dest)  # a killed run's leftovers (run_batch holds the slide's lock)
            attrs = _bag_attrs(grid, slide, run, stain_info, cfg)
            t0 = time.perf_counter()
            parts: dict[str, float] = {}
            with BagWriter(
                dest,
                runtime.encoder.dim,
                attrs,
                grid.attrs,
                cfg.fmt,
                "float16" if cfg.fp16_features else "float32",
                cfg.compression,
            ) as writer:
                skipped = extract_grid(
                    slide,
                    grid,
                    run,
                    writer,
                    cfg.batch_size,
                    workers,
                    on_tiles,
                    parts,
                    cfg.reader,
                    cfg.read_timeout,
                )
                writer.attrs["skipped_errors"] = [
                    f"({x}, {y}): {e}" for x, y, e in skipped[:_MAX_RECORDED_ERRORS]
                ]
                if (now := _file_state(slide_path)) != before:  # raised inside: the bag is not kept
                    raise ExtractError(
                        f"{slide_path}: the slide file {'disappeared' if now is None else 'changed'} "
                        f"during extraction at {grid.spec.name}; restore it and rerun with --retry-failed"
                    )
            seconds = time.perf_counter() - t0
            paths[grid.spec.name] = dest
            outputs.append(str(dest))
            info["tiles"][grid.spec.name] = len(grid) - len(skipped)
            info["skipped"][grid.spec.name] = [[x, y] for x, y, _ in skipped]
            info["tiles_per_s"][grid.spec.name] = round(len(grid) / seconds, 2) if seconds > 0 else None
            info["seconds"][grid.spec.name] = {
                "total": round(seconds, 3),
                **{k: round(v, 3) for k, v in parts.items()},
            }
            if skipped:
                warnings.append(
                    f"{len(skipped)} of {len(grid)} tiles at {grid.spec.name} could not be read and were "
                    f"skipped, e.g. ({skipped[0][0]}, {skipped[0][1]}): {skipped[0][2]}"
                )
            if len(grid) == 0:
                warnings.append(f"no tiles at {grid.spec.name}: wrote an empty (0, D) bag")
            if (off := resolution_warning(grid, runtime.encoder)) is not None:
                warnings.append(off)
        if cfg.multiscale and len(grids) > 1:
            joined = _join_multiscale(job, grids, paths, runtime.encoder.name, entry.slide_id, cfg.fmt)
            if joined is not None:
                outputs.append(str(joined))
    info["settings"] = cfg.key(runtime.encoder.weights_id, [g.spec.name for g in grids])
    info["encoder"] = runtime.encoder.name
    info["weights_id"] = runtime.encoder.weights_id
    info["stain"] = stain_info["method"] if stain_info else None
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
    if (job / "status" / "tile").is_dir():
        ids = {i for i in ids if (st := read_status(job, "tile", i)) is not None and st.state == "done"}
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
    if not names:
        return available
    missing = [n for n in names if n not in available]
    if missing:
        raise ExtractError(
            f"{job_dir}: no coordinates for {', '.join(missing)}; tiled specs are {', '.join(available)}"
        )
    return [n for n in available if n in names]


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
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(allotted_cpus())
        device = resolve_device(cfg.device)
        enc = encoder or get_encoder(cfg.encoder, cfg.weights, cfg.pretrained, device, cfg.embedding)
        enc.model.to(device)
        prepare_model(enc, cfg.channels_last, cfg.compile)
        autocast = resolve_precision(cfg.precision, device, enc)
        stain = None
        if cfg.stain is not None:
            from wsikit.stain import load_normalizer

            stain = load_normalizer(cfg.stain)
        workers = default_workers(device) if cfg.workers is None else cfg.workers
        return cls(cfg, Runtime(enc, device, autocast, cfg.channels_last), workers, stain)

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
        stage = stage_name(self.runtime.encoder.name)
        key = self.cfg.key(self.runtime.encoder.weights_id, specs)
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
    specs = resolve_specs(job_dir, cfg.specs)
    if entries is None:
        entries = job_slides(job_dir, specs)
    if not entries:
        raise JobError(f"{job_dir}: no tiled slides with coordinates for {', '.join(specs)}")
    return Extractor.build(cfg, encoder).run(entries, job_dir, specs, overwrite, retry_failed, **callbacks)
