"""The extraction engine's writer thread: features back in grid order → each bag streamed to its temporary
file and renamed into place when its last tile is in → the slide's multi-scale join → its status record →
its lock released. A slide that fails (a bag that cannot be written, a slide file changed meanwhile, a
reading failure) loses its temporary files and is recorded failed; the run goes on. A status record that
cannot be written stops the run (:class:`wsikit.jobs.JobError`) with every slide in flight cleaned up.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsikit.bags import BagWriter, bag_path, join_context, new_attrs, read_bag, write_bag
from wsikit.grids import TileGrid
from wsikit.io import clear_stale_temps
from wsikit.jobs import BatchSummary, JobError, SlideEntry, StageResult, Status, record_slide
from wsikit.locks import release_lock
from wsikit.settings import ExtractConfig
from wsikit.stages.encode import ExtractError

_MAX_RECORDED_ERRORS = 50


@dataclass(eq=False)
class SlideWork:
    """A claimed slide in flight: its lock, grids, stain normalizer and what its record will say."""

    key: int
    entry: SlideEntry
    lock: Path
    t0: float
    inputs: str | None = None  # fingerprint of the slide's grids, kept in its record
    grids: list[GridWork] = field(default_factory=list)
    slide_path: Path | None = None
    before: tuple[int, int, int] | None = None  # (inode, size, mtime) when reading began
    stain: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    failed: bool = False
    grids_done: int = 0


@dataclass(eq=False)
class GridWork:
    """One spec of a slide in flight: rows arrive in any order and are written in grid order."""

    key: int
    slide: SlideWork
    grid: TileGrid
    dest: Path
    attrs: dict[str, Any]
    off_resolution: str | None = None  # the warning when the encoder sees another µm/px than it expects
    next: int = 0  # grid index up to which rows are written (or skipped)
    pending: dict[int, tuple] = field(default_factory=dict)  # lo -> (hi, ok rows, failed, features)
    skipped: list[tuple[int, int, str]] = field(default_factory=list)
    bag: BagWriter | None = None
    t_first: float | None = None  # when its first tiles reached the engine
    seconds: float = 0.0  # from its first tiles to its bag in place


@dataclass
class Piece:
    """Consecutive grid rows [lo, hi) of one batch: the rows encoded (``ok``) and those that failed to read."""

    grid: GridWork
    lo: int
    hi: int
    ok: np.ndarray
    failed: list[tuple[int, str]]


def file_state(path: Path | None) -> tuple[int, int, int] | None:
    """(inode, size, mtime) of a file, or None when it is gone."""
    try:
        st = path.stat()  # type: ignore[union-attr]
    except (OSError, AttributeError):
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def bag_attrs(grid: TileGrid, slide_path: Path, runtime: dict[str, Any], encoder: dict[str, Any],
              stain: dict[str, Any] | None, cfg: ExtractConfig, input_mpp: float | None) -> dict[str, Any]:  # fmt: skip
    """A bag's attributes (docs/feature-bag.md); ``input_mpp``: µm/px of the pixels the model saw."""
    return new_attrs(
        slide_id=grid.slide_id,
        slide_path=str(slide_path),
        slide_mpp=grid.slide_mpp,
        encoder=encoder["name"],
        encoder_arch=encoder["arch"],
        encoder_dim=encoder["dim"],
        encoder_embedding=encoder["embedding"],
        weights_id=encoder["weights_id"],
        encoder_expected_mpp=encoder["expected_mpp"],
        encoder_input_mpp=input_mpp,
        preprocessing={
            **encoder["preprocessing"],
            "read": "best pyramid level, one area resample to read size",
        },
        stain=stain,
        tile_spec=grid.spec.name,
        tile_mpp=grid.spec.mpp,
        tile_size=grid.spec.size,
        tile_overlap=grid.spec.overlap,
        tile_effective_mpp=grid.effective_mpp,
        size_level0=grid.size_level0,
        runtime=runtime,
        settings=cfg.key(encoder["weights_id"], [grid.spec.name]),
    )


def join_multiscale(job: Path, work: SlideWork, encoder_name: str, fmt: str) -> Path | None:
    """Write the finest spec's bag with each coarser spec's parent features as ``context``."""
    fine = work.grids[0].grid
    coarse = [g for g in work.grids[1:] if g.grid.spec.name in fine.parents]
    if not coarse:
        return None
    contexts = [
        (g.grid.spec.name, read_bag(g.dest), fine.parents[g.grid.spec.name], len(g.grid)) for g in coarse
    ]
    joined = join_context(read_bag(work.grids[0].dest), contexts)
    dest = bag_path(job, joined.attrs["tile_spec"], encoder_name, work.entry.slide_id, fmt)
    clear_stale_temps(dest)
    return write_bag(dest, joined, fmt=fmt)


def record_grid(info: dict[str, Any], gw: GridWork, seconds: float) -> list[str]:
    """A spec's counts and timing in the slide's status info; returns its warnings."""
    grid, skipped, name = gw.grid, gw.skipped, gw.grid.spec.name
    info["tiles"][name] = len(grid) - len(skipped)
    info["skipped"][name] = [[x, y] for x, y, _ in skipped]
    info["tiles_per_s"][name] = round(len(grid) / seconds, 2) if seconds > 0 else None
    info["seconds"][name] = {"total": round(seconds, 3)}
    warnings = []
    if skipped:
        x, y, error = skipped[0]
        warnings.append(
            f"{len(skipped)} of {len(grid)} tiles at {name} could not be read and were skipped, "
            f"e.g. ({x}, {y}): {error}"
        )
    if len(grid) == 0:
        warnings.append(f"no tiles at {name}: wrote an empty (0, D) bag")
    if gw.off_resolution is not None:
        warnings.append(gw.off_resolution)
    return warnings


@dataclass
class Callbacks:
    """What a run reports as it goes (each optional; called from the writer thread)."""

    on_start: Callable[[SlideEntry], None] | None = None
    on_end: Callable[[SlideEntry, Status | None], None] | None = None
    on_tiles: Callable[[int], None] | None = None
    on_progress: Callable[[Any], None] | None = None


class Writer:
    """The writer thread. Events (in order): ``("slide", work)`` registers a prepared slide; ``("rows",
    features, pieces)`` writes encoded rows; ``("fail", work, exc)`` fails a slide; ``None`` ends."""

    def __init__(self, job: Path, cfg: ExtractConfig, stage: str, encoder: str, dim: int,
                 summary: BatchSummary, callbacks: Callbacks, progress: Any, depth: int) -> None:  # fmt: skip
        self.job, self.cfg, self.stage, self.encoder, self.dim = job, cfg, stage, encoder, dim
        self.summary, self.callbacks, self.progress = summary, callbacks, progress
        self.events: queue.Queue = queue.Queue(maxsize=depth)
        self.active: dict[int, SlideWork] = {}
        self.fatal: BaseException | None = None
        self.seconds = 0.0
        self._abort = False
        self._thread = threading.Thread(target=self._loop, name="wsikit-writer", daemon=True)
        self._thread.start()

    # -- the engine's side -----------------------------------------------------------------------------
    def put(self, event: tuple | None) -> None:
        """Queue an event (blocks while the writer is ``depth`` events behind); raises a fatal error."""
        while self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self.events.put(event, timeout=0.2)
                break
        if self.fatal is not None:
            raise self.fatal

    def close(self, abort: bool = False) -> None:
        """Finish (or with ``abort``, drop every slide in flight unrecorded) and wait for the thread."""
        self._abort = self._abort or abort
        with contextlib.suppress(Exception):
            self.put(None)
        self._thread.join()
        if self.fatal is not None and not abort:
            raise self.fatal

    # -- the thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            event = self.events.get()
            if event is None:
                break
            if self.fatal is not None or self._abort:  # stopping: only let go of new slides' locks
                if event[0] in ("slide", "fail") and event[1].key not in self.active:
                    release_lock(event[1].lock)
                continue
            t0 = time.perf_counter()
            try:
                self._handle(event)
            except BaseException as exc:  # a status record that cannot be written (JobError), or a bug:
                self.fatal = exc  # the run stops rather than record wrong things
            self.seconds += time.perf_counter() - t0
        if self.fatal is not None or self._abort:
            for work in list(self.active.values()):
                self._drop(work, RuntimeError("the run stopped"))
                release_lock(work.lock)

    def _handle(self, event: tuple) -> None:
        kind, a, b = event
        if kind in ("slide", "fail") and a.key not in self.active and self.callbacks.on_start:
            self.callbacks.on_start(a.entry)  # in order with the rows written before it
        if kind == "slide":
            self.active[a.key] = a
            for gw in a.grids:
                if len(gw.grid) == 0:
                    self._finish_grid(gw)
        elif kind == "fail":
            self.active.setdefault(a.key, a)
            self._fail(a, b)
        else:
            self._rows(a, b)

    def _rows(self, features: Any, pieces: list[Piece]) -> None:
        host = _to_host(features)
        row = written = done = 0
        for p in pieces:
            n = len(p.ok)
            done += p.hi - p.lo
            if not p.grid.slide.failed:
                written += n
                p.grid.pending[p.lo] = (
                    p.hi,
                    p.ok,
                    p.failed,
                    host[row : row + n] if host is not None else None,
                )
                self._drain(p.grid)
            row += n
        self.progress.add_tiles(done)
        if self.callbacks.on_tiles and written:
            self.callbacks.on_tiles(written)
        if self.callbacks.on_progress:
            self.callbacks.on_progress(self.progress)

    def _drain(self, gw: GridWork) -> None:
        """Append the rows that continue the grid in order; finish the bag when its last row is in."""
        try:
            while gw.next in gw.pending:
                hi, ok, failed, feats = gw.pending.pop(gw.next)
                if gw.bag is None:
                    self._open(gw)
                if len(ok):
                    gw.bag.append(feats, gw.grid.coords[ok], ok)  # type: ignore[union-attr]
                gw.skipped += [(*(int(v) for v in gw.grid.coords[i]), e) for i, e in failed]  # type: ignore[misc]
                gw.next = hi
            if gw.next == len(gw.grid):
                self._finish_grid(gw)
        except (JobError, KeyboardInterrupt):
            raise
        except Exception as exc:
            self._fail(gw.slide, exc)

    def _open(self, gw: GridWork) -> None:
        clear_stale_temps(gw.dest)  # a killed run's leftovers (this process holds the slide's lock)
        features = "float16" if self.cfg.fp16_features else "float32"
        bag = BagWriter(
            gw.dest, self.dim, gw.attrs, gw.grid.attrs, self.cfg.fmt, features, self.cfg.compression
        )
        gw.bag = bag.__enter__()
        gw.t_first = gw.t_first or time.perf_counter()

    def _finish_grid(self, gw: GridWork) -> None:
        work = gw.slide
        try:
            if gw.bag is None:
                self._open(gw)
            bag = gw.bag
            if gw.skipped:
                bag.skip(np.array([(x, y) for x, y, _ in gw.skipped], np.int64))  # type: ignore[union-attr]
            bag.attrs["skipped_errors"] = [
                f"({x}, {y}): {e}" for x, y, e in gw.skipped[:_MAX_RECORDED_ERRORS]
            ]  # type: ignore[union-attr]
            if (now := file_state(work.slide_path)) != work.before:  # raised inside: the bag is not kept
                raise ExtractError(
                    f"{work.slide_path}: the slide file {'disappeared' if now is None else 'changed'} during "
                    f"extraction at {gw.grid.spec.name}; restore it and rerun with --retry-failed"
                )
            gw.bag = None
            bag.__exit__(None, None, None)  # type: ignore[union-attr]
        except (JobError, KeyboardInterrupt):
            raise
        except Exception as exc:
            self._fail(work, exc)
            return
        gw.seconds = time.perf_counter() - (gw.t_first or work.t0)
        work.grids_done += 1
        if work.grids_done == len(work.grids):
            self._finish_slide(work)

    def _finish_slide(self, work: SlideWork) -> None:
        for gw in work.grids:  # in grid order (fine → coarse), whichever finished first
            work.outputs.append(str(gw.dest))
            work.warnings += record_grid(work.info, gw, gw.seconds)
        try:
            if self.cfg.multiscale and len(work.grids) > 1:
                joined = join_multiscale(self.job, work, self.encoder, self.cfg.fmt)
                if joined is not None:
                    work.outputs.append(str(joined))
        except Exception as exc:
            self._fail(work, exc)
            return
        self._record(work, StageResult(work.outputs, work.info, work.warnings))

    def _fail(self, work: SlideWork, exc: BaseException) -> None:
        if not work.failed:
            self._record(work, self._drop(work, exc))

    def _drop(self, work: SlideWork, exc: BaseException) -> BaseException:
        """Remove a slide's unfinished bags (temporary files) and forget its rows; returns the error to
        record (a bag's own one-line disk error where closing it gives one)."""
        work.failed, reason = True, exc
        for gw in work.grids:
            gw.pending.clear()
            if gw.bag is not None:
                bag, gw.bag = gw.bag, None
                try:
                    bag.__exit__(type(exc), exc, exc.__traceback__)
                except Exception as err:  # e.g. "could not write a bag there (File too large)…"
                    reason = err if reason is exc else reason
        self.active.pop(work.key, None)
        return reason

    def _record(self, work: SlideWork, result: StageResult | BaseException) -> None:
        try:
            status = record_slide(
                self.job, self.stage, work.entry.slide_id, result, time.perf_counter() - work.t0, work.inputs
            )
        finally:
            self.active.pop(work.key, None)
            release_lock(work.lock)
        (self.summary.failed if status.state == "failed" else self.summary.done).append(status)
        self.progress.add_slide()
        if self.callbacks.on_end:
            self.callbacks.on_end(work.entry, status)
        if self.callbacks.on_progress:
            self.callbacks.on_progress(self.progress)


def _to_host(features: Any) -> np.ndarray | None:
    """Features as a float32 numpy array (a device copy started by the engine is waited for here)."""
    if features is None:
        return None
    if isinstance(features, tuple):  # (pinned host tensor, CUDA event)
        host, event = features
        event.synchronize()
        return host.numpy()
    return features.float().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
