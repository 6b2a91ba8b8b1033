"""Per-slide locks of a job directory: ``<job>/locks/<stage>/<slide_id>.lock``, held while a process works
on that slide. A lock names its host, process and start time; one left by a dead process on this host, or
older than :data:`STALE_LOCK_SECONDS`, is reclaimed."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

STALE_LOCK_SECONDS = 24 * 3600


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(
    job_dir: str | os.PathLike, stage: str, slide_id: str, stale_after: float = STALE_LOCK_SECONDS
) -> Path | None:
    """Take the per-slide lock; returns its path when now held (release it with :func:`release_lock`),
    None when another live process holds it. A lock whose process is dead on this host, or that is
    older than ``stale_after`` seconds, is reclaimed."""
    path = Path(job_dir) / "locks" / stage / f"{slide_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if lock_is_stale(path, stale_after):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            return None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        return path
    return None


def release_lock(path: Path) -> None:
    """Let go of a lock taken by :func:`acquire_lock`."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def lock_is_stale(path: Path, stale_after: float = STALE_LOCK_SECONDS) -> bool:
    """A lock left by a dead process on this host, older than ``stale_after`` seconds, or unreadable and
    older than a minute."""
    try:
        holder = json.loads(path.read_text())
        age = time.time() - float(holder["started"])
    except (OSError, ValueError, KeyError, TypeError):
        # unreadable (being written, or a crash mid-write): stale only once it is old
        try:
            return time.time() - path.stat().st_mtime > 60
        except FileNotFoundError:
            return True
    if age > stale_after:
        return True
    return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1)))
