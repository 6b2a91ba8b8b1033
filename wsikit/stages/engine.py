"""The extraction engine: one run over many slides that keeps the device busy.

::

    planner (this thread)   claims the next slide through its lock, reads its grids, estimates its stain,
          │                 cuts each grid into segments (only as fast as they are read)
    reading                 segments → chunks of tiles: in this thread (``workers=0``) or a persistent pool
          │                 of processes, so the next slide is read while this one is encoded (reading.py)
    encoder (this thread)   chunks → full batches that may span slides → features; a batch that runs out
          │                 of device memory is retried in halves and the size kept (encode.py)
    writer thread           features back in grid order → bags renamed into place → multi-scale join →
                            status record → lock released (writing.py)

Everything slow to build (model, compiled graph, stain normalizer, reading processes) is built once per run.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsikit.bags import bag_path
from wsikit.grids import TileGrid, grid_inputs, grid_length, grid_path, read_grid
from wsikit.jobs import BatchSummary, SlideEntry, claim_slide, pending_slides
from wsikit.locks import release_lock
from wsikit.slide import open_slide
from wsikit.specs import spec_key
from wsikit.stages.encode import (
    DecodeChoice,
    Encoding,
    ExtractError,
    choose_decode,
    measure_decode,
    slide_stain,
)
from wsikit.stages.reading import Chunk, ReadFailure, ReadingPool, Segment, inline_chunks
from wsikit.stages.writing import Callbacks, GridWork, Piece, SlideWork, Writer, bag_attrs, file_state
from wsikit.tiles import TileSource, assemble_batch

#: Chunks per segment: a segment is what one reading worker reads in one go.
SEGMENT_CHUNKS = 4


@dataclass
class ExtractProgress:
    """Where a run stands (passed to ``on_progress``): tiles and slides done of those to do, rate, ETA."""

    slides_total: int = 0
    tiles_total: int = 0
    slides_done: int = 0
    tiles_done: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add_tiles(self, n: int) -> None:
        self.tiles_done += n

    def add_slide(self) -> None:
        self.slides_done += 1

    @property
    def rate(self) -> float:
        """Tiles per second since the run started."""
        return self.tiles_done / max(1e-9, time.perf_counter() - self.started)

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate (None before the first batch)."""
        return (self.tiles_total - self.tiles_done) / self.rate if self.tiles_done else None


@dataclass
class ExtractSummary(BatchSummary):
    """A run's slides (as :class:`BatchSummary`) and how fast it went: ``tiles`` encoded or skipped in
    ``seconds`` of the run (model build and start-up in ``build_seconds``, apart)."""

    tiles: int = 0
    seconds: float = 0.0
    build_seconds: float = 0.0
    batch_size: int = 0
    decode: str = ""
    parts: dict[str, float] = field(default_factory=dict)  # seconds: read_wait, model, write, ...

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0


@dataclass(eq=False)
class Part:
    """Rows of one grid waiting for a batch: grid indices [lo, hi), the ones read (``ok``, with their
    pixels on the device) and the ones that failed."""

    grid: GridWork
    lo: int
    hi: int
    ok: np.ndarray
    failed: list[tuple[int, str]]
    pixels: torch.Tensor | None

    def split(self, n: int) -> tuple[Part, Part]:
        """The part holding its first ``n`` read rows, and the rest."""
        cut = int(self.ok[n])
        first = Part(
            self.grid, self.lo, cut, self.ok[:n], [f for f in self.failed if f[0] < cut], self.pixels[:n]
        )  # type: ignore[index]
        rest = Part(
            self.grid, cut, self.hi, self.ok[n:], [f for f in self.failed if f[0] >= cut], self.pixels[n:]
        )  # type: ignore[index]
        return first, rest


class Batcher:
    """Parts in arrival order, taken as full batches regardless of slide boundaries."""

    def __init__(self) -> None:
        self.parts: deque[Part] = deque()
        self.rows = 0

    def add(self, part: Part) -> None:
        self.parts.append(part)
        self.rows += len(part.ok)

    def take(self, n: int) -> tuple[torch.Tensor, list[Piece], list[tuple[int, Any]]]:
        """(pixels, pieces, stain runs) of the next ``n`` rows (fewer when fewer are waiting)."""
        pixels, pieces, stains = [], [], []
        while n > 0 and self.parts:
            part = self.parts.popleft()
            if len(part.ok) > n:
                part, rest = part.split(n)
                self.parts.appendleft(rest)
            pixels.append(part.pixels)
            pieces.append(Piece(part.grid, part.lo, part.hi, part.ok, part.failed))
            norm = part.grid.slide.stain
            if stains and stains[-1][1] is norm:
                stains[-1] = (stains[-1][0] + len(part.ok), norm)
            else:
                stains.append((len(part.ok), norm))
            n -= len(part.ok)
            self.rows -= len(part.ok)
        return torch.cat(pixels) if len(pixels) > 1 else pixels[0], pieces, stains


class Planner:
    """Claims slides in order (just before their tiles are needed), prepares them and cuts their grids
    into segments; slides that are skipped, busy or fail to open are settled here."""

    def __init__(self, engine: Engine, entries: Sequence[SlideEntry], summary: BatchSummary,
                 writer: Writer, counts: dict[str, int]) -> None:  # fmt: skip
        self.engine, self.summary, self.writer, self.counts = engine, summary, writer, counts
        self._entries = iter(entries)
        self._queue: deque[Segment] = deque()
        self.slides: weakref.WeakValueDictionary[int, SlideWork] = weakref.WeakValueDictionary()
        self.grids: weakref.WeakValueDictionary[int, GridWork] = weakref.WeakValueDictionary()
        self._keys = 0

    def next_segment(self) -> Segment | None:
        """The next segment to read, claiming slides as needed; None when every slide is planned."""
        while not self._queue:
            entry = next(self._entries, None)
            if entry is None or (self.engine.stop is not None and self.engine.stop()):
                return None
            self._plan(entry)
        return self._queue.popleft()

    def fail(self, slide_key: int, exc: BaseException) -> None:
        """Fail a slide in flight (a reading failure)."""
        work = self.slides.get(slide_key)
        if work is not None and not work.failed:
            self.writer.put(("fail", work, exc))

    def _plan(self, entry: SlideEntry) -> None:
        eng = self.engine
        claim = claim_slide(
            eng.stage, entry, eng.job, eng.overwrite, eng.retry_failed, eng.outdated, eng.inputs
        )
        if claim.lock is None:
            claim.settle(self.summary, entry.slide_id)
            if entry.slide_id in self.counts:  # counted as to do: it is not ours after all
                eng.progress.slides_total -= 1
                eng.progress.tiles_total -= self.counts.pop(entry.slide_id)
            if eng.callbacks.on_end:
                eng.callbacks.on_end(entry, None)
            return
        lock = claim.lock
        work = SlideWork(self.new_key(), entry, lock, time.perf_counter(), claim.inputs)
        handed = False
        try:
            try:
                eng.prepare(work)
                event: tuple = ("slide", work, None)
            except Exception as exc:
                event = ("fail", work, exc)
            handed = True
            self.writer.put(event)
        finally:
            if not handed:
                release_lock(lock)
        if event[0] == "fail":
            return
        self.slides[work.key] = work
        for gw in work.grids:
            self.grids[gw.key] = gw
            self._queue.extend(eng.segments(gw))

    def new_key(self) -> int:
        self._keys += 1
        return self._keys


class Engine:
    """One run of the extraction engine over ``entries`` (see the module's docstring)."""

    def __init__(self, extractor: Any, job: Path, specs: Sequence[str], overwrite: bool, retry_failed: bool,
                 callbacks: Callbacks, stop: Callable[[], bool] | None = None) -> None:  # fmt: skip
        self.x, self.cfg, self.runtime = extractor, extractor.cfg, extractor.runtime
        self.stop = stop
        self.job, self.specs, self.overwrite, self.retry_failed = job, list(specs), overwrite, retry_failed
        self.callbacks = callbacks
        self.stage = extractor.stage
        key = self.cfg.key(self.runtime.encoder.weights_id, self.specs)
        self.outdated = lambda previous: previous.info.get("settings") != key
        self.inputs = lambda e: grid_inputs(job, self.specs, e.slide_id)  # a re-tiled slide is redone
        self.encoding = Encoding(self.runtime, extractor.batch_size)
        self.decode: DecodeChoice | None = None
        if self.cfg.decode != "auto" or self.runtime.device.type != "cuda":
            self.decode = choose_decode(self.cfg.decode, self.runtime.device.type)
        self.progress = ExtractProgress()
        self.parts = {"read_wait": 0.0, "decode": 0.0, "model": 0.0, "write_wait": 0.0}
        self.planner: Planner | None = None

    # -- planning (called by the planner) -----------------------------------------------------------
    def prepare(self, work: SlideWork) -> None:
        """Read the slide's grids and, where needed, open it (stain estimate, decoding measurement, a
        missing file's own error); fills ``work`` (its grids fine → coarse)."""
        enc, cfg = self.runtime.encoder, self.cfg
        grids = read_grids(self.job, work.entry.slide_id, self.specs)
        work.slide_path = Path(grids[0].attrs.get("slide_path") or work.entry.path)
        work.before = file_state(work.slide_path)
        if self.x.stain is not None or self.decode is None or work.before is None:  # else the readers open it
            with open_slide(
                work.slide_path, cfg.backend, mpp=grids[0].slide_mpp, slide_id=work.entry.slide_id
            ) as slide:  # type: ignore[arg-type]
                work.stain = slide_stain(self.runtime, self.x.stain, slide, grids[0], cfg.stain_sample)
                if self.decode is None:
                    self.decode = self._measure_decode(slide, grids[0])
        stain = work.stain.describe() if work.stain is not None else None
        described = enc.describe()
        for grid in grids:
            dest = bag_path(self.job, grid.spec.name, enc.name, work.entry.slide_id, cfg.fmt)
            tile_mpp = grid.effective_mpp or grid.spec.mpp
            seen = enc.input_mpp(tile_mpp, grid.spec.size)
            attrs = bag_attrs(grid, work.slide_path, self.runtime.describe(), described, stain, cfg, seen)
            off = enc.resolution_warning(tile_mpp, grid.spec.size, grid.spec.name)
            work.grids.append(GridWork(self.planner.new_key(), work, grid, dest, attrs, off))  # type: ignore[union-attr]
        work.info = {
            "tiles": {}, "skipped": {}, "tiles_per_s": {}, "seconds": {},
            "runtime": self.runtime.describe(), "reader": cfg.reader, "decode": self.decode.where,
            "batch_size": self.encoding.batch_size,
            "settings": cfg.key(enc.weights_id, [g.spec.name for g in grids]),
            "encoder": enc.name, "weights_id": enc.weights_id,
            "stain": stain["method"] if stain else None,
        }  # fmt: skip

    def _measure_decode(self, slide: Any, grid: TileGrid) -> DecodeChoice:
        """``--decode auto`` on a GPU: CPU workers or nvJPEG, measured once on the run's first slide."""
        source = TileSource(
            slide, grid.coords[:256], grid.size_level0, self.runtime.encoder.read_size, self.cfg.reader
        )
        try:
            rates = measure_decode(source, self.runtime, self.x.workers)
        finally:
            source.close()
        cpu, gpu = rates if rates is not None else (None, None)
        return choose_decode("auto", "cuda", cpu, gpu, self.x.model_rate)

    def segments(self, gw: GridWork) -> list[Segment]:
        """A grid's tiles as segments of :data:`SEGMENT_CHUNKS` chunks of a batch each."""
        work, grid, chunk = gw.slide, gw.grid, self.encoding.batch_size
        ship = self.decode is not None and self.decode.where == "gpu"
        step = chunk * SEGMENT_CHUNKS
        common = (grid.size_level0, self.runtime.encoder.read_size, work.slide_path, work.entry.slide_id)
        tail = (grid.slide_mpp, self.cfg.backend, self.cfg.reader, ship, chunk)
        return [
            Segment(work.key, gw.key, i, lo, grid.coords[lo : lo + step], *common, *tail)  # type: ignore[arg-type]
            for i, lo in enumerate(range(0, len(grid), step))
        ]

    # -- the run ------------------------------------------------------------------------------------
    def run(self, entries: Sequence[SlideEntry]) -> ExtractSummary:
        """Extract every slide of ``entries`` that needs it; returns the run's summary."""
        summary = ExtractSummary()
        counts = self._counts(entries)
        self.progress = ExtractProgress(len(counts), sum(counts.values()))
        depth = 2 if self.runtime.device.type == "cuda" else 1  # batches the writer may lag behind
        enc = self.runtime.encoder
        writer = Writer(
            self.job, self.cfg, self.stage, enc.name, enc.dim, summary, self.callbacks, self.progress, depth
        )
        self.planner = Planner(self, entries, summary, writer, counts)
        chunks = self._chunks()
        t0 = time.perf_counter()
        try:
            self._loop(chunks, writer)
        except BaseException:
            writer.close(abort=True)
            raise
        finally:
            chunks.close()  # type: ignore[attr-defined]
        writer.close()
        summary.seconds = time.perf_counter() - t0
        summary.tiles, summary.batch_size = self.progress.tiles_done, self.encoding.batch_size
        summary.decode = self.decode.where if self.decode else "cpu"
        summary.parts = {**{k: round(v, 3) for k, v in self.parts.items()}, "write": round(writer.seconds, 3)}
        return summary

    def _counts(self, entries: Sequence[SlideEntry]) -> dict[str, int]:
        """Tiles of each slide to do (for progress totals)."""
        todo = pending_slides(
            self.stage, entries, self.job, self.overwrite, self.retry_failed, self.outdated, self.inputs
        )
        return {
            e.slide_id: sum(grid_length(grid_path(self.job, s, e.slide_id)) for s in self.specs) for e in todo
        }

    def _chunks(self) -> Iterator[Chunk | ReadFailure]:
        assert self.planner is not None
        if self.x.workers == 0:
            return inline_chunks(self.planner.next_segment, torch.get_num_threads())
        pool = ReadingPool(self.x.workers, self.runtime.device.type == "cuda", self.cfg.read_timeout)
        return pool.chunks(self.planner.next_segment)

    def _loop(self, chunks: Iterator[Chunk | ReadFailure], writer: Writer) -> None:
        planner, batcher = self.planner, Batcher()
        assert planner is not None
        while True:
            t = time.perf_counter()
            item = next(chunks, None)
            self.parts["read_wait"] += time.perf_counter() - t
            if item is None:
                break
            if isinstance(item, ReadFailure) or item.failure:
                planner.fail(
                    item.slide_key,
                    ExtractError(item.message if isinstance(item, ReadFailure) else item.failure),
                )
                continue
            gw = planner.grids.get(item.key)
            if gw is None or gw.slide.failed:
                continue
            part = self._part(item, gw)
            if len(part.ok):
                batcher.add(part)
            else:
                writer.put(("rows", None, [Piece(gw, part.lo, part.hi, part.ok, part.failed)]))
            while batcher.rows >= self.encoding.batch_size:
                self._encode(batcher, self.encoding.batch_size, writer)
        while batcher.rows:
            self._encode(batcher, self.encoding.batch_size, writer)

    def _part(self, chunk: Chunk, gw: GridWork) -> Part:
        """A chunk's readable rows with their pixels on the device (JPEG streams decoded there)."""
        t = time.perf_counter()
        gw.t_first = gw.t_first or t
        n = len(chunk.errors)
        ok = np.array([not e for e in chunk.errors], bool)
        index = np.arange(chunk.start, chunk.start + n)
        failed = [(int(index[i]), chunk.errors[i]) for i in np.nonzero(~ok)[0]]
        pixels = None
        if ok.any():
            pixels = assemble_batch(chunk.batch, self.runtime.encoder.read_size, self.runtime.device)  # type: ignore[arg-type]
            pixels = pixels if ok.all() else pixels[torch.from_numpy(ok).to(pixels.device)]
        self.parts["decode"] += time.perf_counter() - t
        return Part(gw, chunk.start, chunk.start + n, index[ok], failed, pixels)

    def _padded(self, rows: int) -> int:
        """Rows a batch of ``rows`` is padded to, so a tile's features never depend on which slides share
        its batch: the full batch size on a GPU or with a compiled graph (one shape: the same kernels, no
        recompilation); on a CPU only a lone tile is padded to two, since oneDNN runs a batch of one
        through other kernels while any other partial batch gives the full batch's bits (measured for
        efficientnet-lite0, ResNet-18/50, ViT-S in fp32 and bf16)."""
        if self.runtime.compiled or self.runtime.device.type == "cuda":
            return max(rows, self.encoding.batch_size)
        return max(rows, min(2, self.encoding.batch_size))

    def _encode(self, batcher: Batcher, n: int, writer: Writer) -> None:
        """Encode the next ``n`` waiting rows and hand their features to the writer."""
        pixels, pieces, stains = batcher.take(n)
        rows = len(pixels)
        t = time.perf_counter()
        target = self._padded(rows)
        if rows < target:
            pad = self.runtime.zeros(target - rows)
            pixels, stains = torch.cat([pixels.to(pad.device), pad]), [*stains, (len(pad), None)]
        feats = self.encoding(pixels, stains)[:rows]
        if self.runtime.device.type == "cuda":  # copy back while the next batch runs
            host = torch.empty(feats.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(feats.float(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            feats = (host, event)
        self.parts["model"] += time.perf_counter() - t
        t = time.perf_counter()
        writer.put(("rows", feats, pieces))
        self.parts["write_wait"] += time.perf_counter() - t


def read_grids(job: Path, slide_id: str, specs: Sequence[str]) -> list[TileGrid]:
    """The slide's grids for ``specs``, fine → coarse."""
    grids = []
    for name in specs:
        path = grid_path(job, name, slide_id)
        if not path.is_file():
            raise ExtractError(f"{path}: no coordinates for {slide_id} at {name}; run `wsikit tile` first")
        grids.append(read_grid(path))
    return sorted(grids, key=lambda g: spec_key(g.spec))
