"""Reading tiles for the extraction engine: grids cut into segments, each read by one worker into chunks.

A :class:`Segment` is a run of one grid's tiles (its coordinates travel with it). With ``workers=0``
segments are read in the engine's own thread (:func:`inline_chunks`); otherwise a persistent pool of
DataLoader worker processes pulls segments from a shared queue (:class:`ReadingPool`), so every worker
opens each slide once, the next slide is read while the current one is encoded, and a big slide's segments
spread over all workers. Chunks of one segment arrive in order; chunks of different segments interleave
(the engine writes each grid's rows back in grid order).

A worker that dies or stalls fails the slide it was reading (the shared slot table says which); the pool
is restarted and every other segment in flight is read again from where it stopped.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import re
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from wsikit.io import one_line
from wsikit.slide import Slide, open_slide
from wsikit.stages.encode import ExtractError
from wsikit.tiles import TileBatch, TileItems, TileSource, collate_items

SLIDES_PER_WORKER = 4  # open slides cached per reading process
MAX_RESTARTS = 5  # pool restarts in a row, nothing delivered in between, before the run stops
_SLOT = 4  # per worker: pid, grid key and segment number (-1: none), reading since (time.time(); 0: not)


@dataclass(frozen=True)
class Segment:
    """A run of one grid's tiles, read by one worker (picklable: it crosses to the workers)."""

    slide_key: int
    key: int  # the grid's key in the run
    seq: int  # segment number within the grid
    start: int  # grid index of the first tile
    coords: np.ndarray  # (n, 2) level-0 top-left of its tiles
    size_level0: int
    out_size: int
    slide_path: Path
    slide_id: str
    slide_mpp: float | None
    backend: str
    reader: str
    ship_streams: bool  # JPEG tiles travel as bytes, for the GPU to decode
    chunk: int  # tiles per chunk

    def __len__(self) -> int:
        return len(self.coords)

    def rest(self, parts: int) -> Segment:
        """The tiles after its first ``parts`` chunks."""
        skip = parts * self.chunk
        return replace(self, start=self.start + skip, coords=self.coords[skip:])


@dataclass
class Chunk:
    """Up to ``segment.chunk`` consecutive tiles of a grid, read: payloads, grid indices, errors."""

    slide_key: int
    key: int
    seq: int
    part: int
    last: bool  # the segment's last chunk
    start: int  # grid index of its first tile
    batch: TileBatch | None
    errors: list[str]
    failure: str = ""  # the whole segment could not be read (the slide failed to open)

    def __len__(self) -> int:
        return len(self.errors)

    def pin_memory(self) -> Chunk:
        """Called by a DataLoader with ``pin_memory=True``."""
        if self.batch is not None:
            self.batch.pin_memory()
        return self


@dataclass
class ReadFailure:
    """A slide whose reading failed (a reading process died or stalled), and why."""

    slide_key: int
    message: str


class SlideCache:
    """Open slides, least recently used first out (thread-safe: reading threads share the handles)."""

    def __init__(self, size: int = SLIDES_PER_WORKER) -> None:
        self.size = size
        self._open: OrderedDict[tuple, Slide] = OrderedDict()
        self._retired: list[Slide] = []
        self._lock = threading.Lock()

    def get(self, seg: Segment) -> Slide:
        key = (str(seg.slide_path), seg.backend, seg.slide_mpp, seg.slide_id)
        with self._lock:
            if key in self._open:
                self._open.move_to_end(key)
                return self._open[key]
            slide = open_slide(seg.slide_path, seg.backend, mpp=seg.slide_mpp, slide_id=seg.slide_id)  # type: ignore[arg-type]
            self._open[key] = slide
            while len(self._open) > self.size:
                self._close(self._open.popitem(last=False)[1])
            return slide

    def drop(self, seg: Segment, now: bool = True) -> None:
        """Forget a slide (after a read error some readers refuse every later read); it is closed now or,
        when other threads may still read through it, with the cache."""
        with self._lock:
            slide = self._open.pop((str(seg.slide_path), seg.backend, seg.slide_mpp, seg.slide_id), None)
            if slide is not None:
                self._close(slide) if now else self._retired.append(slide)

    def close_retired(self) -> None:
        """Close the slides dropped while threads read through them (once those reads are over)."""
        with self._lock:
            for slide in self._retired:
                self._close(slide)
            self._retired.clear()

    def close(self) -> None:
        with self._lock:
            for slide in [*self._open.values(), *self._retired]:
                self._close(slide)
            self._open.clear()
            self._retired.clear()

    @staticmethod
    def _close(slide: Slide) -> None:
        with contextlib.suppress(Exception):
            slide.close()


def read_segment(seg: Segment, cache: SlideCache, threads: ThreadReaders | None = None) -> Iterator[Chunk]:
    """A segment's chunks, in order; a slide that cannot be opened gives a chunk with ``failure``. With
    ``threads`` each chunk is read by several threads at once."""
    head = {"slide_key": seg.slide_key, "key": seg.key, "seq": seg.seq}
    n, parts = len(seg), max(1, -(-len(seg) // seg.chunk))
    items = None
    for part in range(parts):
        lo, hi = part * seg.chunk, min(n, (part + 1) * seg.chunk)
        try:
            if threads is not None:
                read = threads.read(seg, lo, hi)
            else:
                items = items or TileItems(TileSource(cache.get(seg), seg.coords, seg.size_level0, seg.out_size,
                                                      seg.reader), seg.ship_streams)  # fmt: skip
                read = [items[i] for i in range(lo, hi)]
        except Exception as exc:  # the slide cannot be opened (TileItems records a tile's own errors)
            yield Chunk(
                **head,
                part=part,
                last=True,
                start=seg.start + lo,
                batch=None,
                errors=[],
                failure=one_line(exc),
            )
            break
        if any(error for _, _, error in read):  # the next chunk reopens: some readers refuse every later read
            cache.drop(seg, now=threads is None)
            read = second_try(seg, read, lo)
        batch, _, errors = collate_items(read)
        yield Chunk(
            **head, part=part, last=part == parts - 1, start=seg.start + lo, batch=batch, errors=errors
        )
    if items is not None:
        items.source.close()
    if threads is not None:  # every read of the segment is over
        cache.close_retired()


#: Tiles of a chunk that failed to read, read once more each (beyond it: a broken slide, not worth it).
SECOND_TRIES = 8


def second_try(seg: Segment, read: list, lo: int) -> list:
    """``read`` (items ``lo``… of a segment) with its failed tiles read once more, each through a slide
    opened afresh: a reader that hit one bad tile may refuse later reads through that handle (OpenSlide's
    error state), so a tile read beside it, or after it by another thread, gets another chance. A tile
    that fails again keeps its first error."""
    for k in [k for k, (_, _, error) in enumerate(read) if error][:SECOND_TRIES]:
        with contextlib.suppress(Exception):
            with open_slide(seg.slide_path, seg.backend, mpp=seg.slide_mpp, slide_id=seg.slide_id) as slide:  # type: ignore[arg-type]
                source = TileSource(slide, seg.coords[lo + k : lo + k + 1], seg.size_level0, seg.out_size,
                                    seg.reader)  # fmt: skip
                try:
                    payload, _, error = TileItems(source, seg.ship_streams)[0]
                finally:
                    source.close()
            if not error:
                read[k] = (payload, read[k][1], "")
    return read


class ThreadReaders:
    """Threads that read the runs of a chunk at once: they share each slide's handle (slide readers are
    thread-safe) and each has its own file handle and tile source, reopened after a read error without
    pulling anything from under the others."""

    def __init__(self, threads: int, cache: SlideCache) -> None:
        self.threads, self.cache = threads, cache
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="wsikit-read")
        self._local = threading.local()
        self._opened: list[SimpleNamespace] = []
        self._lock = threading.Lock()

    def read(self, seg: Segment, lo: int, hi: int) -> list:
        """Items ``lo``…``hi - 1`` of a segment, read in ``threads`` runs at once."""
        step = -(-(hi - lo) // self.threads)
        runs = [self.pool.submit(self._run, seg, a, min(hi, a + step)) for a in range(lo, hi, step)]
        return [item for run in runs for item in run.result()]

    def _run(self, seg: Segment, lo: int, hi: int) -> list:
        mine = getattr(self._local, "state", None)
        if mine is None:  # this thread's own handles (a namespace the closing thread can see too)
            mine = self._local.state = SimpleNamespace(seg=None, items=None)
            with self._lock:
                self._opened.append(mine)
        if mine.seg is not seg:
            if mine.items is not None:
                mine.items.source.close()
            mine.items, mine.seg = None, seg
            source = TileSource(self.cache.get(seg), seg.coords, seg.size_level0, seg.out_size, seg.reader)
            mine.items = TileItems(source, seg.ship_streams)
        return [mine.items[i] for i in range(lo, hi)]

    def close(self) -> None:
        self.pool.shutdown()
        for mine in self._opened:
            if mine.items is not None:
                mine.items.source.close()


def inline_chunks(next_segment: Callable[[], Segment | None], threads: int = 1) -> Iterator[Chunk]:
    """Segments read one after another in this thread (``workers=0``), each chunk by ``threads`` threads
    at once (the model is idle meanwhile, so they have the CPUs to themselves)."""
    cache = SlideCache()
    readers = ThreadReaders(threads, cache) if threads > 1 else None
    try:
        while (seg := next_segment()) is not None:
            yield from read_segment(seg, cache, readers)
    finally:
        if readers is not None:
            readers.close()
        cache.close()


class _SegmentReads(IterableDataset):
    """Each reading worker: take a segment from the shared queue, yield its chunks, repeat until None.
    Its slot in the shared table says which segment it holds and since when it reads the current chunk."""

    def __init__(self, tasks: Any, slots: Any) -> None:
        self.tasks, self.slots = tasks, slots

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        slot = _SLOT * (info.id if info is not None else 0)
        self.slots[slot : slot + _SLOT] = [os.getpid(), -1, -1, 0]
        cache = SlideCache()
        while (seg := self.tasks.get()) is not None:
            self.slots[slot + 1 : slot + 3] = [seg.key, seg.seq]
            chunks = read_segment(seg, cache)
            while True:
                self.slots[slot + 3] = time.time()
                chunk = next(chunks, None)
                self.slots[slot + 3] = 0
                if chunk is None:
                    break
                yield chunk
            self.slots[slot + 1] = -1
        cache.close()


def _identity(item: Any) -> Any:
    return item


class ReadingPool:
    """``workers`` reading processes fed segments through a queue, kept busy by :meth:`chunks`.

    At most ``2 × workers`` segments are queued or being read, so slides are claimed only shortly before
    they are read. A dead worker fails the slide of the segment it held; a worker that has been reading
    one chunk for ``timeout`` seconds (0: no limit) fails its slide and is killed. Either way the pool
    restarts and the other segments in flight resume where they stopped; a pool that dies again and
    again without delivering anything stops the run.
    """

    def __init__(self, workers: int, pin_memory: bool = False, timeout: float = 0.0) -> None:
        self.workers, self.pin_memory, self.timeout = workers, pin_memory, timeout
        self.restarts = 0

    def chunks(self, next_segment: Callable[[], Segment | None]) -> Iterator[Chunk | ReadFailure]:
        """Chunks of every segment ``next_segment`` gives, then of none; failures as :class:`ReadFailure`."""
        flight: dict[tuple[int, int], list] = {}  # (key, seq) -> [segment, chunks received]
        exhausted = False
        while True:
            run = _PoolRun(self.workers, self.pin_memory, self.timeout)
            try:
                for seg, _ in flight.values():
                    run.tasks.put(seg)
                while True:
                    while not exhausted and len(flight) < 2 * self.workers:
                        seg = next_segment()
                        if seg is None:
                            exhausted = True
                            break
                        flight[(seg.key, seg.seq)] = [seg, 0]
                        run.tasks.put(seg)
                    if exhausted and not flight:
                        return
                    item = run.next()
                    if isinstance(item, BaseException):
                        yield from self._failed(item, run, flight)
                        break
                    self.restarts = 0
                    entry = flight[(item.key, item.seq)]
                    entry[1] += 1
                    if item.last:
                        del flight[(item.key, item.seq)]
                    yield item
            finally:
                run.close()

    def _failed(self, exc: BaseException, run: _PoolRun, flight: dict) -> Iterator[ReadFailure]:
        """The slides to fail after the pool broke; the rest of ``flight`` is set to resume."""
        self.restarts += 1
        if self.restarts > MAX_RESTARTS:
            raise ExtractError(f"the tile-reading workers died {MAX_RESTARTS} times in a row ({one_line(exc)}); "
                               "rerun with --workers 0 to see a reader's own error")  # fmt: skip
        if isinstance(exc, _Stalled):
            held, message = (
                exc.held,
                (
                    f"no tiles from the reading workers for {self.timeout:g} s (a stalled read on network "
                    "storage?); rerun with --retry-failed, or raise --read-timeout"
                ),
            )
        else:
            found = re.search(r"pid\(s\) ([\d, ]+)", str(exc))
            held = run.held({int(p) for p in re.findall(r"\d+", found.group(1))} if found else None)
            message = (
                f"a tile-reading worker died ({one_line(exc)}); rerun with --retry-failed (--workers 0 "
                "shows a reader crash's own error)"
            )
        failed = {flight[k][0].slide_key for k in held if k in flight}
        for slide_key in sorted(failed):
            yield ReadFailure(slide_key, message)
        for k in list(flight):
            seg, parts = flight[k]
            if seg.slide_key in failed:
                del flight[k]
            else:
                flight[k] = [seg.rest(parts), 0]


class _Stalled(RuntimeError):
    """Workers that have been reading one chunk for longer than the timeout."""

    def __init__(self, held: list[tuple[int, int]]) -> None:
        super().__init__(f"{len(held)} reading worker(s) stalled")
        self.held = held


class _PoolRun:
    """One life of the pool: a task queue, the slot table and a DataLoader iterated by its own thread
    (so a worker's death is reported by the loader, never raised asynchronously in the engine)."""

    def __init__(self, workers: int, pin_memory: bool, timeout: float) -> None:
        ctx = multiprocessing.get_context("fork")
        self.tasks = ctx.Queue()
        self.slots = ctx.Array("d", [-1.0] * (_SLOT * workers), lock=False)
        self.workers, self.timeout = workers, timeout
        self.out: queue.Queue = queue.Queue(maxsize=2 * workers)
        self._stop = threading.Event()
        loader = DataLoader(
            _SegmentReads(self.tasks, self.slots),
            batch_size=None,
            num_workers=workers,
            collate_fn=_identity,
            pin_memory=pin_memory,
            prefetch_factor=2,
            multiprocessing_context=ctx,
            in_order=False,
        )
        ready = threading.Event()
        self._thread = threading.Thread(target=self._pump, args=(loader, ready), daemon=True)
        self._thread.start()
        ready.wait()

    def _pump(self, loader: DataLoader, ready: threading.Event) -> None:
        try:
            it = iter(loader)  # forks the workers while the engine waits
        except BaseException as exc:
            ready.set()
            self.out.put(exc)
            return
        ready.set()
        try:
            for item in it:
                while not self._stop.is_set():
                    with contextlib.suppress(queue.Full):
                        self.out.put(item, timeout=0.2)
                        break
                if self._stop.is_set():
                    break
        except BaseException as exc:  # a dead worker: reported to the engine (a fresh error: no frames kept)
            self.out.put(RuntimeError(str(exc)))
        finally:
            del it  # shuts the workers down

    def next(self) -> Chunk | BaseException:
        """The next chunk, or the error that broke the pool (:class:`_Stalled` when a worker has been
        reading one chunk for longer than the timeout)."""
        while True:
            with contextlib.suppress(queue.Empty):
                return self.out.get(timeout=0.5)
            dead = [
                int(self.slots[_SLOT * w]) for w in range(self.workers) if not _alive(self.slots[_SLOT * w])
            ]
            if dead:
                return RuntimeError(
                    f"DataLoader worker (pid(s) {', '.join(map(str, dead))}) exited unexpectedly"
                )
            if self.timeout and (stalled := self.held(since=time.time() - self.timeout)):
                return _Stalled(stalled)

    def held(self, pids: set[int] | None = None, since: float | None = None) -> list[tuple[int, int]]:
        """(grid key, segment) held by the workers; with ``pids`` by those processes only, with ``since``
        by those reading one chunk since before that time."""
        out = []
        for w in range(self.workers):
            pid, key, seq, reading = self.slots[_SLOT * w : _SLOT * (w + 1)]
            if key >= 0 and (pids is None or int(pid) in pids) and (since is None or 0 < reading < since):
                out.append((int(key), int(seq)))
        return out

    def close(self) -> None:
        """Stop the workers (those stuck in a read are killed) and the thread."""
        for _ in range(self.workers):
            self.tasks.put(None)
        self._stop.set()
        deadline = time.monotonic() + 5.0
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self.out.get(timeout=0.1)
            if time.monotonic() > deadline:  # a worker stuck in a read never ends its segment
                for w in range(self.workers):
                    with contextlib.suppress(OSError, ValueError):
                        if self.slots[_SLOT * w + 3] > 0:
                            os.kill(int(self.slots[_SLOT * w]), signal.SIGKILL)
                deadline = time.monotonic() + 5.0
        self._thread.join()
        self.tasks.close()
        self.tasks.cancel_join_thread()


def _alive(pid: float) -> bool:
    """Whether a reading process is running (not started yet: -1; a zombie counts as dead)."""
    if pid <= 0:
        return True
    try:
        return Path(f"/proc/{int(pid)}/stat").read_text().split(") ")[-1][:1] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        return True
