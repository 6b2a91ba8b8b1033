"""Writing a bag in the peers' layouts: CLAM, TRIDENT, STAMP and slideflow (what each guarantees and
refuses: ``docs/feature-bag.md``)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wsikit.bags.format import Bag, BagError
from wsikit.bags.read import read_bag
from wsikit.io import atomic_path, to_h5_attr, write_json

EXPORT_LAYOUTS = ("clam", "trident", "stamp", "slideflow")


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
    if layout not in _WRITERS:
        raise BagError(f"unknown export layout {layout!r}; choose one of {', '.join(EXPORT_LAYOUTS)}")
    sid = slide_id or str(bag.attrs.get("slide_id") or "slide")
    if bag.attrs.get("coords_unit", "px") != "px" or bag.attrs.get("coords_origin", "top-left") != "top-left":
        raise BagError(
            f"{sid}: export needs level-0 top-left pixel coordinates; read the bag with slide_mpp="
        )
    return _WRITERS[layout](bag, Path(out_dir), sid)


def export_bags(
    files: Sequence[Path], layout: str, out_dir: str | os.PathLike, slide_mpp: float | None = None
) -> list[Path]:
    """:func:`export_bag` for every bag file (``slide_mpp`` fills in bags that lack it); returns the
    files written."""
    written: list[Path] = []
    for path in files:
        bag = read_bag(path, slide_mpp=slide_mpp)
        if slide_mpp and not bag.attrs.get("slide_mpp"):
            bag.attrs["slide_mpp"] = slide_mpp
        written += export_bag(bag, layout, out_dir, slide_id=str(bag.attrs.get("slide_id") or path.stem))
    return written


def _features32(bag: Bag) -> np.ndarray:
    return np.asarray(bag.features, np.float32)


def _encoder(bag: Bag) -> str:
    return str(bag.attrs.get("encoder", "unknown"))


def _clam(bag: Bag, out: Path, sid: str) -> list[Path]:
    h5 = out / "h5_files" / f"{sid}.h5"
    with atomic_path(h5) as tmp, h5py.File(tmp, "w") as fh:
        fh.create_dataset("features", data=_features32(bag))
        fh.create_dataset("coords", data=np.asarray(bag.coords, np.int32))
    return [h5, _save_pt(out / "pt_files" / f"{sid}.pt", _features32(bag))]


def _trident(bag: Bag, out: Path, sid: str) -> list[Path]:
    h5 = out / f"{sid}.h5"
    with atomic_path(h5) as tmp, h5py.File(tmp, "w") as fh:
        ds = fh.create_dataset("features", data=_features32(bag))
        ds.attrs.update({"encoder": _encoder(bag), "name": sid, "savetodir": str(out)})
        cds = fh.create_dataset("coords", data=np.asarray(bag.coords, np.int64))
        for key, value in bag.coords_attrs.items():
            cds.attrs[key] = to_h5_attr(value)
    return [h5]


def _stamp(bag: Bag, out: Path, sid: str) -> list[Path]:
    mpp = bag.attrs.get("slide_mpp")
    if not mpp:
        raise BagError(f"{sid}: STAMP stores µm coordinates; the bag has no slide_mpp attribute")
    size0 = _size_level0(bag)
    size_px = int(bag.attrs.get("tile_size", bag.coords_attrs.get("patch_size", 0)))
    h5 = out / f"{sid}.h5"
    with atomic_path(h5) as tmp, h5py.File(tmp, "w") as fh:
        fh.create_dataset("feats", data=_features32(bag).astype(np.float16))
        fh.create_dataset("coords", data=(np.asarray(bag.coords, np.int64) * float(mpp)).astype(np.float32))
        fh.attrs.update(
            {
                "stamp_version": "2.1.0",  # the STAMP file layout followed (µm coords, tile_size_um)
                "extractor": _encoder(bag),
                "unit": "um",
                "tile_size_um": float(size0 * float(mpp)) if size0 else float(size_px * float(mpp)),
                "tile_size_px": size_px,
                "code_hash": "wsikit",
                "feat_type": "tile",
                "slide_mpp": float(mpp),
                "wsikit_version": str(bag.attrs.get("wsikit_version", "")),
            }
        )
    return [h5]


def _slideflow(bag: Bag, out: Path, sid: str) -> list[Path]:
    size0 = _size_level0(bag)
    if size0 is None:
        raise BagError(f"{sid}: slideflow stores tile centres; the bag's coords lack patch_size_level0")
    written = [_save_pt(out / f"{sid}.pt", _features32(bag))]
    index = out / f"{sid}.index.npz"
    with atomic_path(index) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, arr_0=np.asarray(bag.coords, np.int64) + size0 // 2)
    written.append(index)
    mpp = bag.attrs.get("slide_mpp")
    config = {
        "extractor": {"class": _encoder(bag), "kwargs": {"weights_id": bag.attrs.get("weights_id")}},
        "normalizer": _slideflow_normalizer(bag.attrs.get("stain")),
        "num_features": bag.dim,
        "tile_px": int(bag.attrs.get("tile_size", bag.coords_attrs.get("patch_size", 0))),
        "tile_um": round(size0 * float(mpp), 3) if mpp else None,
        "slide_mpp": mpp,
    }
    return [*written, write_json(out / "bags_config.json", config)]


_WRITERS = {"clam": _clam, "trident": _trident, "stamp": _stamp, "slideflow": _slideflow}


def _slideflow_normalizer(stain: Any) -> dict[str, Any] | None:
    if isinstance(stain, str):
        with contextlib.suppress(ValueError):
            stain = json.loads(stain)
    if not isinstance(stain, dict) or not stain.get("method"):
        return None
    return {"method": stain["method"], "fit": {k: v for k, v in stain.items() if k != "method"}}


def _save_pt(path: Path, features: np.ndarray) -> Path:
    import torch

    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(torch.from_numpy(np.ascontiguousarray(features)), tmp)
    return path
