"""What a job holds for each slide, as the JSON payloads the viewer draws.

A :class:`ViewJob` is built once from a job directory (and optionally a slide list, trained runs and
``wsikit heatmap`` output folders). Slides are addressed by a **key** — the slide id when it is a safe
file name, else ``s<n>`` — and every file the viewer reads is found from that key through tables built
at start-up, never from a path taken from a URL. Payloads (plain dicts, JSON-able):

``slides``          the slide list: id, tiles, tissue %, stage states, predictions (once scored)
``slide/<key>``     size, MPP, the DeepZoom geometry and the layers available
``.../mask``        tissue outlines, holes and excluded regions (ink in its own colour), level-0 px
``.../grid-<spec>`` one tile grid: level-0 corners and tissue fractions as base64 little-endian arrays
``.../scores-<i>``  per-tile scores of a run or a heatmap CSV (see :mod:`wsikit.view.scores`)
``.../skipped``     tiles the extraction could not read (from its status records)

Per-tile arrays travel as typed arrays (8 bytes a tile for corners, 4 per value): 100,000 tiles are
about 1.2 MB of base64 per layer, decoded and drawn by the browser on one canvas (``docs/view.md``).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsikit.grids import grid_path, list_specs, read_grid
from wsikit.io import read_text
from wsikit.jobs import JobError, SlideEntry, read_status
from wsikit.specs import SPEC_NAME_RE, TilingError
from wsikit.view.base import SlideRecord, ViewError, inside, pack, tile_arrays
from wsikit.view.dzi import DeepZoom
from wsikit.view.scores import ScoreSource

SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Ink colours by name (``properties.ink_colour`` of an excluded region), drawn in that colour.
INK_RGB = {"blue": (40, 90, 230), "green": (20, 170, 70), "black": (20, 20, 20), "red": (230, 40, 40)}
OTHER_RGB = (150, 150, 150)


def _rings(geometry: dict[str, Any]) -> list[list[list[float]]]:
    """A Polygon's or MultiPolygon's polygons, each a list of rings (outline first, then holes)."""
    kind, coords = geometry.get("type"), geometry.get("coordinates") or []
    polygons = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else []
    return [[[round(float(v), 1) for pt in ring for v in pt[:2]] for ring in poly] for poly in polygons]


def mask_layer(path: Path) -> dict[str, Any]:
    """Tissue outlines, holes and excluded regions of a ``masks/<id>.geojson`` (level-0 px, flat rings).

    Features classified ``Tissue`` (or unclassified) give outlines and holes; any other class (``Ink``
    from the ink detector, a user's ``Exclude``…) is an excluded region drawn in its ink's colour
    (``properties.ink_colour``), else its classification colour.
    """
    try:
        data = json.loads(read_text(path, "tissue GeoJSON"))
        features = data.get("features", []) if isinstance(data, dict) else None
    except (JobError, ValueError) as exc:
        raise ViewError(f"{path}: not a readable GeoJSON mask ({exc}); re-run `wsikit tile`") from exc
    if not isinstance(features, list):
        raise ViewError(f"{path}: not a GeoJSON FeatureCollection; re-run `wsikit tile`")
    tissue, holes, excluded = [], [], []
    for feature in features:
        props = feature.get("properties") or {}
        cls = props.get("classification") or {}
        name = cls.get("name", "Tissue") if isinstance(cls, dict) else str(cls)
        polygons = _rings(feature.get("geometry") or {})
        if name == "Tissue":
            for poly in polygons:
                tissue.append(poly[0])
                holes.extend(poly[1:])
            continue
        ink = props.get("ink_colour")
        colour = cls.get("color") if isinstance(cls, dict) else None
        rgb = INK_RGB.get(ink) or (colour if isinstance(colour, list) and len(colour) == 3 else OTHER_RGB)
        excluded.append(
            {
                "name": name,
                "ink": ink,
                "rgb": [int(c) for c in rgb],
                "rings": [r for p in polygons for r in p],
            }
        )
    return {"kind": "mask", "tissue": tissue, "holes": holes, "excluded": excluded}


def _slide_attrs(grid_file: Path) -> dict[str, Any]:
    """``slide_path`` and ``slide_mpp`` of a coordinates file (attributes only: the coordinates stay on disk)."""
    import h5py

    try:
        with h5py.File(grid_file, "r") as fh:
            attrs = fh["coords"].attrs
            return {
                k: attrs[k].decode() if isinstance(attrs[k], bytes) else attrs[k]
                for k in ("slide_path", "slide_mpp")
                if k in attrs
            }
    except (OSError, KeyError):
        return {}


def _job_ids(job: Path) -> set[str]:
    ids = {p.stem for p in (job / "masks").glob("*.geojson")}
    ids |= {p.stem for p in (job / "tiles").glob("*/*.h5")}
    ids |= {p.stem for p in (job / "status").glob("*/*.json")}
    return {i for i in ids if not i.startswith(".")}


def _keys(ids: Sequence[str]) -> dict[str, str]:
    """URL keys: the id itself when safe and unique case-insensitively, else ``s<n>``."""
    keys, seen = {}, set()
    for n, sid in enumerate(ids):
        key = sid if SAFE_KEY.match(sid) and sid.lower() not in seen else f"s{n}"
        while key.lower() in seen:
            key = f"s{n}_{len(seen)}"
        seen.add(key.lower())
        keys[sid] = key
    return keys


class ViewJob:
    """A job directory as the viewer sees it: slides by key, their files, and the score sources."""

    def __init__(
        self,
        job_dir: str | os.PathLike,
        slides: Sequence[SlideEntry] | None = None,
        runs: Sequence[str | os.PathLike] = (),
        heatmaps: Sequence[str | os.PathLike] = (),
    ) -> None:
        self.job = Path(job_dir).expanduser()
        if not self.job.is_dir():
            raise ViewError(f"{self.job}: no such job directory; give the folder `wsikit tile --out` wrote")
        given = {e.slide_id: e for e in slides or []}
        ids = sorted(given) if slides else sorted(_job_ids(self.job))
        if not ids:
            raise ViewError(
                f"{self.job}: no slides (no masks/, tiles/ or status/ records); run `wsikit tile` first "
                "or give the job directory it wrote"
            )
        self.specs = list_specs(self.job)
        keys = _keys(ids)
        self.slides: dict[str, SlideRecord] = {}
        for sid in ids:
            self.slides[keys[sid]] = self._record(sid, keys[sid], given.get(sid))
        self.sources = [ScoreSource.for_run(Path(r)) for r in runs]
        self.sources += [ScoreSource.for_heatmaps(Path(h)) for h in heatmaps]
        self._lock = threading.Lock()
        self._deepzoom: dict[str, Any] = {}

    def _record(self, sid: str, key: str, entry: SlideEntry | None) -> SlideRecord:
        specs, path, mpp = [], entry.path if entry else None, entry.mpp if entry else None
        for spec in self.specs:
            file = grid_path(self.job, spec, sid)
            if not (file.is_file() and inside(file, self.job / "tiles")):
                continue
            specs.append(spec)
            if path is None or mpp is None:
                attrs = _slide_attrs(file)
                path = path or (Path(attrs["slide_path"]) if attrs.get("slide_path") else None)
                mpp = mpp or attrs.get("slide_mpp")
        return SlideRecord(sid, key, path, float(mpp) if mpp else None, specs)

    def record(self, key: str) -> SlideRecord:
        """The slide of ``key``; a key the job does not have raises ``KeyError``."""
        return self.slides[key]

    def job_file(self, *parts: str) -> Path | None:
        """``<job>/<parts…>`` when it is a file that resolves inside its top-level folder of the job."""
        path = self.job.joinpath(*parts)
        return path if path.is_file() and inside(path, self.job / parts[0]) else None

    # -- slide list ------------------------------------------------------------------------------------
    def slide_list(self) -> dict[str, Any]:
        rows = []
        for key, rec in self.slides.items():
            tile = (
                read_status(self.job, "tile", rec.slide_id)
                if self.job_file("status", "tile", f"{rec.slide_id}.json")
                else None
            )
            info = tile.info if tile else {}
            states = {}
            for stage_dir in sorted((self.job / "status").glob("*/")):
                if self.job_file("status", stage_dir.name, f"{rec.slide_id}.json"):
                    status = read_status(self.job, stage_dir.name, rec.slide_id)
                    states[stage_dir.name] = status.state if status else "unreadable"
            tiles = info.get("tiles") or {}
            rows.append(
                {
                    "key": key,
                    "id": rec.slide_id,
                    "tiles": tiles.get(rec.specs[0]) if rec.specs else None,
                    "tissue_pct": round(100 * info["tissue_fraction"], 1)
                    if "tissue_fraction" in info
                    else None,
                    "states": states,
                    "has_slide": rec.path is not None,
                    "predictions": [s.cached_prediction(rec) for s in self.sources],
                }
            )
        return {"job": self.job.name, "sources": [s.label for s in self.sources], "slides": rows}

    # -- one slide -------------------------------------------------------------------------------------
    def deepzoom(self, key: str) -> Any:
        """The slide's :class:`~wsikit.view.dzi.DeepZoom` (opened once)."""
        rec = self.record(key)
        with self._lock:
            if key not in self._deepzoom:
                if rec.path is None:
                    raise ViewError(
                        f"{rec.slide_id}: the job does not name its slide file; pass --slides with the slide"
                    )
                self._deepzoom[key] = DeepZoom(rec.path, key, rec.mpp, rec.slide_id)
            return self._deepzoom[key]

    def meta(self, key: str) -> dict[str, Any]:
        rec = self.record(key)
        dz = self.deepzoom(key)
        layers: list[dict[str, Any]] = []
        if self.job_file("masks", f"{rec.slide_id}.geojson"):
            layers.append({"name": "mask", "kind": "mask", "label": "tissue outline, holes, excluded"})
        for spec in rec.specs:
            layers.append({"name": f"grid-{spec}", "kind": "grid", "label": f"tiles {spec}"})
        for i, source in enumerate(self.sources):
            if source.has(rec, self):
                layers.append({"name": f"scores-{i}", "kind": "scores", "label": source.label})
        if self._skipped(rec):
            layers.append({"name": "skipped", "kind": "skipped", "label": "skipped (unreadable) tiles"})
        dzi = {
            **dz.descriptor(),
            "levels": dz.max_level,
        }  # levels: the finest level served (exports may stop earlier)
        return {"key": key, "id": rec.slide_id, "mpp": rec.mpp, "dzi": dzi, "layers": layers}

    def layer(self, key: str, name: str) -> dict[str, Any]:
        """A layer's payload; an unknown layer raises ``KeyError``."""
        rec = self.record(key)
        if name == "mask":
            path = self.job_file("masks", f"{rec.slide_id}.geojson")
            if path is None:
                raise KeyError(name)
            return mask_layer(path)
        if name.startswith("grid-") and name[5:] in rec.specs and SPEC_NAME_RE.match(name[5:]):
            grid = read_grid(grid_path(self.job, name[5:], rec.slide_id))
            return {
                "kind": "grid",
                "label": f"tiles {grid.spec.name}",
                **tile_arrays(grid.coords, grid.size_level0),
                "tissue": pack(np.nan_to_num(grid.tissue_fraction, nan=-1), "float32"),
            }
        if name.startswith("scores-") and name[7:].isdigit() and int(name[7:]) < len(self.sources):
            return self.sources[int(name[7:])].payload(rec, self)
        if name == "skipped" and (skipped := self._skipped(rec)):
            return {"kind": "skipped", "tiles": skipped}
        raise KeyError(name)

    def _skipped(self, rec: SlideRecord) -> list[dict[str, Any]]:
        """Tiles the extraction stages recorded as unreadable: ``{"spec", "size0", "x", "y"}`` each."""
        out = []
        for stage_dir in sorted((self.job / "status").glob("extract*/")):
            if not self.job_file("status", stage_dir.name, f"{rec.slide_id}.json"):
                continue
            status = read_status(self.job, stage_dir.name, rec.slide_id)
            for spec, pairs in ((status.info.get("skipped") or {}) if status else {}).items():
                size0 = self.tile_side(rec, spec)
                out.extend({"spec": spec, "size0": size0, "x": int(x), "y": int(y)} for x, y in pairs)
        return out

    def tile_side(self, rec: SlideRecord, spec: str) -> int | None:
        """A spec's tile side in level-0 px on this slide (from its coordinates file), or None."""
        if spec not in rec.specs:
            return None
        try:
            return read_grid(grid_path(self.job, spec, rec.slide_id)).size_level0
        except TilingError:
            return None
