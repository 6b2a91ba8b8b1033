"""The `tile` stage: mask and tile each slide of a batch into a job directory.

Per slide (:func:`tile_one`): thumbnail → tissue mask (computed, or a user's GeoJSON) → aligned grids
(:func:`wsikit.tiling.tile_slide`) → ``masks/<id>.geojson``, ``tiles/<spec>/<id>.h5``, ``qc/<id>.png``
and, on request, tile images with a patch-dataset manifest. :func:`run_tiling` runs it over slides with
:func:`wsikit.jobs.run_batch` semantics (resume, locks, failure records). Layout: ``docs/formats.md``.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wsikit.claims import claim_settings
from wsikit.config import fingerprint
from wsikit.grids import TileGrid, grid_path, list_specs, write_grid
from wsikit.io import atomic_path, clear_stale_temps, write_png
from wsikit.jobs import BatchSummary, SlideEntry, StageResult, Status, run_batch
from wsikit.runtime import allotted_cpus
from wsikit.settings import TileConfig
from wsikit.slide import Slide, open_slide
from wsikit.specs import TileSpec, TilingError, same_mpp
from wsikit.tiles import TileSource, choose_level
from wsikit.tiling import align_specs_to_native, tile_slide
from wsikit.tissue import TissueMask, compute_mask, mask_from_geojson, qc_image, working_mpp, write_geojson

STAGE = "tile"


def save_tile_images(
    slide: Slide, grid: TileGrid, dest: Path, fmt: str = "png", workers: int | None = None
) -> Path:
    """Write every tile of ``grid`` as ``<dest>/<slide_id>_x<X>_y<Y>.<fmt>`` (folder renamed into place)."""
    source = TileSource(slide, grid.coords, grid.size_level0, grid.spec.size)  # same pixels as read_tile

    def one(i: int, folder: Path) -> None:
        x, y = (int(v) for v in grid.coords[i])
        rgb = source.read(i)
        ok, data = cv2.imencode(f".{fmt}", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if not ok:
            raise TilingError(f"{slide.path}: could not encode tile ({x}, {y}) as {fmt}")
        (folder / f"{grid.slide_id}_x{x}_y{y}.{fmt}").write_bytes(data.tobytes())

    with atomic_path(dest) as tmp:
        tmp.mkdir()
        with ThreadPoolExecutor(workers or allotted_cpus()) as pool:
            for lo in range(0, len(grid), 1024):  # Executor.map submits all at once: bound the futures
                list(pool.map(lambda i: one(i, tmp), range(lo, min(len(grid), lo + 1024))))
    source.close()
    return dest


MANIFEST_COLUMNS = ("path", "label", "patient_id", "slide_id", "x", "y", "tissue_fraction")


def _write_slide_manifest(folder: Path, grid: TileGrid, entry: SlideEntry, fmt: str) -> Path:
    """``<folder>.csv``: one row per tile image, with the slide list's label and patient id."""
    label, patient = entry.label or "", entry.patient_id or ""
    rows = (  # streamed: no per-tile Python rows held
        [f"{folder.name}/{grid.slide_id}_x{x}_y{y}.{fmt}", label, patient, grid.slide_id, x, y, f"{f:.4f}"]
        for (x, y), f in zip(grid.coords, grid.tissue_fraction, strict=True)
    )
    dest = folder.with_suffix(".csv")
    with atomic_path(dest) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
    return dest


def write_patch_manifest(job_dir: str | os.PathLike, spec_name: str) -> Path | None:
    """Merge the per-slide tile-image lists of a spec into ``patches/<spec>/manifest.csv``.

    The CSV (path, label, patient_id, …) loads as a patch dataset with ``wsikit.images.data.load_images``;
    each shard of a run rewrites it from every slide done so far.
    """
    folder = Path(job_dir) / "patches" / spec_name
    parts = sorted(p for p in folder.glob("*.csv") if p.name != "manifest.csv")
    if not parts:
        return None
    dest = folder / "manifest.csv"
    with atomic_path(dest) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        for part in parts:  # streamed row by row: every slide's tiles are never in memory at once
            with part.open(newline="") as src:
                reader = csv.reader(src)
                next(reader, None)
                writer.writerows(reader)
    return dest


def _qc_grids(grids: list[TileGrid], thumb: np.ndarray, width0: int) -> list[tuple[np.ndarray, int]]:
    """The finest grid whose tiles are ≥ 6 px on the (≤ 2048 px) QC picture, else the coarsest."""
    px_per_level0 = min(1.0, 2048 / max(thumb.shape[:2])) * thumb.shape[1] / width0
    for grid in grids:
        if grid.size_level0 * px_per_level0 >= 6:
            return [(grid.coords, grid.size_level0)]
    return [(grids[-1].coords, grids[-1].size_level0)] if grids else []


def _user_mask_digest(cfg: TileConfig, slide_id: str) -> str | None:
    """SHA-1 of the slide's user GeoJSON, if any: editing it again makes a resumed run redo the slide."""
    path = cfg.geojson_dir / f"{slide_id}.geojson" if cfg.geojson_dir else None
    return hashlib.sha1(path.read_bytes()).hexdigest() if path is not None and path.is_file() else None


def _specs_for(slide: Slide, cfg: TileConfig) -> tuple[list[TileSpec], list[str]]:
    """The specs to tile this slide at (snapped to the file's tiles with ``align_native``) and warnings."""
    mpp0 = slide.mpp0  # MPPError here names the fix (--slide-mpp or an mpp column)
    warnings = [
        f"{spec.name} is finer than the slide ({mpp0:g} µm/px): tiles are upsampled"
        for spec in cfg.specs
        if spec.mpp < mpp0 and not same_mpp(spec.mpp, mpp0)
    ]
    specs = list(cfg.specs)
    if cfg.align_native:
        specs, notes = align_specs_to_native(slide, specs)
        warnings.extend(notes)
    return specs, warnings


def _mask_for(slide: Slide, cfg: TileConfig, thumb: np.ndarray, mpp: float) -> tuple[TissueMask, str]:
    """The slide's mask at ``mpp``: the user's GeoJSON (``cfg.geojson_dir``) when there is one, else computed."""
    user = cfg.geojson_dir / f"{slide.slide_id}.geojson" if cfg.geojson_dir else None
    if user is not None and user.is_file():
        return mask_from_geojson(user, slide.dimensions, slide.mpp0, mpp), str(user)
    return compute_mask(slide, cfg.mask, thumb), "computed"


def _write_mask(dest: Path, mask: TissueMask, source: str) -> Path | None:
    """The mask's GeoJSON at ``dest``: written when computed, copied when it is a user file elsewhere."""
    if source == "computed":
        return write_geojson(dest, mask)
    if Path(source).resolve() == dest.resolve():
        return None
    with atomic_path(dest) as tmp:
        shutil.copyfile(source, tmp)
    return dest


def _grid_warnings(grid: TileGrid, slide: Slide, mask: TissueMask, min_tissue: float) -> list[str]:
    if not len(grid) and grid.size_level0 > min(slide.dimensions):
        return [
            f"SLIDE SMALLER THAN A TILE: {'x'.join(map(str, slide.dimensions))} px, but a "
            f"{grid.spec.name} tile spans {grid.size_level0} px; no tiles (use a smaller --tile-size)"
        ]
    if not len(grid) and not mask.empty:
        return [f"no tiles kept at {grid.spec.name} (min tissue {min_tissue:g})"]
    return []


def _write_grids(
    job: Path, slide: Slide, entry: SlideEntry, grids: list[TileGrid], mask: TissueMask, cfg: TileConfig
) -> tuple[list[str], list[str]]:
    """Each grid's coordinates file (and tile images with ``save_tiles``); returns (outputs, warnings)."""
    outputs, warnings = [], []
    for grid in grids:
        path = grid_path(job, grid.spec, entry.slide_id)
        grid.attrs["savetodir"] = str(path.parent)
        outputs.append(str(write_grid(path, grid)))
        warnings += _grid_warnings(grid, slide, mask, cfg.min_tissue)
        if cfg.save_tiles:
            dest = job / "patches" / grid.spec.name / entry.slide_id
            outputs.append(str(save_tile_images(slide, grid, dest, cfg.tile_format)))
            outputs.append(str(_write_slide_manifest(dest, grid, entry, cfg.tile_format)))
    return outputs, warnings


def _info(
    slide: Slide, grids: list[TileGrid], mask: TissueMask, source: str, cfg: TileConfig
) -> dict[str, Any]:
    """What the status record keeps about a tiled slide (shown by the CLI's summary)."""
    return {
        "settings": cfg.key(),
        "user_mask_sha1": _user_mask_digest(cfg, slide.slide_id),
        "specs": [g.spec.name for g in grids],
        "tiles": {g.spec.name: len(g) for g in grids},
        "orphans": {
            g.spec.name: {k: int((v < 0).sum()) for k, v in g.parents.items()} for g in grids if g.parents
        },
        "tissue_fraction": round(mask.fraction, 5),
        "tissue_area_mm2": round(mask.area_um2 / 1e6, 4),
        "ink_fraction": round(mask.ink_fraction, 5),
        "ink_area_mm2": round(mask.ink_area_um2 / 1e6, 4),
        "ink_colours": mask.ink_colours,
        "mask_source": source,
        "mask_method": mask.method,
        "mask_mpp": round(mask.mpp, 4),
        "mask_threshold": mask.threshold,
        "slide_mpp": slide.mpp0,
        "dimensions": list(slide.dimensions),
        "backend": slide.backend,
    }


#: Pixels of the level the mask thumbnail is read from above which that read takes minutes (said first).
SLOW_MASK_READ_PX = 2 * 10**9


def slow_mask_note(slide: Slide, mask_mpp: float) -> str | None:
    """What a slide without a coarse enough pyramid level costs the mask (said before the read), or None."""
    level = choose_level(slide.level_downsamples, mask_mpp / slide.mpp0).level
    w, h = slide.level_dimensions[level]
    if w * h < SLOW_MASK_READ_PX:
        return None
    return (
        f"{slide.path}: no pyramid level near the mask's {mask_mpp:g} µm/px: reading all {w * h / 1e9:.1f} Gpx of "
        f"level {level} for the tissue mask takes minutes; add a pyramid (e.g. `vips tiffsave in.tif out.tif "
        "--tile --pyramid --compression jpeg`) or give masks (--masks)"
    )


def tile_one(
    entry: SlideEntry,
    job_dir: str | os.PathLike,
    cfg: TileConfig,
    on_note: Callable[[str], None] | None = None,
) -> StageResult:
    """Mask and tile one slide into ``job_dir``: GeoJSON, QC picture, one coordinates file per spec.
    ``on_note`` hears, before they start, reads that will take minutes."""
    job = Path(job_dir)
    clock = _Clock()
    with open_slide(entry.path, backend=cfg.backend, mpp=entry.mpp, slide_id=entry.slide_id) as slide:  # type: ignore[arg-type]
        specs, warnings = _specs_for(slide, cfg)
        mask_mpp = working_mpp(slide, cfg.mask)  # finer than cfg.mask.mpp on small slides
        if (note := slow_mask_note(slide, mask_mpp)) is not None:
            warnings.append(note)
            if on_note:
                on_note(note)
        thumb = slide.thumbnail(mpp=mask_mpp)
        clock.lap("thumbnail")
        mask, source = _mask_for(slide, cfg, thumb, mask_mpp)
        clock.lap("mask")
        if mask.empty:
            warnings.append(
                f"EMPTY MASK: no tissue found ({source}, {cfg.mask.method} at {mask.mpp:.3g} µm/px); "
                "check the QC picture (excluded ink is hatched), try --no-pen or --mask-method otsu, "
                "or supply an edited GeoJSON (--masks DIR)"
            )
        grids = tile_slide(slide, specs, mask, cfg.min_tissue, cfg.align, cfg.complete_parents)
        for grid in grids:
            grid.attrs["mask_source"] = source
        clock.lap("grid")
        geojson, qc_out = job / "masks" / f"{entry.slide_id}.geojson", job / "qc" / f"{entry.slide_id}.png"
        for dest in [geojson, qc_out, *(grid_path(job, g.spec, entry.slide_id) for g in grids)]:
            clear_stale_temps(dest)  # a killed run's leftovers (we hold the slide's lock)
        written = _write_mask(geojson, mask, source)
        outputs, more = _write_grids(job, slide, entry, grids, mask, cfg)
        outputs = ([str(written)] if written else []) + outputs
        qc_thumb = thumb if max(thumb.shape) >= 1024 else slide.thumbnail(max_side=1024)
        qc = qc_image(qc_thumb, mask, _qc_grids(grids, qc_thumb, slide.dimensions[0]))
        outputs.append(str(write_png(qc_out, qc)))
        clock.lap("write")
        info = {**_info(slide, grids, mask, source, cfg), "seconds": clock.laps}
    return StageResult(outputs, info, warnings + more)


class _Clock:
    """Seconds spent in each named part of a slide's work (kept in its status record)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 4)
        self._t = now


def run_tiling(
    entries: Sequence[SlideEntry],
    job_dir: str | os.PathLike,
    cfg: TileConfig,
    overwrite: bool = False,
    retry_failed: bool = False,
    on_start: Callable[[SlideEntry], None] | None = None,
    on_end: Callable[[SlideEntry, Status | None], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> BatchSummary:
    """Tile every slide with :func:`jobs.run_batch` semantics (resume, locks, failure records).

    The job holds one set of tile settings (:func:`wsikit.claims.claim_settings`): a run with other
    settings is refused unless ``overwrite``. A slide done with other settings, or whose user GeoJSON
    changed since, is redone; so is a failed slide given another MPP override (``entry.mpp``).
    """
    key = cfg.key()
    claim_settings(job_dir, STAGE, key, cfg.settings(), overwrite)

    def outdated(previous: Status) -> bool:
        return previous.info.get("settings") != key or previous.info.get(
            "user_mask_sha1"
        ) != _user_mask_digest(cfg, previous.slide_id)

    def inputs(entry: SlideEntry) -> str:  # a failed slide given the MPP its error asked for is retried
        return fingerprint(
            {"settings": key, "slide_mpp": entry.mpp, "mask": _user_mask_digest(cfg, entry.slide_id)}
        )

    summary = run_batch(
        STAGE, entries, lambda e: tile_one(e, job_dir, cfg, on_note), job_dir, overwrite, retry_failed, on_start, on_end,
        outdated, inputs,
    )  # fmt: skip
    if cfg.save_tiles:
        for name in list_specs(job_dir):  # with --align-native a slide's spec names may differ
            write_patch_manifest(job_dir, name)
    return summary
