"""Reading feature bags of any supported layout: wsikit (HDF5, Zarr), CLAM (``h5_files/*.h5``,
``pt_files/*.pt``), TRIDENT, STAMP (``feats`` + µm coords), the common ``feats`` + pixel ``coords``
variant, slideflow (``.pt`` + ``.index.npz``) and tiatoolbox zarr; the layout is recognised by content
and recorded as ``attrs["source_format"]``. Layouts: ``docs/feature-bag.md``, ``shared/notes``."""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
from collections import ChainMap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wsikit.bags.format import FORMAT_NAME, FORMAT_VERSION, Bag, BagError
from wsikit.io import first_line, from_h5_attr


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
        root = {k: from_h5_attr(v) for k, v in fh.attrs.items()}
        if root.get("format") == FORMAT_NAME:
            return _wsikit_from(fh, root, path)
        feats_key = "features" if "features" in fh else "feats" if "feats" in fh else None
        if feats_key is None or not isinstance(fh[feats_key], h5py.Dataset):
            raise BagError(
                f"{path}: no 'features' or 'feats' dataset (found: {', '.join(fh) or 'nothing'}); not a feature bag"
            )
        features = fh[feats_key][()]
        if features.ndim == 1:
            raise BagError(
                f"{path}: a slide-level embedding {features.shape} (TRIDENT slide_features_*, STAMP slide or "
                "patient features), not one row per tile; read the tile features (features_<encoder>/) instead"
            )
        coords_ds = fh.get("coords", None)
        coords = coords_ds[()] if coords_ds is not None else _coords_from_names(fh, len(features))
        coords_attrs = (
            {k: from_h5_attr(v) for k, v in coords_ds.attrs.items()} if coords_ds is not None else {}
        )
        feat_attrs = {k: from_h5_attr(v) for k, v in fh[feats_key].attrs.items()}
    attrs = {**root, **feat_attrs}
    if coords is None:  # no positions in the file: marked unknown, refused by whatever needs them
        attrs.update(source_format="features-only", coords_unit="none")
        return _bag(path, features, np.full((len(features), 2), -1, np.int64), attrs)
    if coords_ds is None:
        attrs.update(source_format="features-only", coords_unit="px", coords_source="tile names")
        return _bag(path, features, coords, attrs)
    if feats_key == "feats" and (root.get("unit") == "um" or "stamp_version" in root):
        return _stamp_from(path, features, coords, attrs, coords_attrs, slide_mpp)
    if feats_key == "feats":
        attrs["source_format"] = "feats-px"
    elif {"patch_size_level0", "level0_magnification"} & coords_attrs.keys() or "encoder" in feat_attrs:
        attrs["source_format"] = "trident"
    else:
        attrs["source_format"] = "clam"
    attrs.setdefault("coords_unit", "px")
    return _bag(path, features, np.asarray(coords, np.int64), attrs, coords_attrs)


def _bag(path: Path, features: Any, coords: Any, attrs: dict[str, Any], coords_attrs: Any = None) -> Bag:
    """A :class:`Bag`, with the file named in any shape error."""
    try:
        return Bag(features, coords, attrs, coords_attrs or {})
    except BagError as exc:
        raise BagError(f"{path}: {exc}") from exc


#: wsikit's tile-image names (``<slide>_x<X>_y<Y>.png``, level-0 top-left): the only names read as positions.
_TILE_NAME = re.compile(r"_x(\d+)_y(\d+)(?:\.\w+)?$")


def _coords_from_names(fh: Any, n: int) -> np.ndarray | None:
    """Level-0 top-lefts from a ``metadata``/``tile_names`` dataset of wsikit tile-image names when every
    row matches; None otherwise (positions unknown: never guessed)."""
    for key in ("metadata", "tile_names"):
        ds = fh.get(key)
        if ds is None or getattr(ds, "shape", None) != (n,) or ds.dtype.kind not in "SOU":
            continue
        names = [v.decode() if isinstance(v, bytes) else str(v) for v in ds[()]]
        found = [_TILE_NAME.search(name) for name in names]
        if n and all(found) and len({m[0] for m in found}) == n:  # type: ignore[index]
            return np.array([(int(m[1]), int(m[2])) for m in found], np.int64)  # type: ignore[index]
    return None


def _stamp_from(
    path: Path,
    features: np.ndarray,
    coords: np.ndarray,
    attrs: dict[str, Any],
    coords_attrs: dict[str, Any],
    slide_mpp: float | None,
) -> Bag:
    """A STAMP bag: µm top-lefts, converted to level-0 pixels when the slide's MPP is known."""
    attrs["source_format"] = "stamp"
    mpp = slide_mpp or attrs.get("slide_mpp")
    if not mpp:
        attrs["coords_unit"] = "um"
        return _bag(path, features, np.asarray(coords, np.float64), attrs, coords_attrs)
    attrs.update(coords_unit="px", slide_mpp=float(mpp))
    tile_um = attrs.get("tile_size_um") or (attrs.get("tile_size") if attrs.get("unit") == "um" else None)
    if tile_um:  # STAMP reads ceil(tile_size_um / slide_mpp) level-0 px per tile (preprocessing/tiling.py)
        attrs["size_level0"] = math.ceil(float(tile_um) / float(mpp) - 1e-9)
    px = np.rint(np.asarray(coords, np.float64) / float(mpp)).astype(np.int64)
    return _bag(path, features, px, attrs, coords_attrs)


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
        {k: from_h5_attr(v) for k, v in coords_ds.attrs.items()},
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
        boxes = np.asarray(group["coordinates"][...]).reshape(-1, 4)
        features = group["features"][...]
        if len(boxes) and not boxes[:, :2].any():  # patch mode: every box is [0, 0, h, w]
            attrs.update(source_format="tiatoolbox", coords_unit="none")
            return _bag(path, features, np.full((len(boxes), 2), -1, np.int64), attrs)
        attrs.update(source_format="tiatoolbox", coords_unit="px at the read resolution")
        return _bag(path, features, np.asarray(boxes[:, :2], np.int64), attrs)
    raise BagError(f"{path}: zarr group without wsikit bag attributes or tiatoolbox arrays")


#: What a ``.pt`` of features may hold besides tensors: a pickled numpy array (TRIDENT's ``saveas='pt'``).
_NUMPY_GLOBALS = {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray",
                  "numpy.dtype"}  # fmt: skip


def _allowed_global(name: str) -> Any:
    """The object a ``.pt`` names, when it is one of the numpy pieces of a pickled array; else None."""
    if name not in _NUMPY_GLOBALS and not re.fullmatch(r"numpy\.dtypes\.\w+DType", name):
        return None
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def _torch_value(path: Path, mmap: bool = False) -> Any:
    """A ``.pt`` file's object, loaded with ``weights_only`` (tensors, plain containers and numpy arrays)."""
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        extra = [_allowed_global(g) for g in names]
        if not all(g is not None for g in extra):
            names = ", ".join(n for n, g in zip(names, extra, strict=True) if g is None)
            raise BagError(f"{path}: the .pt holds {names}, not a tensor or numpy array of features; "
                           "wsikit loads only those (torch weights_only)")  # fmt: skip
        if extra:  # a numpy array's dtype is pickled as its class (numpy.dtypes.Float32DType, …)
            extra += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
        with torch.serialization.safe_globals(extra):
            value = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except BagError:
        raise
    except Exception as exc:
        raise BagError(
            f"{path}: cannot be read as a torch file ({type(exc).__name__}: {first_line(exc)})"
        ) from exc
    if isinstance(value, dict):
        value = value.get("features", value.get("feats"))
    return value


def _torch_load(path: Path) -> np.ndarray:
    import torch

    value = _torch_value(path)
    if isinstance(value, np.ndarray):
        return value
    if not hasattr(value, "numpy"):
        raise BagError(f"{path}: holds {type(value).__name__}, not a (N, D) feature tensor")
    return (value.float() if value.dtype == torch.bfloat16 else value).numpy()


def _read_pt(path: Path, slide_mpp: float | None) -> Bag:
    features = _torch_load(path)
    if features.ndim == 1:
        raise BagError(f"{path}: a slide-level embedding {features.shape}, not one row per tile")
    n = features.shape[0]
    clam_h5 = path.parent.parent / "h5_files" / f"{path.stem}.h5"
    if path.parent.name == "pt_files" and clam_h5.is_file():
        with contextlib.suppress(BagError):
            other = _read_h5(clam_h5, slide_mpp)
            if len(other) == n:
                attrs = {**other.attrs, "source_format": "clam"}
                return _bag(path, features, other.coords, attrs, other.coords_attrs)
    index = next(
        (p for p in (path.with_name(f"{path.stem}.index.{e}") for e in ("npz", "npy")) if p.is_file()), None
    )
    if index is not None:
        return _slideflow_from(path, features, index, slide_mpp)
    attrs = {"source_format": "pt", "coords_unit": "none"}
    return _bag(path, features, np.full((n, 2), -1, np.int64), attrs)


def _slideflow_config(path: Path) -> dict[str, Any]:
    """The folder's ``bags_config.json`` (empty when absent), refused with its path when unreadable."""
    config_path = path.parent / "bags_config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise BagError(f"{config_path}: not readable JSON ({first_line(exc)}); rewrite it") from exc
    if not isinstance(config, dict):
        raise BagError(f"{config_path}: not a JSON object of slideflow bag settings")
    return config


def _slideflow_from(path: Path, features: np.ndarray, index: Path, slide_mpp: float | None) -> Bag:
    """A slideflow bag: tile centres (level-0 px), turned into top-lefts by slideflow's own rule
    (``full_extract_px = int(tile_um / mpp)``, centre = top-left + ``int(full_extract_px / 2)``)."""
    try:
        loaded = np.load(index)
        centres = np.asarray(loaded["arr_0"] if index.suffix == ".npz" else loaded, np.int64).reshape(-1, 2)
    except (OSError, ValueError, KeyError) as exc:
        raise BagError(f"{index}: not a slideflow tile index ({first_line(exc)})") from exc
    config = _slideflow_config(path)
    attrs: dict[str, Any] = {"source_format": "slideflow", "coords_unit": "px", **config}
    tile_um, mpp = config.get("tile_um"), slide_mpp or config.get("slide_mpp")
    if not (tile_um and mpp):
        attrs["coords_origin"] = "center"
        return _bag(path, features, centres, attrs)
    if isinstance(tile_um, str):
        raise BagError(
            f"{path}: bags_config.json tile_um {tile_um!r} is a magnification; slideflow sized those tiles "
            "from the slide's pyramid level nearest it, which the bags do not record; read them without "
            "--slide-mpp (tile centres are kept)"
        )
    full_extract = int(float(tile_um) / float(mpp))
    attrs.update(coords_origin="top-left", slide_mpp=float(mpp), size_level0=full_extract)
    coords_attrs = {"patch_size_level0": full_extract}
    if config.get("tile_px"):
        coords_attrs["patch_size"] = int(config["tile_px"])
    return _bag(path, features, centres - int(full_extract / 2), attrs, coords_attrs)


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

        value = _torch_value(path, mmap=True)
        yield torch.from_numpy(value) if isinstance(value, np.ndarray) else value, None, {}
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
