"""Writing a bag in the peers' layouts: CLAM, TRIDENT, STAMP and slideflow. What each guarantees and
refuses: ``docs/feature-bag.md``; every value written is the bag's own (read, or derived by the peer's own
rule), and a value the peer needs but the bag cannot say is refused with one line, never written as 0."""

from __future__ import annotations

import contextlib
import json
import math
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
EXPORT_IDS = ("auto", "stem", "parent")
#: The STAMP file layout written (µm coords, ``tile_size_um``): a layout version, not a STAMP release.
STAMP_LAYOUT = "2.1.0"


def require_positions(bag: Bag, where: str, what: str) -> None:
    """Refuse (one line) a bag whose coordinates are not level-0 top-left pixels, for ``what`` needs them."""
    unit, origin = bag.attrs.get("coords_unit", "px"), bag.attrs.get("coords_origin", "top-left")
    if unit == "none":
        raise BagError(
            f"{where}: the bag has no tile coordinates (coords_unit 'none'); {what} needs positions: "
            "re-extract with wsikit (or read a layout that stores them)"
        )
    if unit != "px" or origin != "top-left":
        kind = (
            "µm coordinates"
            if unit == "um"
            else "tile centres"
            if origin == "center"
            else f"{unit} coordinates"
        )
        raise BagError(
            f"{where}: the bag holds {kind}; {what} needs level-0 top-left pixels: pass the slide's "
            "resolution (--slide-mpp, Python slide_mpp=)"
        )


def _size_level0(bag: Bag) -> int | None:
    """A tile's side in level-0 pixels, as the bag says it (TRIDENT/wsikit ``patch_size_level0``,
    wsikit ``size_level0``), or None."""
    for attrs, key in ((bag.coords_attrs, "patch_size_level0"), (bag.attrs, "size_level0")):
        with contextlib.suppress(TypeError, ValueError):
            if attrs.get(key):
                return int(attrs[key])
    return None


def _tile_px(bag: Bag) -> int | None:
    """A tile's side in pixels as fed to the encoder's grid (STAMP, wsikit, TRIDENT/CLAM, slideflow), or None."""
    for attrs, key in ((bag.attrs, "tile_size_px"), (bag.attrs, "tile_size"), (bag.coords_attrs, "patch_size"),
                       (bag.attrs, "tile_px")):  # fmt: skip
        value = attrs.get(key)
        if isinstance(value, int | float | np.integer | np.floating) and value > 0:
            return int(value)
    return None


def _encoder(bag: Bag) -> str | None:
    """The encoder's name (wsikit/TRIDENT ``encoder``, STAMP ``extractor``), or None when the bag has none."""
    for key in ("extractor", "encoder"):
        value = bag.attrs.get(key)
        if isinstance(value, str) and value and value != "None":
            return value
    return None


def export_bag(bag: Bag, layout: str, out_dir: str | os.PathLike, slide_id: str | None = None) -> list[Path]:
    """Write ``bag`` in a peer's layout under ``out_dir``; returns the files written (each atomically).

    * ``clam``: ``h5_files/<id>.h5`` (``features`` float32, ``coords`` int32) + ``pt_files/<id>.pt``;
    * ``trident``: ``<id>.h5`` with ``features`` float32 (attrs ``encoder``, ``name``, ``savetodir``) and
      ``coords`` int64 carrying the tiling attributes;
    * ``stamp``: ``<id>.h5`` with ``feats`` float16, ``coords`` float32 µm and STAMP's root attributes;
    * ``slideflow``: ``<id>.pt`` float32, ``<id>.index.npz`` (``arr_0`` tile centres, level-0 px) and
      the folder's ``bags_config.json`` (an integer ``tile_um``).

    Raises :class:`BagError` (naming the slide and the fix) when the bag cannot say what the layout needs.
    """
    if layout not in _WRITERS:
        raise BagError(f"unknown export layout {layout!r}; choose one of {', '.join(EXPORT_LAYOUTS)}")
    sid = slide_id or str(bag.attrs.get("slide_id") or "slide")
    _plan(bag, layout, sid, Path(out_dir))
    return _WRITERS[layout](bag, Path(out_dir), sid)


def _plan(bag: Bag, layout: str, sid: str, out: Path) -> dict[str, Any]:
    """What ``layout`` would write for ``bag`` (checked, nothing written); refuses with one line naming
    ``sid`` (the slide id, or the bag's file)."""
    if layout == "stamp" and bag.attrs.get("coords_unit") == "um":  # STAMP's own unit: no MPP needed
        return _stamp_plan(bag, sid)
    if layout == "slideflow" and bag.attrs.get("coords_origin") == "center":  # slideflow's own centres
        return _slideflow_plan(bag, sid, out)
    require_positions(bag, sid, f"{layout} export")
    if layout == "stamp":
        return _stamp_plan(bag, sid)
    if layout == "slideflow":
        return _slideflow_plan(bag, sid, out)
    return {}


def export_ids(paths: Sequence[Path], bags: Sequence[Bag], id_from: str = "auto") -> list[str]:
    """The slide id each bag is exported as (``auto``: its ``slide_id`` attribute, else the file name;
    ``stem``: the file name; ``parent``: the folder's name); refuses two bags that would share one."""
    if id_from not in EXPORT_IDS:
        raise BagError(f"--id-from {id_from!r}: use one of {', '.join(EXPORT_IDS)}")
    ids, seen = [], {}
    for path, bag in zip(paths, bags, strict=True):
        sid = {"auto": str(bag.attrs.get("slide_id") or path.stem), "stem": path.stem,
               "parent": path.parent.name}[id_from]  # fmt: skip
        if sid in seen:
            raise BagError(
                f"two bags would be exported as slide '{sid}': {seen[sid]} and {path}; "
                "give each a slide_id attribute, or name them by folder (--id-from parent)"
            )
        seen[sid] = path
        ids.append(sid)
    return ids


def export_bags(
    files: Sequence[Path],
    layout: str,
    out_dir: str | os.PathLike,
    slide_mpp: float | None = None,
    id_from: str = "auto",
) -> list[Path]:
    """:func:`export_bag` for every bag file (``slide_mpp`` fills in bags that lack it); returns the files
    written. Every bag is checked (ids unique, the layout's needs met) before the first file is written,
    so a refusal leaves ``out_dir`` as it was; each bag is therefore read twice."""
    out = Path(out_dir)
    bags = [_with_mpp(read_bag(path, slide_mpp=slide_mpp), slide_mpp) for path in files]
    ids = export_ids(files, bags, id_from)
    plans = [_plan(bag, layout, str(path), out) for bag, path in zip(bags, files, strict=True)]
    if layout == "slideflow" and len({(p["tile_um"], p["tile_px"]) for p in plans}) > 1:
        sizes = sorted({f"{p['tile_um']} µm / {p['tile_px']} px" for p in plans})
        raise BagError(
            f"slideflow keeps one tile_um and tile_px per bags folder; these bags need {', '.join(sizes)}: "
            "export each group to its own folder"
        )
    del bags
    written: list[Path] = []
    for path, sid in zip(files, ids, strict=True):
        written += export_bag(_with_mpp(read_bag(path, slide_mpp=slide_mpp), slide_mpp), layout, out, sid)
    return written


def _with_mpp(bag: Bag, slide_mpp: float | None) -> Bag:
    if slide_mpp and not bag.attrs.get("slide_mpp"):
        bag.attrs["slide_mpp"] = slide_mpp
    return bag


def _features32(bag: Bag) -> np.ndarray:
    return np.asarray(bag.features, np.float32)


def _clam(bag: Bag, out: Path, sid: str) -> list[Path]:
    h5 = out / "h5_files" / f"{sid}.h5"
    with atomic_path(h5) as tmp, h5py.File(tmp, "w") as fh:
        fh.create_dataset("features", data=_features32(bag))
        fh.create_dataset("coords", data=np.asarray(bag.coords, np.int32))
    return [h5, _save_pt(out / "pt_files" / f"{sid}.pt", _features32(bag))]


def _trident(bag: Bag, out: Path, sid: str) -> list[Path]:
    h5 = out / f"{sid}.h5"
    coords_attrs = dict(bag.coords_attrs)
    if "patch_size_level0" not in coords_attrs and _size_level0(bag):  # what TRIDENT's slide encoders read
        coords_attrs["patch_size_level0"] = _size_level0(bag)
    with atomic_path(h5) as tmp, h5py.File(tmp, "w") as fh:
        ds = fh.create_dataset("features", data=_features32(bag))
        ds.attrs.update({"encoder": _encoder(bag) or "None", "name": sid, "savetodir": str(out)})
        cds = fh.create_dataset("coords", data=np.asarray(bag.coords, np.int64))
        for key, value in coords_attrs.items():
            cds.attrs[key] = to_h5_attr(value)
    return [h5]


def _stamp_plan(bag: Bag, sid: str) -> dict[str, Any]:
    """STAMP's tile size in µm (and px, extractor, µm coords) from the bag's own attributes."""
    um = bag.attrs.get("coords_unit") == "um"
    mpp = None if um else bag.attrs.get("slide_mpp")
    if not um and not mpp:
        raise BagError(f"{sid}: STAMP stores µm coordinates and the bag has no slide_mpp; pass --slide-mpp")
    size0 = _size_level0(bag)
    if bag.attrs.get("tile_size_um"):
        tile_um = float(bag.attrs["tile_size_um"])
    elif bag.attrs.get("unit") == "um" and bag.attrs.get("tile_size"):  # STAMP's v2 layout
        tile_um = float(bag.attrs["tile_size"])
    elif size0 and mpp:
        tile_um = size0 * float(mpp)
    elif isinstance(bag.attrs.get("tile_um"), int) and bag.attrs.get("tile_um"):  # slideflow
        tile_um = float(bag.attrs["tile_um"])
    else:
        raise BagError(
            f"{sid}: STAMP needs the tile size in µm and the bag does not say it (no tile_size_um, "
            "patch_size_level0 or size_level0); export from the wsikit or TRIDENT file instead"
        )
    coords = np.asarray(bag.coords, np.float64) if um else np.asarray(bag.coords, np.int64) * float(mpp)
    return {"tile_um": tile_um, "tile_px": _tile_px(bag), "coords_um": coords.astype(np.float32), "mpp": mpp}


def _stamp(bag: Bag, out: Path, sid: str) -> list[Path]:
    plan = _stamp_plan(bag, sid)
    attrs: dict[str, Any] = {
        "stamp_version": STAMP_LAYOUT,
        "unit": "um",
        "tile_size_um": plan["tile_um"],
        "code_hash": str(bag.attrs.get("code_hash") or "wsikit"),
        "feat_type": "tile",
    }
    optional = {"extractor": _encoder(bag), "tile_size_px": plan["tile_px"], "slide_mpp": plan["mpp"],
                "wsikit_version": bag.attrs.get("wsikit_version")}  # fmt: skip
    attrs.update({k: v for k, v in optional.items() if v})  # only what the bag knows: never 0 or 'unknown'
    h5 = out / f"{sid}.h5"
    with atomic_path(h5) as tmp, h5py.File(tmp, "w") as fh:
        fh.create_dataset("feats", data=_features32(bag).astype(np.float16))
        fh.create_dataset("coords", data=plan["coords_um"])
        fh.attrs.update(attrs)
    return [h5]


def slideflow_tile_um(size0: int, mpp: float) -> int | None:
    """The whole-µm ``tile_um`` for which slideflow reads ``size0``-px tiles at ``mpp`` µm/px
    (slideflow: ``full_extract_px = int(tile_um / mpp)``), the closest to ``size0 × mpp``; None if none."""
    fits = [t for t in range(max(1, math.floor(size0 * mpp) - 1), math.ceil(size0 * mpp) + 2)
            if int(t / mpp) == size0]  # fmt: skip
    return min(fits, key=lambda t: abs(t - size0 * mpp)) if fits else None


def _slideflow_plan(bag: Bag, sid: str, out: Path) -> dict[str, Any]:
    """slideflow's integer ``tile_um`` and ``tile_px`` reproducing the bag's tiles; refused when none does.
    A slideflow bag read without an MPP (tile centres) keeps its centres, ``tile_um`` and ``tile_px``."""
    if bag.attrs.get("coords_origin") == "center":
        if bag.attrs.get("source_format") != "slideflow" or not bag.attrs.get("tile_um") or not _tile_px(bag):
            raise BagError(f"{sid}: tile centres without slideflow's tile_um/tile_px; pass --slide-mpp")
        return _folder_check(
            {"tile_um": bag.attrs["tile_um"], "tile_px": _tile_px(bag), "size0": None}, sid, out
        )
    size0, mpp, tile_px = _size_level0(bag), bag.attrs.get("slide_mpp"), _tile_px(bag)
    if size0 is None or not mpp or tile_px is None:
        missing = "slide_mpp (pass --slide-mpp)" if not mpp else "the tile size (patch_size_level0, tile_px)"
        raise BagError(f"{sid}: slideflow sizes tiles in whole µm and the bag lacks {missing}")
    tile_um = slideflow_tile_um(size0, float(mpp))
    if tile_um is None:
        near = sorted({math.floor(size0 * mpp), math.ceil(size0 * mpp)})
        raise BagError(
            f"{sid}: slideflow sizes tiles in whole µm (tile_um); at {float(mpp):g} µm/px no integer tile_um "
            f"gives {size0}-px tiles ({', '.join(f'{t} → {int(t / mpp)}' for t in near)} px); re-tile with a "
            "tile size slideflow can make, or export to another layout"
        )
    return _folder_check({"tile_um": tile_um, "tile_px": tile_px, "size0": size0}, sid, out)


def _folder_check(plan: dict[str, Any], sid: str, out: Path) -> dict[str, Any]:
    """``plan``, unless ``out`` already holds slideflow bags of another tile size (one per folder)."""
    old = _folder_config(out)
    if old and (old.get("tile_um"), old.get("tile_px")) != (plan["tile_um"], plan["tile_px"]):
        raise BagError(
            f"{out / 'bags_config.json'}: holds bags of tile_um {old.get('tile_um')} / tile_px "
            f"{old.get('tile_px')}; {sid} needs {plan['tile_um']} / {plan['tile_px']} (slideflow keeps one per "
            "folder): export to another folder"
        )
    return plan


def _slideflow(bag: Bag, out: Path, sid: str) -> list[Path]:
    plan = _slideflow_plan(bag, sid, out)
    written = [_save_pt(out / f"{sid}.pt", _features32(bag))]
    index = out / f"{sid}.index.npz"
    centres = np.asarray(
        bag.coords, np.int64
    )  # slideflow's own centres, or top-left + int(full_extract_px / 2)
    with atomic_path(index) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, arr_0=centres if plan["size0"] is None else centres + int(plan["size0"] / 2))
    written.append(index)
    if bag.attrs.get("source_format") == "slideflow":  # a slideflow bag keeps its extractor and normalizer
        extractor, normalizer = bag.attrs.get("extractor"), bag.attrs.get("normalizer")
    else:
        extractor = {"class": _encoder(bag), "kwargs": {"weights_id": bag.attrs.get("weights_id")}}
        normalizer = _slideflow_normalizer(bag.attrs.get("stain"))
    config = {"extractor": extractor, "normalizer": normalizer, "num_features": bag.dim,
              "tile_px": plan["tile_px"], "tile_um": plan["tile_um"]}  # fmt: skip
    return [*written, write_json(out / "bags_config.json", config)]


def _folder_config(out: Path) -> dict[str, Any]:
    """The ``bags_config.json`` already in ``out`` (empty when absent or unreadable: it is rewritten)."""
    try:
        config = json.loads((out / "bags_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


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
