"""The feature-bag format (HDF5 and Zarr v3) and adapters for the peers' layouts.

A bag is one slide's tile features: ``features`` (N, D) float32/float16 and ``coords`` (N, 2) int64
level-0 top-left pixels, plus attributes saying how they were made. ``docs/feature-bag.md`` specifies
the format (``wsikit-bag`` version 1). This module needs only numpy, h5py and zarr (torch only to read
or write ``.pt`` files).

:func:`read_bag` reads wsikit bags and, by their content, CLAM (``h5_files/*.h5``, ``pt_files/*.pt``),
TRIDENT, STAMP (``feats`` + µm coords), the common ``feats`` + pixel ``coords`` variant, slideflow
(``.pt`` + ``.index.npz``) and tiatoolbox zarr. :func:`export_bag` writes CLAM, TRIDENT, STAMP and
slideflow layouts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from collections import ChainMap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "wsikit-bag"
FORMAT_VERSION = 1
EXPORT_LAYOUTS = ("clam", "trident", "stamp", "slideflow")
_CHUNK_BYTES = 1 << 20  # about 1 MiB of features per chunk
_JSON_PREFIX = "json:"


class BagError(ValueError):
    """A bag file that cannot be read or written as asked; the message names the file and the fix."""


@dataclass
class Bag:
    """One slide's features and where they lie.

    ``coords`` are level-0 top-left pixels unless ``attrs["coords_unit"] == "um"`` (a STAMP file read
    without a slide MPP) or ``attrs["coords_origin"] == "center"`` (slideflow without an MPP).
    ``tile_index`` is each row's index in the tiling grid; ``skipped_coords`` the tiles that failed to
    read. ``context`` maps a coarser spec name to the parent tile's features (N, D) for each row, and
    ``context_index`` to the parent's row in that spec's bag (-1: none, features zero).
    """

    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    coords_attrs: dict[str, Any] = field(default_factory=dict)
    tile_index: np.ndarray | None = None
    skipped_coords: np.ndarray | None = None
    context: dict[str, np.ndarray] = field(default_factory=dict)
    context_index: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features)
        if self.features.ndim != 2:
            raise BagError(f"features must be (N, D), got shape {self.features.shape}")
        self.coords = np.asarray(self.coords).reshape(-1, 2)
        if self.coords.shape[0] != self.features.shape[0]:
            raise BagError(f"{self.features.shape[0]} feature rows but {self.coords.shape[0]} coordinates")

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def multiscale(self) -> np.ndarray:
        """Features joined with every context's along the feature axis: (N, D × (1 + contexts))."""
        return np.concatenate([self.features, *(self.context[k] for k in sorted(self.context))], axis=1)


def bag_path(
    job_dir: str | os.PathLike, spec_name: str, encoder_name: str, slide_id: str, fmt: str = "h5"
) -> Path:
    """``<job>/bags/<spec_name>/<encoder_name>/<slide_id>.h5`` (or ``.zarr``); unsafe characters → ``_``."""
    safe = encoder_name.replace("/", "_").replace(":", "_")
    return Path(job_dir) / "bags" / spec_name / safe / f"{slide_id}.{'zarr' if fmt == 'zarr' else 'h5'}"


def new_attrs(**fields: Any) -> dict[str, Any]:
    """Root attributes every wsikit bag carries (format, version, wsikit version, creation time) + ``fields``."""
    from wsikit import __version__

    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "wsikit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }


# -- attribute encoding --------------------------------------------------------------------------------
def _to_h5_attr(value: Any) -> Any:
    if isinstance(value, dict | list | tuple) and not _is_flat_numeric(value):
        return _JSON_PREFIX + json.dumps(value, default=_json_default)
    if value is None:
        return _JSON_PREFIX + "null"
    if isinstance(value, str) and ("\x00" in value or value.startswith(_JSON_PREFIX)):
        return _JSON_PREFIX + json.dumps(value)  # HDF5 strings hold no NUL; "json:…" must not be decoded
    return value


def _is_flat_numeric(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _from_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value.startswith(_JSON_PREFIX):
        return json.loads(value[len(_JSON_PREFIX) :])
    if isinstance(value, np.ndarray):
        return [_from_attr(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _json_safe(attrs: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(attrs, default=_json_default))


def _chunk_rows(dim: int, itemsize: int) -> int:
    return max(16, _CHUNK_BYTES // max(1, dim * itemsize))


# -- writing -------------------------------------------------------------------------------------------
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
        from wsikit.jobs import atomic_path

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
                self._h5.attrs[key] = _to_h5_attr(value)
            for key, value in self.coords_attrs.items():
                self._arrays["coords"].attrs[key] = _to_h5_attr(value)
        else:
            self._zarr.create_array("skipped_coords", data=skipped)
            self._zarr.attrs.update(_json_safe(attrs))
            self._arrays["coords"].attrs.update(_json_safe(self.coords_attrs))


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


# -- reading -------------------------------------------------------------------------------------------
def read_bag(path: str | os.PathLike, slide_mpp: float | None = None) -> Bag:
    """Read a feature bag of any supported layout (see the module docstring).

    ``attrs["source_format"]`` says which layout was recognised. ``slide_mpp`` (µm/px) converts STAMP's
    µm coordinates and slideflow's tile centres to level-0 top-left pixels when the file lacks it.
    """
    path = Path(path)
    if not path.exists():
        raise BagError(f"{path}: no such bag file")
    if path.is_dir() or path.suffix == ".zarr":
        return _read_zarr(path)
    if path.suffix in (".pt", ".pth"):
        return _read_pt(path, slide_mpp)
    return _read_h5(path, slide_mpp)


def _read_h5(path: Path, slide_mpp: float | None) -> Bag:
    import h5py

    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise BagError(f"{path}: not a readable HDF5 file ({exc}); is the copy complete?") from exc
    with fh:
        root = {k: _from_attr(v) for k, v in fh.attrs.items()}
        if root.get("format") == FORMAT_NAME:
            return _wsikit_from(fh, root, path)
        feats_key = "features" if "features" in fh else "feats" if "feats" in fh else None
        if feats_key is None or not isinstance(fh[feats_key], h5py.Dataset):
            raise BagError(
                f"{path}: no 'features' or 'feats' dataset (found: {', '.join(fh) or 'nothing'}); not a feature bag"
            )
        features = fh[feats_key][()]
        coords_ds = fh.get("coords", None)
        coords = coords_ds[()] if coords_ds is not None else np.zeros((features.shape[0], 2), np.int64)
        coords_attrs = {k: _from_attr(v) for k, v in coords_ds.attrs.items()} if coords_ds is not None else {}
        feat_attrs = {k: _from_attr(v) for k, v in fh[feats_key].attrs.items()}
    attrs = {**root, **feat_attrs}
    if feats_key == "feats" and (root.get("unit") == "um" or "stamp_version" in root):
        attrs["source_format"] = "stamp"
        mpp = slide_mpp or root.get("slide_mpp")
        if mpp:
            coords = np.rint(np.asarray(coords, np.float64) / float(mpp)).astype(np.int64)
            attrs.update(coords_unit="px", slide_mpp=float(mpp))
        else:
            coords = np.asarray(coords, np.float64)
            attrs["coords_unit"] = "um"
        return Bag(features, coords, attrs, coords_attrs)
    if feats_key == "feats":
        attrs["source_format"] = "feats-px"
    elif {"patch_size_level0", "level0_magnification"} & coords_attrs.keys() or "encoder" in feat_attrs:
        attrs["source_format"] = "trident"
    else:
        attrs["source_format"] = "clam"
    attrs.setdefault("coords_unit", "px")
    return Bag(features, np.asarray(coords, np.int64), attrs, coords_attrs)


def _wsikit_from(fh: Any, root: dict[str, Any], path: Path) -> Bag:
    version = int(root.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise BagError(
            f"{path}: wsikit-bag version {version} is newer than this wsikit reads ({FORMAT_VERSION}); upgrade wsikit"
        )
    coords_ds = fh["coords"]
    context, context_index = {}, {}
    if "context" in fh:
        for name in fh["context"]:
            context[name] = fh["context"][name]["features"][()]
            context_index[name] = fh["context"][name]["index"][()]
    attrs = {**root, "source_format": "wsikit", "coords_unit": "px"}
    return Bag(
        fh["features"][()],
        np.asarray(coords_ds[()], np.int64),
        attrs,
        {k: _from_attr(v) for k, v in coords_ds.attrs.items()},
        fh["tile_index"][()] if "tile_index" in fh else None,
        fh["skipped_coords"][()] if "skipped_coords" in fh else None,
        context,
        context_index,
    )


def _read_zarr(path: Path) -> Bag:
    import zarr

    try:
        group = zarr.open_group(store=str(path), mode="r")
    except Exception as exc:
        raise BagError(f"{path}: not a readable zarr group ({type(exc).__name__}: {exc})") from exc
    attrs = dict(group.attrs)
    arrays = set(group.array_keys())
    if attrs.get("format") == FORMAT_NAME:
        context, context_index = {}, {}
        if "context" in set(group.group_keys()):
            for name, sub in group["context"].groups():
                context[name] = sub["features"][...]
                context_index[name] = sub["index"][...]
        return Bag(
            group["features"][...],
            np.asarray(group["coords"][...], np.int64),
            {**attrs, "source_format": "wsikit", "coords_unit": "px"},
            dict(group["coords"].attrs),
            group["tile_index"][...] if "tile_index" in arrays else None,
            group["skipped_coords"][...] if "skipped_coords" in arrays else None,
            context,
            context_index,
        )
    if {"features", "coordinates"} <= arrays:  # tiatoolbox: x0, y0, x1, y1 at the read resolution
        boxes = group["coordinates"][...]
        attrs.update(source_format="tiatoolbox", coords_unit="px at the read resolution")
        return Bag(group["features"][...], np.asarray(boxes[:, :2], np.int64), attrs)
    raise BagError(f"{path}: zarr group without wsikit bag attributes or tiatoolbox arrays")


def _torch_load(path: Path) -> np.ndarray:
    import torch

    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BagError(f"{path}: cannot be read as a torch file ({type(exc).__name__}: {exc})") from exc
    if isinstance(value, dict):
        value = value.get("features", value.get("feats"))
    if not hasattr(value, "numpy"):
        raise BagError(f"{path}: holds {type(value).__name__}, not a (N, D) feature tensor")
    return (value.float() if value.dtype == torch.bfloat16 else value).numpy()


def _read_pt(path: Path, slide_mpp: float | None) -> Bag:
    features = _torch_load(path)
    n = features.shape[0]
    clam_h5 = path.parent.parent / "h5_files" / f"{path.stem}.h5"
    index = path.with_name(f"{path.stem}.index.npz")
    if path.parent.name == "pt_files" and clam_h5.is_file():
        with contextlib.suppress(BagError):
            other = _read_h5(clam_h5, slide_mpp)
            if len(other) == n:
                return Bag(
                    features, other.coords, {**other.attrs, "source_format": "clam"}, other.coords_attrs
                )
    if index.is_file():
        centres = np.load(index)["arr_0"].astype(np.int64).reshape(-1, 2)
        config_path = path.parent / "bags_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        attrs: dict[str, Any] = {"source_format": "slideflow", "coords_unit": "px", **config}
        tile_um = config.get("tile_um")
        mpp = slide_mpp or config.get("slide_mpp")
        if tile_um and mpp:
            half = round(float(tile_um) / float(mpp)) // 2
            attrs["coords_origin"] = "top-left"
            return Bag(features, centres - half, attrs)
        attrs["coords_origin"] = "center"
        return Bag(features, centres, attrs)
    attrs = {"source_format": "pt", "coords_unit": "none"}
    return Bag(features, np.full((n, 2), -1, np.int64), attrs)


@contextlib.contextmanager
def open_features(path: str | os.PathLike) -> Iterator[tuple[Any, int | None, Mapping[str, Any]]]:
    """A bag's features without loading them (an h5/zarr array read by slices, a memory-mapped ``.pt``
    tensor), its number of coordinates (None when the file holds none) and its attributes."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".zarr":
        import zarr

        group = zarr.open_group(store=str(path), mode="r")
        arrays = set(group.array_keys())
        coords = next((group[k] for k in ("coords", "coordinates") if k in arrays), None)
        yield group["features"], None if coords is None else coords.shape[0], dict(group.attrs)
    elif path.suffix in (".pt", ".pth"):
        import torch

        value = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(value, dict):
            value = value.get("features", value.get("feats"))
        yield value, None, {}
    else:
        import h5py

        try:
            fh = h5py.File(path, "r")
            feats = fh["features" if "features" in fh else "feats"]
        except (OSError, KeyError) as exc:
            raise BagError(f"{path}: not a feature bag ({exc})") from exc
        with fh:
            n_coords = fh["coords"].shape[0] if "coords" in fh else None
            yield feats, n_coords, ChainMap(feats.attrs, fh.attrs)  # read lazily, features' first


def read_bag_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(N, D) of a bag without reading its features (``.pt`` files are memory-mapped)."""
    with open_features(path) as (features, _, _):
        return tuple(features.shape)  # type: ignore[return-value]


def iter_bags(folder: str | os.PathLike) -> Iterator[Path]:
    """Bag files in ``folder`` (``.h5``, ``.zarr``, ``.pt``), sorted, temporaries excluded."""
    for p in sorted(Path(folder).iterdir()):
        if not p.name.startswith(".") and p.suffix in (".h5", ".zarr", ".pt"):
            yield p


# -- exporting -----------------------------------------------------------------------------------------
def _size_level0(bag: Bag) -> int | None:
    for key in ("patch_size_level0",):
        if key in bag.coords_attrs:
            return int(bag.coords_attrs[key])
    return None


def export_bag(bag: Bag, layout: str, out_dir: str | os.PathLike, slide_id: str | None = None) -> list[Path]:
    """Write ``bag`` in a peer's layout under ``out_dir``; returns the files written (each atomically).

    * ``clam``: ``h5_files/<id>.h5`` (``features`` float32, ``coords`` int32) + ``pt_files/<id>.pt``;
    * ``trident``: ``<id>.h5`` with ``features`` (attrs ``encoder``, ``name``, ``savetodir``) and
      ``coords`` carrying the tiling attributes;
    * ``stamp``: ``<id>.h5`` with ``feats`` float16, ``coords`` float32 µm and STAMP's root attributes;
    * ``slideflow``: ``<id>.pt`` float32, ``<id>.index.npz`` (``arr_0`` tile centres, level-0 px) and
      the folder's ``bags_config.json``.
    """
    import h5py

    from wsikit.jobs import atomic_path, write_json

    out = Path(out_dir)
    sid = slide_id or str(bag.attrs.get("slide_id") or "slide")
    features32 = np.asarray(bag.features, np.float32)
    coords = np.asarray(bag.coords, np.int64)
    if bag.attrs.get("coords_unit", "px") != "px" or bag.attrs.get("coords_origin", "top-left") != "top-left":
        raise BagError(
            f"{sid}: export needs level-0 top-left pixel coordinates; read the bag with slide_mpp="
        )
    encoder = str(bag.attrs.get("encoder", "unknown"))
    written: list[Path] = []
    if layout == "clam":
        h5 = out / "h5_files" / f"{sid}.h5"
        with atomic_path(h5) as tmp, h5py.File(tmp, "w") as fh:
            fh.create_dataset("features", data=features32)
            fh.create_dataset("coords", data=coords.astype(np.int32))
        written += [h5, _save_pt(out / "pt_files" / f"{sid}.pt", features32)]
    elif layout == "trident":
        h5 = out / f"{sid}.h5"
        with atomic_path(h5) as tmp, h5py.File(tmp, "w") as fh:
            ds = fh.create_dataset("features", data=features32)
            ds.attrs.update({"encoder": encoder, "name": sid, "savetodir": str(out)})
            cds = fh.create_dataset("coords", data=coords)
            for key, value in bag.coords_attrs.items():
                cds.attrs[key] = _to_h5_attr(value)
        written.append(h5)
    elif layout == "stamp":
        mpp = bag.attrs.get("slide_mpp")
        if not mpp:
            raise BagError(f"{sid}: STAMP stores µm coordinates; the bag has no slide_mpp attribute")
        size0 = _size_level0(bag)
        size_px = int(bag.attrs.get("tile_size", bag.coords_attrs.get("patch_size", 0)))
        h5 = out / f"{sid}.h5"
        with atomic_path(h5) as tmp, h5py.File(tmp, "w") as fh:
            fh.create_dataset("feats", data=features32.astype(np.float16))
            fh.create_dataset("coords", data=(coords * float(mpp)).astype(np.float32))
            fh.attrs.update(
                {
                    "stamp_version": "2.1.0",  # the STAMP file layout followed (µm coords, tile_size_um)
                    "extractor": encoder,
                    "unit": "um",
                    "tile_size_um": float(size0 * float(mpp)) if size0 else float(size_px * float(mpp)),
                    "tile_size_px": size_px,
                    "code_hash": "wsikit",
                    "feat_type": "tile",
                    "slide_mpp": float(mpp),
                    "wsikit_version": str(bag.attrs.get("wsikit_version", "")),
                }
            )
        written.append(h5)
    elif layout == "slideflow":
        size0 = _size_level0(bag)
        if size0 is None:
            raise BagError(f"{sid}: slideflow stores tile centres; the bag's coords lack patch_size_level0")
        written.append(_save_pt(out / f"{sid}.pt", features32))
        index = out / f"{sid}.index.npz"
        with atomic_path(index) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, arr_0=coords + size0 // 2)
        written.append(index)
        mpp = bag.attrs.get("slide_mpp")
        config = {
            "extractor": {"class": encoder, "kwargs": {"weights_id": bag.attrs.get("weights_id")}},
            "normalizer": _slideflow_normalizer(bag.attrs.get("stain")),
            "num_features": bag.dim,
            "tile_px": int(bag.attrs.get("tile_size", bag.coords_attrs.get("patch_size", 0))),
            "tile_um": round(size0 * float(mpp), 3) if mpp else None,
            "slide_mpp": mpp,
        }
        written.append(write_json(out / "bags_config.json", config))
    else:
        raise BagError(f"unknown export layout {layout!r}; choose one of {', '.join(EXPORT_LAYOUTS)}")
    return written


def _slideflow_normalizer(stain: Any) -> dict[str, Any] | None:
    if isinstance(stain, str):
        with contextlib.suppress(ValueError):
            stain = json.loads(stain)
    if not isinstance(stain, dict) or not stain.get("method"):
        return None
    return {"method": stain["method"], "fit": {k: v for k, v in stain.items() if k != "method"}}


def _save_pt(path: Path, features: np.ndarray) -> Path:
    import torch

    from wsikit.jobs import atomic_path

    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(torch.from_numpy(np.ascontiguousarray(features)), tmp)
    return path
