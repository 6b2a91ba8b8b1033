"""Reading feature bags of any supported layout: wsikit (HDF5, Zarr), CLAM (``h5_files/*.h5``,
``pt_files/*.pt``), TRIDENT, STAMP (``feats`` + µm coords), the common ``feats`` + pixel ``coords``
variant, slideflow (``.pt`` + ``.index.npz``) and tiatoolbox zarr; the layout is recognised by content
and recorded as ``attrs["source_format"]``. Layouts: ``docs/feature-bag.md``, ``shared/notes``."""

from __future__ import annotations

import contextlib
import json
import os
from collections import ChainMap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wsikit.bags.format import FORMAT_NAME, FORMAT_VERSION, Bag, BagError
from wsikit.io import from_h5_attr


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
        coords_ds = fh.get("coords", None)
        coords = coords_ds[()] if coords_ds is not None else np.zeros((features.shape[0], 2), np.int64)
        coords_attrs = (
            {k: from_h5_attr(v) for k, v in coords_ds.attrs.items()} if coords_ds is not None else {}
        )
        feat_attrs = {k: from_h5_attr(v) for k, v in fh[feats_key].attrs.items()}
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
