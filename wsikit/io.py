"""Files, written safely and read with one-line errors: atomic paths, JSON, text, CSV tables, PNG, and
the values stored as HDF5 attributes.

Every output of wsikit goes through :func:`atomic_path`: it is written under a hidden temporary name beside
its destination and renamed into place only when complete, so a killed or failed writer never leaves a
file that could be taken for a finished one.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

JSON_PREFIX = "json:"  # HDF5 attributes holding nested values are stored as "json:<JSON text>"


class InputError(ValueError):
    """A text file or table that cannot be read; the message names the file, the line and the fix."""


# -- atomic writes -------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds.

    The temporary name starts with ``.`` and ends with ``.tmp`` so nothing mistakes it for an output;
    on any error it is removed and an existing ``dest`` is left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=(suffix or "") + ".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.unlink()  # writers (h5py, zarr, PIL) create the file or folder themselves
    try:
        yield tmp_path
        os.replace(tmp_path, dest) if not dest.is_dir() else _replace_dir(tmp_path, dest)
    except BaseException:
        remove(tmp_path)
        raise


def ensure_dir(
    path: str | os.PathLike, option: str = "the folder", error: type[Exception] = InputError
) -> Path:
    """``path`` as a folder, created if needed and checked writable (a probe file); ``error`` naming it and
    ``option`` (what to change) when it cannot be written (read-only, a file in the way, no permission)."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".write-probe.", dir=folder):
            pass
    except OSError as exc:
        raise error(
            f"{folder}: cannot write here ({exc.strerror or exc}); choose a writable {option}"
        ) from exc
    return folder


def clear_stale_temps(dest: str | os.PathLike) -> None:
    """Remove the temporary files that :func:`atomic_path` calls for ``dest`` left behind (a killed
    writer's). Call only while holding the slide's lock, so that no live writer owns them."""
    dest = Path(dest)
    for path in dest.parent.glob(f".{glob.escape(dest.name)}.*.tmp"):
        remove(path)


def _replace_dir(tmp: Path, dest: Path) -> None:
    old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
    os.replace(dest, old)
    os.replace(tmp, dest)
    remove(old)


def remove(path: Path) -> None:
    """Delete a file or a folder tree; nothing when it is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# -- JSON ------------------------------------------------------------------------------------------------
def jsonable(obj: Any) -> Any:
    """``obj`` as standard JSON data: dataclasses as dicts, numpy values as Python, paths as strings,
    tuples as lists, and nan/inf as None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, str | bytes):  # numpy arrays and scalars, tensors
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(dest: str | os.PathLike, obj: Any) -> Path:
    """Write :func:`jsonable` ``obj`` as indented JSON, atomically (temp file, fsync, rename)."""
    with atomic_path(dest) as tmp, open(tmp, "w") as fh:
        json.dump(jsonable(obj), fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(dest)


def write_text(dest: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
    return Path(dest)


def write_png(dest: str | os.PathLike, rgb: Any) -> Path:
    """Write an (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA uint8 array as PNG, atomically."""
    import cv2  # deliberate: `wsikit status` and other light commands never draw

    if rgb.ndim == 3:
        rgb = cv2.cvtColor(rgb, cv2.COLOR_RGBA2BGRA if rgb.shape[2] == 4 else cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", rgb)
    if not ok:
        raise OSError(f"{dest}: PNG encoding failed ({rgb.shape} {rgb.dtype})")
    with atomic_path(dest, suffix=".png") as tmp:
        tmp.write_bytes(data.tobytes())
    return Path(dest)


# -- HDF5 attributes -------------------------------------------------------------------------------------
def to_h5_attr(value: Any) -> Any:
    """A value as an HDF5 attribute: flat numeric lists as arrays, nested values and None as
    ``json:<text>``, and strings that HDF5 cannot hold (NUL) or that look encoded, escaped."""
    if isinstance(value, dict | list | tuple) and not _is_flat_numeric(value):
        return JSON_PREFIX + json.dumps(jsonable(value))
    if value is None:
        return JSON_PREFIX + "null"
    if isinstance(value, str) and ("\x00" in value or value.startswith(JSON_PREFIX)):
        return JSON_PREFIX + json.dumps(value)
    return value


def _is_flat_numeric(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )


def from_h5_attr(value: Any) -> Any:
    """An HDF5 (or zarr) attribute as plain Python: bytes decoded, ``json:`` values parsed, numpy
    arrays as lists and numpy scalars as Python numbers."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str) and value.startswith(JSON_PREFIX):
        return json.loads(value[len(JSON_PREFIX) :])
    if hasattr(value, "tolist"):  # numpy arrays (items decoded in turn) and numpy scalars
        plain = value.tolist()
        return [from_h5_attr(v) for v in plain] if isinstance(plain, list) else plain
    return value


# -- reading text and tables ---------------------------------------------------------------------------
def read_text(path: Path, what: str = "file", error: type[Exception] = InputError) -> str:
    """A UTF-8 text file's contents; an unreadable or non-UTF-8 file raises ``error`` naming the file, the
    line and the fix."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror})") from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        excel = "'CSV UTF-8' in Excel, or " if path.suffix.lower() in (".csv", ".tsv", ".txt") else ""
        raise error(
            f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}); save the {what} as UTF-8 "
            f"(e.g. {excel}iconv -f latin1 -t utf-8)"
        ) from exc


def read_table(path: Path, what: str = "table", error: type[Exception] = InputError) -> list[dict[str, str]]:
    """Rows of a CSV file (tab-separated for .tsv/.txt) as dicts, read by :func:`read_text`."""
    dialect = "excel-tab" if path.suffix.lower() in (".tsv", ".txt") else "excel"
    return list(csv.DictReader(read_text(path, what, error).splitlines(), dialect=dialect))


# -- errors ----------------------------------------------------------------------------------------------
def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def one_line(exc: BaseException) -> str:
    """An exception as one line: ``Type: first line of its message`` (or just its type)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
