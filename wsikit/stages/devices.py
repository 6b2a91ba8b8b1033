"""Several devices on one node: one extraction engine per device, each in its own (spawned) process.

The engines walk the same slide list and share it through the per-slide locks: whichever engine reaches a
slide first takes it, so a slow slide never holds the others back and no slide is done twice. The
allotted CPUs (affinity, ``SLURM_CPUS_PER_TASK``, cgroup quota) are split between the engines, each
using its share for its reading workers. The engines start together once all are built; if one fails,
the others stop claiming slides, finish those in flight, and the run raises that engine's error.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
from collections.abc import Callable, Sequence
from typing import Any

from wsikit.encoders.build import Encoder
from wsikit.io import one_line
from wsikit.jobs import JobError, SlideEntry, Status
from wsikit.runtime import split_cpus
from wsikit.settings import ExtractConfig
from wsikit.stages.encode import ExtractError
from wsikit.stages.engine import ExtractProgress, ExtractSummary


def run_on_devices(
    devices: Sequence[str],
    job_dir: str | os.PathLike,
    cfg: ExtractConfig,
    entries: Sequence[SlideEntry],
    specs: Sequence[str],
    overwrite: bool = False,
    retry_failed: bool = False,
    encoder: Encoder | None = None,
    on_ready: Callable[[str], None] | None = None,
    on_start: Callable[[SlideEntry], None] | None = None,
    on_end: Callable[[SlideEntry, Status | None], None] | None = None,
    on_tiles: Callable[[int], None] | None = None,
    on_progress: Callable[[ExtractProgress], None] | None = None,
) -> ExtractSummary:
    """Extract ``entries`` with one engine per device; returns the engines' summaries merged."""
    ctx = multiprocessing.get_context("spawn")
    events, go, stop = ctx.Queue(), ctx.Event(), ctx.Event()
    shares = split_cpus(len(devices))
    jobs = [(i, dev, shares[i], str(job_dir), cfg, list(entries), list(specs), overwrite, retry_failed, encoder)
            for i, dev in enumerate(devices)]  # fmt: skip
    procs = [
        ctx.Process(target=_engine, args=(*job, events, go, stop), name=f"wsikit-{job[1]}") for job in jobs
    ]
    progress = ExtractProgress()
    fanout = _Fanout(devices, progress, on_ready, on_start, on_end, on_tiles, on_progress)
    for p in procs:
        p.start()
    try:
        summaries, errors = fanout.collect(procs, events, go, stop)
    finally:
        stop.set()
        go.set()
        for p in procs:
            p.join()
    if errors:
        i, message, fatal = errors[0]
        text = f"the engine on {devices[i]} failed: {message}; slides done are kept, rerun to finish"
        raise (JobError if fatal else ExtractError)(text)
    return merge_summaries(summaries)


class _Fanout:
    """The parent's side: engines' events → the caller's callbacks, one progress over all engines."""

    def __init__(self, devices: Sequence[str], progress: ExtractProgress, on_ready, on_start, on_end,
                 on_tiles, on_progress) -> None:  # fmt: skip
        self.devices, self.progress = devices, progress
        self.on_ready, self.on_start, self.on_end = on_ready, on_start, on_end
        self.on_tiles, self.on_progress = on_tiles, on_progress
        self.done: dict[int, tuple[int, int]] = {}  # engine -> (tiles, slides) done

    def collect(self, procs: list, events: Any, go: Any, stop: Any) -> tuple[list[ExtractSummary], list]:
        """Run until every engine has reported its summary, its error, or died."""
        summaries: dict[int, ExtractSummary] = {}
        errors: list[tuple[int, str, bool]] = []
        ready: set[int] = set()
        settled: set[int] = set()
        while len(settled) < len(procs):
            try:
                event = events.get(timeout=1.0)
            except queue.Empty:
                for i, p in enumerate(procs):
                    if p.exitcode is not None and i not in settled:
                        errors.append((i, f"its process exited with code {p.exitcode}", False))
                        settled.add(i)
                        stop.set()
                continue
            kind, i, *rest = event
            if kind == "summary":
                summaries[i] = rest[0]
                settled.add(i)
            elif kind == "error":
                errors.append((i, rest[0], rest[1]))
                settled.add(i)
                stop.set()
            elif kind == "ready":
                ready.add(i)
                if self.on_ready:
                    self.on_ready(f"engine {i + 1}/{len(procs)}: {rest[0]}")
            else:
                self._forward(kind, i, rest)
            if len(ready | settled) == len(procs):
                go.set()
        return [summaries[i] for i in sorted(summaries)], errors

    def _forward(self, kind: str, i: int, rest: list) -> None:
        if kind == "start" and self.on_start:
            self.on_start(rest[0])
        elif kind == "end" and self.on_end and rest[1] is not None:
            self.on_end(rest[0], rest[1])
        elif kind == "tiles" and self.on_tiles:
            self.on_tiles(rest[0])
        elif kind == "progress":  # each engine counts the same slides to do at its start
            self.done[i] = (rest[0], rest[1])
            self.progress.tiles_total = max(self.progress.tiles_total, rest[2])
            self.progress.slides_total = max(self.progress.slides_total, rest[3])
            self.progress.tiles_done = sum(t for t, _ in self.done.values())
            self.progress.slides_done = sum(s for _, s in self.done.values())
            if self.on_progress:
                self.on_progress(self.progress)


def _engine(i: int, device: str, cpus: int, job_dir: str, cfg: ExtractConfig, entries: list[SlideEntry],
            specs: list[str], overwrite: bool, retry_failed: bool, encoder: Encoder | None, events: Any,
            go: Any, stop: Any) -> None:  # fmt: skip
    """One engine's process: build on ``device`` with ``cpus`` CPUs, wait for the others, run."""
    from wsikit.stages.extract import Extractor

    try:
        extractor = Extractor.build(cfg, encoder, device, cpus)
    except BaseException as exc:
        events.put(("error", i, one_line(exc), isinstance(exc, JobError)))
        return
    events.put(("ready", i, extractor.describe()))
    go.wait()
    callbacks = {
        "on_start": lambda e: events.put(("start", i, e)),
        "on_end": lambda e, s: events.put(("end", i, e, s)),
        "on_tiles": lambda n: events.put(("tiles", i, n)),
        "on_progress": lambda p: events.put(
            ("progress", i, p.tiles_done, p.slides_done, p.tiles_total, p.slides_total)
        ),
    }
    try:
        summary = extractor.run(
            entries, job_dir, specs, overwrite, retry_failed, stop=stop.is_set, **callbacks
        )
    except BaseException as exc:
        events.put(("error", i, one_line(exc), isinstance(exc, JobError)))
        return
    for status in summary.done + summary.failed:
        status.info["device"] = device
    events.put(("summary", i, summary))


def merge_summaries(summaries: Sequence[ExtractSummary]) -> ExtractSummary:
    """One summary of several engines' runs over the same slides: a slide done (or failed) by one engine
    counts as such, whatever the others saw (they found it locked or already done)."""
    merged = ExtractSummary()
    records = {s.slide_id: s for part in summaries for s in part.done + part.failed}
    ordered = sorted(records.values(), key=lambda s: s.finished_at)
    merged.done = [s for s in ordered if s.state == "done"]
    merged.failed = [s for s in ordered if s.state == "failed"]
    skipped = {i for part in summaries for i in part.skipped} - set(records)
    merged.skipped = sorted(skipped)
    merged.busy = sorted({i for part in summaries for i in part.busy} - set(records) - skipped)
    merged.tiles = sum(s.tiles for s in summaries)
    merged.seconds = max((s.seconds for s in summaries), default=0.0)
    merged.build_seconds = max((s.build_seconds for s in summaries), default=0.0)
    merged.batch_size = min((s.batch_size for s in summaries), default=0)
    merged.decode = ", ".join(sorted({s.decode for s in summaries}))
    merged.parts = (
        {k: sum(s.parts.get(k, 0.0) for s in summaries) for k in summaries[0].parts} if summaries else {}
    )
    return merged
