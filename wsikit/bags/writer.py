"""Writing wsikit bags: rows streamed into an HDF5 or Zarr v3 file in chunks, renamed into place when
complete; a full disk or file-size limit is one :class:`~wsikit.bags.format.BagError`."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from wsikit.bags.format import FORMAT_NAME, FORMAT_VERSION, Bag, BagError, new_attrs
from wsikit.io import atomic_path, jsonable, to_h5_attr

_CHUNK_BYTES = 1 << 20  # about 1 MiB of features per chunk


def _chunk_rows(dim: int, itemsize: int) -> int:
    return max(16, _CHUNK_BYTES // max(1, dim * itemsize))


_DISK_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _disk_error(path: Path, exc: BaseException) -> BagError:
    """A write error as a one-line :class:`BagError`, saying what to check when the disk or a limit is full."""
    hint = "is the disk full, or a file-size limit (ulimit -f) reached?"
    if not (isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS):
        hint = "check the folder is writable"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return BagError(f"{path.parent}: could not write a bag there ({reason}): {hint}")


class _WriteGuard:
    """The file under h5py's ``fileobj`` driver: it keeps the first write error (disk full, file-size
    limit) from HDF5, which cannot close a file after a failed write (the handle leaks and the process
    may crash later), and raises it as a :class:`BagError` once HDF5 has let go of the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: OSError | None = None
        self._fh = open(path, "w+b", buffering=0)  # noqa: SIM115 (closed by __exit__)

    def __enter__(self) -> _WriteGuard:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._fh.close()
        if exc_type is None:
            self.check()

    def check(self) -> None:
        if self.error is not None:
            raise _disk_error(self.path, self.error) from self.error

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while self.error is None and done < len(view):
            try:
                done += self._fh.write(view[done:]) or 0
            except OSError as exc:
                self.error = exc
        return len(view)

    def readinto(self, buf: Any) -> int:
        return self._fh.readinto(buf) or 0

    def read(self, n: int = -1) -> bytes:  # with seek(): how h5py recognises a file object
        return self._fh.read(n) or b""

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self._fh.truncate(size)
            except OSError as exc:
                self.error = exc
        return self.tell() if size is None else size

    def flush(self) -> None:
        pass  # unbuffered


class BagWriter:
    """Stream features into a bag: rows are appended in chunks, the file is renamed into place on close.

    Use as a context manager; on an exception the temporary file is removed and nothing is left that
    resume could count as done. ``fmt`` is ``"h5"`` or ``"zarr"``; ``dtype`` float32 or float16;
    ``compression`` None, ``"gzip"`` (h5) / ``"zstd"`` (zarr) or ``"lzf"`` (h5, h5py-only readers).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        dim: int,
        attrs: dict[str, Any] | None = None,
        coords_attrs: dict[str, Any] | None = None,
        fmt: str | None = None,
        dtype: str | np.dtype = "float32",
        compression: str | None = None,
        with_tile_index: bool = True,
    ) -> None:
        self.path = Path(path)
        self.fmt = fmt or ("zarr" if self.path.suffix == ".zarr" else "h5")
        if self.fmt not in ("h5", "zarr"):
            raise BagError(f"{self.path}: unknown bag format {self.fmt!r}; use h5 or zarr")
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float16):
            raise BagError(f"{self.path}: features dtype must be float32 or float16, got {self.dtype}")
        self.attrs = dict(attrs or {})
        self.coords_attrs = dict(coords_attrs or {})
        self.compression = compression
        self.with_tile_index = with_tile_index
        self.n = 0
        self._skipped: list[np.ndarray] = []
        self._stack: contextlib.ExitStack | None = None

    # context management ------------------------------------------------------------------------------
    def __enter__(self) -> BagWriter:
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        rows = _chunk_rows(self.dim, self.dtype.itemsize)
        if self.fmt == "h5":
            import h5py

            self._guard = self._stack.enter_context(_WriteGuard(tmp))
            self._h5 = self._stack.enter_context(h5py.File(self._guard, "w", rdcc_nbytes=16 << 20))
            opts = {"compression": self.compression} if self.compression else {}
            self._arrays = {
                "features": self._h5.create_dataset(
                    "features",
                    (0, self.dim),
                    self.dtype,
                    maxshape=(None, self.dim),
                    chunks=(rows, self.dim),
                    **opts,
                ),
                "coords": self._h5.create_dataset(
                    "coords", (0, 2), np.int64, maxshape=(None, 2), chunks=(4096, 2)
                ),
            }
            if self.with_tile_index:
                self._arrays["tile_index"] = self._h5.create_dataset(
                    "tile_index", (0,), np.int64, maxshape=(None,), chunks=(4096,)
                )
        else:
            import zarr

            self._zarr = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
            comp = {} if self.compression else {"compressors": None}
            self._arrays = {
                "features": self._zarr.create_array(
                    "features", shape=(0, self.dim), dtype=self.dtype, chunks=(rows, self.dim), **comp
                ),
                "coords": self._zarr.create_array(
                    "coords", shape=(0, 2), dtype=np.int64, chunks=(4096, 2), compressors=None
                ),
            }
            if self.with_tile_index:
                self._arrays["tile_index"] = self._zarr.create_array(
                    "tile_index", shape=(0,), dtype=np.int64, chunks=(4096,), compressors=None
                )
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._stack is not None
        try:
            if exc_type is None:
                self._finish()
        except BaseException as err:
            self._stack.__exit__(*sys.exc_info())
            if not isinstance(err, OSError):
                raise
            raise _disk_error(self.path, err) from err
        self._stack.__exit__(exc_type, exc, tb)
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:  # zarr writes chunks as it goes
            raise _disk_error(self.path, exc) from exc

    # writing -----------------------------------------------------------------------------------------
    def append(self, features: np.ndarray, coords: np.ndarray, tile_index: np.ndarray | None = None) -> None:
        """Append rows (features (B, D), coords (B, 2), optional grid indices (B,))."""
        features = np.asarray(features)
        coords = np.asarray(coords, np.int64).reshape(-1, 2)
        b = features.shape[0]
        if features.shape[1:] != (self.dim,) or coords.shape[0] != b:
            raise BagError(f"{self.path}: append got features {features.shape} and coords {coords.shape}")
        if b == 0:
            return
        lo, hi = self.n, self.n + b
        parts = [("features", features.astype(self.dtype, copy=False)), ("coords", coords)]
        if self.with_tile_index:
            idx = np.arange(lo, hi) if tile_index is None else np.asarray(tile_index, np.int64)
            parts.append(("tile_index", idx))
        for name, data in parts:
            arr = self._arrays[name]
            arr.resize((hi, *arr.shape[1:]))
            arr[lo:hi] = data
        self.n = hi
        if self.fmt == "h5":
            self._guard.check()  # stop at the first failed write

    def skip(self, coords: np.ndarray) -> None:
        """Record tiles that could not be read (level-0 top-left), stored as ``skipped_coords``."""
        self._skipped.append(np.asarray(coords, np.int64).reshape(-1, 2))

    def add_context(self, spec_name: str, features: np.ndarray, index: np.ndarray) -> None:
        """Store parent-tile features (n, D) and their row indices (n,) for a coarser spec."""
        if features.shape[0] != self.n or index.shape[0] != self.n:
            raise BagError(f"{self.path}: context {spec_name} has {features.shape[0]} rows, bag has {self.n}")
        data = {"features": features.astype(self.dtype, copy=False), "index": np.asarray(index, np.int64)}
        if self.fmt == "h5":
            group = self._h5.require_group("context").create_group(spec_name)
            for key, value in data.items():
                group.create_dataset(key, data=value, chunks=True if value.size else None)
        else:
            group = self._zarr.require_group("context").require_group(spec_name)
            for key, value in data.items():
                group.create_array(key, data=value)

    def _finish(self) -> None:
        skipped = np.concatenate(self._skipped) if self._skipped else np.zeros((0, 2), np.int64)
        attrs = {**self.attrs, "n_tiles": self.n, "n_skipped": int(skipped.shape[0]), "feature_dim": self.dim}
        attrs.setdefault("format", FORMAT_NAME)
        attrs.setdefault("format_version", FORMAT_VERSION)
        attrs["features_dtype"] = str(self.dtype)
        if self.fmt == "h5":
            self._h5.create_dataset("skipped_coords", data=skipped)
            for key, value in attrs.items():
                self._h5.attrs[key] = to_h5_attr(value)
            for key, value in self.coords_attrs.items():
                self._arrays["coords"].attrs[key] = to_h5_attr(value)
        else:
            self._zarr.create_array("skipped_coords", data=skipped)
            self._zarr.attrs.update(jsonable(attrs))
            self._arrays["coords"].attrs.update(jsonable(self.coords_attrs))


def write_bag(
    path: str | os.PathLike,
    bag: Bag,
    fmt: str | None = None,
    dtype: str | np.dtype | None = None,
    compression: str | None = None,
) -> Path:
    """Write ``bag`` atomically as a wsikit bag (``fmt`` h5 or zarr; from the suffix when None)."""
    feat_dtype = dtype or (
        bag.features.dtype if bag.features.dtype in (np.float16, np.float32) else "float32"
    )
    attrs = {**new_attrs(), **bag.attrs}
    attrs.pop("source_format", None)
    with BagWriter(
        path,
        bag.dim,
        attrs,
        bag.coords_attrs,
        fmt,
        feat_dtype,
        compression,
        with_tile_index=bag.tile_index is not None,
    ) as writer:
        writer.append(bag.features, bag.coords, bag.tile_index)
        if bag.skipped_coords is not None:
            writer.skip(bag.skipped_coords)
        for name in bag.context:
            writer.add_context(name, bag.context[name], bag.context_index[name])
    return Path(path)
