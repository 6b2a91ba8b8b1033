"""One set of settings per stage (and spec) in a job directory.

Per-slide records say which settings made each slide's outputs, but nothing stopped two runs with other
settings from interleaving in one job (each redoing the other's slides as outdated), or a rerun with new
settings from leaving the slides it did not cover with the old ones. The first run of a stage claims the
job for its settings (``<job>/settings/<name>.json``); later runs with the same settings (resumes, shards,
array tasks) go on, and a run with other settings is refused with the difference named, unless
``--overwrite`` asks to redo the job with them and no other process is working on that stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from wsikit.config import fingerprint
from wsikit.io import jsonable, write_json
from wsikit.jobs import JobError, ensure_job_dir
from wsikit.locks import lock_is_stale
from wsikit.settings import ExtractConfig

_WAIT_SECONDS = 30.0  # how long a claim waits for another process's claim to be written


def live_locks(job_dir: str | os.PathLike, stage: str) -> list[dict[str, Any]]:
    """The holders (slide, host, pid, started) of ``stage``'s slide locks that are not stale: work going on now."""
    folder = Path(job_dir) / "locks" / stage
    holders = []
    for path in sorted(folder.glob("*.lock")) if folder.is_dir() else []:
        if not lock_is_stale(path):
            with contextlib.suppress(OSError, ValueError):
                holders.append({"slide_id": path.stem, **json.loads(path.read_text())})
    return holders


def claim_path(job_dir: str | os.PathLike, name: str) -> Path:
    """``<job>/settings/<name>.json`` (``name``: a stage, or ``<stage>/<spec>``)."""
    return Path(job_dir) / "settings" / f"{name}.json"


def read_claim(job_dir: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The settings a job holds for ``name``, or None when no run claimed it (or the record is unreadable)."""
    try:
        claim = json.loads(claim_path(job_dir, name).read_text())
    except (OSError, ValueError):
        return None
    return claim if isinstance(claim, dict) else None


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 4) -> str:
    """The settings that differ, as ``min_tissue 0.5 → 0.1; mask.channel saturation → darkness``."""
    a, b = _flat(jsonable(old)), _flat(jsonable(new))
    changed = [
        f"{k} {a.get(k, '-')} → {b.get(k, '-')}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)
    ]
    more = f"; and {len(changed) - limit} more" if len(changed) > limit else ""
    return "; ".join(changed[:limit]) + more if changed else "other settings"


@contextlib.contextmanager
def _claim_lock(path: Path) -> Iterator[None]:
    """A short exclusive lock around reading and writing one claim (O_EXCL; a crashed holder's lock is
    taken over after a minute)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + _WAIT_SECONDS
    while True:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            break
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - path.stat().st_mtime > 60:
                    path.unlink()
                    continue
            if time.monotonic() > deadline:
                raise JobError(
                    f"{path}: held for over {_WAIT_SECONDS:g} s; if no wsikit process runs, delete it"
                ) from None
            time.sleep(0.05)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def claim_settings(
    job_dir: str | os.PathLike,
    name: str,
    key: str,
    settings: Mapping[str, Any],
    overwrite: bool = False,
    stage: str | None = None,
) -> None:
    """Claim ``job_dir`` for ``name``'s settings (fingerprint ``key``), or refuse with one line.

    Same key as the job holds: nothing to do. Other key: :class:`JobError` naming the differences,
    unless ``overwrite``; with ``overwrite`` the claim is replaced only when no live process holds a
    slide lock of ``stage`` (default ``name``'s stage).
    """
    job = ensure_job_dir(job_dir)
    path = claim_path(job, name)
    stage = stage or name.split("/")[0]
    with _claim_lock(job / "locks" / "settings" / f"{name}.lock"):
        old = read_claim(job, name)
        if old is not None and old.get("key") == key:
            return
        if old is not None:
            what = f"{name.replace('/', ' at ')} was run with other settings ({differences(old.get('settings', {}), settings)})"
            if not overwrite:
                raise JobError(
                    f"{job}: {what}; a job holds one set of settings per stage. Use another --out, or "
                    "--overwrite to redo this job's slides with the new settings"
                )
            busy = live_locks(job, stage)
            if busy:
                holder = busy[0]
                raise JobError(
                    f"{job}: {what}, and another process (pid {holder.get('pid')} on {holder.get('host')}) is "
                    f"working on it now ({len(busy)} slide(s) locked); wait for it or stop it before --overwrite"
                )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        write_json(path, {"key": key, "settings": jsonable(settings), **me})


def claim_extraction(
    job_dir: str | os.PathLike,
    stage: str,
    cfg: ExtractConfig,
    weights_id: str,
    specs: Sequence[str],
    overwrite: bool = False,
) -> None:
    """Claim the job's bags of one encoder (``stage``) at each of ``specs`` for ``cfg``'s settings (one claim
    per spec: encoding another spec later is no change of settings)."""
    for spec in specs:
        settings = cfg.settings(weights_id, [spec])
        claim_settings(job_dir, f"{stage}/{spec}", fingerprint(settings), settings, overwrite, stage)
