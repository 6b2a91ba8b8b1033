"""Job directories shared by every per-slide stage: slide lists, shards, status records, the per-slide
batch loop and the job overview (the per-slide locks are :mod:`wsikit.locks`).

A job directory holds each stage's outputs and one status record per slide and stage::

    <job>/status/<stage>/<slide_id>.json   written last, after the outputs were renamed into place
    <job>/locks/<stage>/<slide_id>.lock    held while a process works on that slide

Resume trusts only the status records: a lock or an output file is never taken as proof of completion.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wsikit import __version__
from wsikit.dicom import DICOM_SUFFIX, dicom_slides
from wsikit.io import clear_stale_temps, ensure_dir, one_line, read_table, write_json
from wsikit.locks import acquire_lock, lock_is_stale, release_lock

SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm", ".qptiff",
)  # fmt: skip


class JobError(ValueError):
    """Bad job input (slide list, shard, table); the message names the file and the fix."""


# -- slide lists ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlideEntry:
    """One slide of a batch: where it is, its id, and optional per-slide facts from a slide list."""

    path: Path
    slide_id: str
    mpp: float | None = None
    patient_id: str | None = None
    label: str | None = None


def _is_slide(path: Path) -> bool:
    """Named like a slide (DICOM instances excepted: a series of them is one slide, :func:`dicom_slides`)."""
    suffix = path.suffix.lower()
    return suffix in SLIDE_EXTENSIONS and suffix != DICOM_SUFFIX and not path.name.startswith(".")


def _other_file(path: Path) -> bool:
    """A glob's match that is no folder and no DICOM instance (those are grouped by series)."""
    return path.suffix.lower() != DICOM_SUFFIX and not path.is_dir()


def _read_slide_table(table: Path) -> list[SlideEntry]:
    rows = read_table(table, "slide list", JobError)
    if not rows or "path" not in rows[0]:
        cols = ", ".join(rows[0]) if rows else "none"
        raise JobError(f"{table}: a slide list needs a 'path' column (found: {cols})")
    entries = []
    for n, row in enumerate(rows, start=2):
        path = Path(row["path"]).expanduser()
        if not path.is_absolute():
            path = table.parent / path
        mpp = (row.get("mpp") or "").strip()
        try:
            mpp_value = float(mpp) if mpp else None
        except ValueError as exc:
            raise JobError(f"{table}:{n}: mpp {mpp!r} is not a number (µm/px, e.g. 0.25)") from exc
        entries.append(
            SlideEntry(
                path=path,
                slide_id=(row.get("slide_id") or "").strip() or path.stem,
                mpp=mpp_value,
                patient_id=(row.get("patient_id") or "").strip() or None,
                label=(row.get("label") or "").strip() or None,
            )
        )
    return entries


def resolve_slides(
    inputs: Sequence[str | os.PathLike], recursive: bool = False, id_from: str = "stem"
) -> list[SlideEntry]:
    """Turn files, folders, globs and CSV/TSV slide lists into unique :class:`SlideEntry` s, sorted by id.

    ``id_from="relpath"`` derives ids from the path relative to the given folder (``a/b.svs`` → ``a__b``),
    for collections with duplicate file names.
    """
    entries: list[SlideEntry] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.suffix.lower() in (".csv", ".tsv") and p.is_file():
            entries.extend(_read_slide_table(p))
        elif p.is_dir():  # every entry named like a slide is kept, so a broken one fails with its reason
            found = sorted(p.rglob("*") if recursive else p.iterdir())
            entries.extend(SlideEntry(f, i) for f, i in dicom_slides(p, found, recursive))
            entries.extend(SlideEntry(f, _slide_id(f, p, id_from)) for f in found if _is_slide(f))
        elif any(ch in str(item) for ch in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(str(p), recursive=recursive))]
            entries.extend(SlideEntry(f, i) for f, i in dicom_slides(p.parent, matches, recursive))
            entries.extend(SlideEntry(m, m.stem) for m in matches if _is_slide(m) or _other_file(m))
        else:
            entries.append(SlideEntry(p, p.stem))  # missing files fail per slide, with a status record
    seen: dict[str, Path] = {}
    for e in entries:
        if e.slide_id in seen and seen[e.slide_id] != e.path:
            raise JobError(
                f"duplicate slide id {e.slide_id!r}: {seen[e.slide_id]} and {e.path}; "
                "give a slide_id column in a slide list, or derive ids from relative paths (--id-from relpath)"
            )
        seen[e.slide_id] = e.path
    unique = {e.slide_id: e for e in entries}
    return [unique[k] for k in sorted(unique)]


def with_slide_mpp(entries: Sequence[SlideEntry], slide_mpp: float | None) -> list[SlideEntry]:
    """``entries`` with ``slide_mpp`` (µm/px) for the slides whose list gives none (a list's column wins)."""
    if slide_mpp is None:
        return list(entries)
    return [e if e.mpp is not None else dataclasses.replace(e, mpp=slide_mpp) for e in entries]


def _slide_id(path: Path, root: Path, id_from: str) -> str:
    if id_from == "relpath":
        return "__".join(path.relative_to(root).with_suffix("").parts)
    return path.stem


# -- shards and allotted resources ---------------------------------------------------------------------
def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"i/n"`` (0-based i) into (i, n)."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError as exc:
        raise JobError(f"--shard {text!r}: expected i/n, e.g. 0/4 (0-based index)") from exc
    if not (n >= 1 and 0 <= i < n):
        raise JobError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def scheduler_shard(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The (index, count) of this task in a scheduler job array, or None outside one.

    SLURM (``SLURM_ARRAY_TASK_ID`` with ``_COUNT`` or ``_MIN``/``_MAX``), PBS/Torque
    (``PBS_ARRAY_INDEX``/``PBS_ARRAYID`` with ``WSIKIT_ARRAY_COUNT``), SGE (``SGE_TASK_ID``,
    ``SGE_TASK_FIRST``/``_LAST``) and LSF (``LSB_JOBINDEX``, ``LSB_JOBINDEX_END``).
    """
    env = os.environ if env is None else env

    def num(name: str) -> int | None:
        value = env.get(name, "")
        return int(value) if value.strip().lstrip("-").isdigit() else None

    candidates = [
        ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_COUNT"),
        ("SGE_TASK_ID", "SGE_TASK_FIRST", "SGE_TASK_LAST", None),
        ("LSB_JOBINDEX", None, "LSB_JOBINDEX_END", None),
        ("PBS_ARRAY_INDEX", None, None, None),
        ("PBS_ARRAYID", None, None, None),
    ]
    for task, lo, hi, count in candidates:
        tid = num(task)
        if tid is None:
            continue
        first = num(lo) if lo else (1 if task == "LSB_JOBINDEX" else 0)
        first = 0 if first is None else first
        n = num(count) if count else None
        if n is None and hi and num(hi) is not None:
            n = num(hi) - first + 1  # type: ignore[operator]
        n = n or num("WSIKIT_ARRAY_COUNT")
        if n is None:
            raise JobError(
                f"{task}={tid} is set but the array size is unknown; set WSIKIT_ARRAY_COUNT or --shard"
            )
        return tid - first, n
    return None


def select_shard(entries: Sequence[SlideEntry], shard: tuple[int, int] | None) -> list[SlideEntry]:
    """Deterministic round-robin share of a slide list (sorted by id) for shard (i, n)."""
    if shard is None:
        return list(entries)
    i, n = shard
    ordered = sorted(entries, key=lambda e: e.slide_id)
    return ordered[i::n]


def select_slides(
    inputs: Sequence[str | os.PathLike],
    recursive: bool = False,
    id_from: str = "stem",
    slide_mpp: float | None = None,
    shard: str | tuple[int, int] | None = None,
) -> tuple[list[SlideEntry], int, tuple[int, int] | None]:
    """This process's slides: :func:`resolve_slides` with the ``slide_mpp`` override
    (:func:`with_slide_mpp`), then its share for ``shard`` (``"i/n"``, a pair, or None: the scheduler
    array's task, if any). Returns (slides, how many in all, the shard used)."""
    entries = with_slide_mpp(resolve_slides(inputs, recursive, id_from), slide_mpp)
    mine, which = take_share(entries, shard)
    return mine, len(entries), which


def take_share(
    entries: Sequence[SlideEntry], shard: str | tuple[int, int] | None = None
) -> tuple[list[SlideEntry], tuple[int, int] | None]:
    """This process's share of ``entries`` for ``shard`` (``"i/n"``, a pair, or None: the scheduler
    array's task, if any) and the shard used."""
    which = parse_shard(shard) if isinstance(shard, str) else shard if shard else scheduler_shard()
    return select_shard(entries, which), which


# -- status records -----------------------------------------------------------------------------------
@dataclass
class Status:
    """A slide's record for one stage: ``done`` only after its outputs are in place."""

    stage: str
    slide_id: str
    state: str  # "done" | "failed"
    outputs: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    finished_at: float = field(default_factory=time.time)
    wsikit_version: str = ""


def status_path(job_dir: str | os.PathLike, stage: str, slide_id: str) -> Path:
    return Path(job_dir) / "status" / stage / f"{slide_id}.json"


def read_status(job_dir: str | os.PathLike, stage: str, slide_id: str) -> Status | None:
    """The slide's status record for ``stage``, or None when it has none (or an unreadable one)."""
    path = status_path(job_dir, stage, slide_id)
    try:
        return Status(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_status(job_dir: str | os.PathLike, status: Status) -> Path:
    status.wsikit_version = __version__
    return write_json(status_path(job_dir, status.stage, status.slide_id), asdict(status))


def ensure_job_dir(job_dir: str | os.PathLike) -> Path:
    """``job_dir``, created if needed and checked writable; a :class:`JobError` naming it otherwise."""
    return ensure_dir(job_dir, "--out", JobError)


# -- the per-slide loop --------------------------------------------------------------------------------
@dataclass
class StageResult:
    """What a stage function returns for one slide."""

    outputs: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class BatchSummary:
    """Counts and per-slide records of a batch run."""

    done: list[Status] = field(default_factory=list)
    failed: list[Status] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already done (resume) or failed without --retry-failed
    busy: list[str] = field(default_factory=list)  # locked by another live process
    # slide id → why it was skipped: "done earlier", "failed earlier with the same inputs: …"
    why_skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def extend(self, other: BatchSummary) -> None:
        """Add another run's records to these."""
        for name in ("done", "failed", "skipped", "busy"):
            getattr(self, name).extend(getattr(other, name))
        self.why_skipped.update(other.why_skipped)


def _skip_reason(previous: Status | None, redo: bool, retry_failed: bool) -> str | None:
    """Why a slide with record ``previous`` is not worked on this time, or None when it is."""
    if previous is None or redo or (previous.state == "failed" and retry_failed):
        return None
    if previous.state == "done":
        return "done earlier"
    return f"failed earlier with the same inputs: {previous.error}; --retry-failed to try again"


def _wanted(stage: str, entry: SlideEntry, job_dir: str | os.PathLike, overwrite: bool, retry_failed: bool,
            outdated: Callable[[Status], bool] | None, inputs: Callable[[SlideEntry], str] | None) -> Claim:  # fmt: skip
    """The slide's claim before its lock: ``todo`` (with whether a record is redone) or ``skipped``."""
    previous = read_status(job_dir, stage, entry.slide_id)
    key = inputs(entry) if inputs is not None else None
    changed = previous is not None and key is not None and previous.info.get("inputs", key) != key
    stale = previous is not None and previous.state == "done" and outdated is not None and outdated(previous)
    redo = overwrite or changed or stale
    why = _skip_reason(previous, redo, retry_failed)
    return Claim("skipped" if why else "todo", why=why, inputs=key, previous=previous, redo=redo)


@dataclass
class Claim:
    """Whether this process works on a slide now: ``todo`` with its ``lock`` held, ``skipped`` (``why``)
    or ``busy`` (locked by another live process); ``inputs`` is this run's fingerprint for its record."""

    state: str
    lock: Path | None = None
    why: str | None = None
    inputs: str | None = None
    previous: Status | None = None
    redo: bool = False

    def settle(self, summary: BatchSummary, slide_id: str) -> None:
        """Count a slide not worked on in ``summary``."""
        getattr(summary, self.state).append(slide_id)
        if self.why is not None:
            summary.why_skipped[slide_id] = self.why


def pending_slides(stage: str, entries: Iterable[SlideEntry], job_dir: str | os.PathLike, overwrite: bool = False,
                   retry_failed: bool = False, outdated: Callable[[Status], bool] | None = None,
                   inputs: Callable[[SlideEntry], str] | None = None) -> list[SlideEntry]:  # fmt: skip
    """The slides :func:`claim_slide` would work on now (locks aside): for progress totals."""
    return [
        e
        for e in entries
        if _wanted(stage, e, job_dir, overwrite, retry_failed, outdated, inputs).state == "todo"
    ]


def claim_slide(
    stage: str,
    entry: SlideEntry,
    job_dir: str | os.PathLike,
    overwrite: bool = False,
    retry_failed: bool = False,
    outdated: Callable[[Status], bool] | None = None,
    inputs: Callable[[SlideEntry], str] | None = None,
) -> Claim:
    """Claim a slide: skipped when recorded done (or failed, unless ``retry_failed``), unless
    ``overwrite``, unless ``outdated(record)`` says a done record's settings no longer match, or unless
    ``inputs(entry)`` (a fingerprint of what this run would feed the slide's work: an MPP override, the
    grids it reads, …, kept in every record) differs from the record's, done or failed: a rerun with the
    fix an error asked for does the slide again. Otherwise its lock is taken (``busy`` when another live
    process holds it)."""
    claim = _wanted(stage, entry, job_dir, overwrite, retry_failed, outdated, inputs)
    if claim.state != "todo":
        return claim
    claim.lock = acquire_lock(job_dir, stage, entry.slide_id)
    if claim.lock is None:
        claim.state = "busy"
        return claim
    # another process may have finished the slide between our check and the lock
    again = read_status(job_dir, stage, entry.slide_id)
    if again and not claim.redo and again.finished_at != getattr(claim.previous, "finished_at", None):
        release_lock(claim.lock)
        claim.state, claim.lock, claim.why = "skipped", None, f"{again.state} by another process meanwhile"
        return claim
    clear_stale_temps(status_path(job_dir, stage, entry.slide_id))
    return claim


def record_slide(job_dir: str | os.PathLike, stage: str, slide_id: str, result: StageResult | BaseException,
                 seconds: float, inputs: str | None = None) -> Status:  # fmt: skip
    """Write a claimed slide's record: ``done`` with ``result``'s outputs, or ``failed`` with the
    exception's one-line error (and its traceback in ``info``), with the run's ``inputs`` fingerprint.
    A record that cannot be written (disk full) raises a :class:`JobError` naming it."""
    if isinstance(result, BaseException):
        status = Status(stage, slide_id, "failed", error=one_line(result))
        status.info["traceback"] = "".join(traceback.format_exception(result, limit=6))
    else:
        status = Status(stage, slide_id, "done", result.outputs, result.info, result.warnings)
    status.seconds = round(seconds, 3)
    if inputs is not None:
        status.info["inputs"] = inputs
    try:
        write_status(job_dir, status)
    except OSError as exc:  # disk full or quota: stop here, everything recorded so far stays valid
        raise JobError(
            f"{status_path(job_dir, stage, slide_id)}: cannot write the status record "
            f"({exc.strerror or exc}); free disk space and rerun (recorded slides are kept, this one is redone)"
        ) from exc
    return status


def run_batch(
    stage: str,
    entries: Iterable[SlideEntry],
    work: Callable[[SlideEntry], StageResult],
    job_dir: str | os.PathLike,
    overwrite: bool = False,
    retry_failed: bool = False,
    on_start: Callable[[SlideEntry], None] | None = None,
    on_end: Callable[[SlideEntry, Status | None], None] | None = None,
    outdated: Callable[[Status], bool] | None = None,
    inputs: Callable[[SlideEntry], str] | None = None,
) -> BatchSummary:
    """Run ``work`` on each slide with locks, skip-done and per-slide failure records.

    Which slides are worked on is :func:`claim_slide`'s rule. An exception in ``work`` becomes a
    ``failed`` record and the batch goes on; a job directory or status record that cannot be written
    (disk full, read-only) stops the batch with a :class:`JobError`.
    """
    ensure_job_dir(job_dir)
    summary = BatchSummary()
    for entry in entries:
        claim = claim_slide(stage, entry, job_dir, overwrite, retry_failed, outdated, inputs)
        status = None
        if claim.lock is None:
            claim.settle(summary, entry.slide_id)
        else:
            try:
                if on_start:
                    on_start(entry)
                t0 = time.perf_counter()
                try:
                    result: StageResult | BaseException = work(entry)
                except Exception as exc:
                    result = exc
                status = record_slide(
                    job_dir, stage, entry.slide_id, result, time.perf_counter() - t0, claim.inputs
                )
            finally:
                release_lock(claim.lock)
            (summary.failed if status.state == "failed" else summary.done).append(status)
        if on_end:
            on_end(entry, status)
    return summary


# -- job overview --------------------------------------------------------------------------------------
def job_status(job_dir: str | os.PathLike, slide_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Per stage: counts of done / failed / running / pending slides and the failures' one-line errors.

    ``pending`` counts the given ``slide_ids`` (or every slide any stage knows) with no record and no
    live lock for that stage.
    """
    job = Path(job_dir)
    stages = sorted(
        {p.name for p in (job / "status").iterdir() if p.is_dir()} if (job / "status").is_dir() else set()
    )
    known = set(slide_ids or [])
    records: dict[str, dict[str, Status]] = {}
    for stage in stages:
        records[stage] = {}
        for path in sorted((job / "status" / stage).glob("*.json")):
            status = read_status(job, stage, path.stem)
            if status is not None:
                records[stage][status.slide_id] = status
        known |= set(records[stage])
    report: dict[str, Any] = {"job_dir": str(job), "slides": len(known), "stages": {}}
    for stage in stages:
        running = (
            {p.stem for p in (job / "locks" / stage).glob("*.lock") if not lock_is_stale(p)}
            if (job / "locks" / stage).is_dir()
            else set()
        )
        done = [s for s in records[stage].values() if s.state == "done"]
        failed = [s for s in records[stage].values() if s.state == "failed"]
        report["stages"][stage] = {
            "done": len(done),
            "failed": len(failed),
            "running": len(running - {s.slide_id for s in done}),
            "pending": len(known - set(records[stage]) - running),
            "warnings": {s.slide_id: s.warnings for s in done if s.warnings},
            "failures": {s.slide_id: s.error for s in failed},
        }
    return report
