"""The `tile` stage: mask and tile each slide of a batch into a job directory.

Per slide (:func:`tile_one`): thumbnail → tissue mask (computed, or a user's GeoJSON) → aligned grids
(:func:`wsikit.tiling.tile_slide`) → ``masks/<id>.geojson``, ``tiles/<spec>/<id>.h5``, ``qc/<id>.png``
and, on request, tile images with a patch-dataset manifest. :func:`run_tiling` runs it over slides with
:func:`wsikit.jobs.run_batch` semantics (resume, locks, failure records). Layout: ``docs/formats.md``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from wsikit.jobs import (
    BatchSummary,
    SlideEntry,
    StageResult,
    Status,
    atomic_path,
    clear_stale_temps,
    run_batch,
)
from wsikit.slide import Slide, same_mpp
from wsikit.tiling import (
    TileGrid,
    TileSpec,
    TilingError,
    aligned_layouts,
    grid_path,
    list_specs,
    order_specs,
    tile_slide,
    write_grid,
)
from wsikit.tissue import MaskParams

STAGE = "tile"


@dataclass(frozen=True)
class TileConfig:
    """Settings of a tiling run; ``key()`` fingerprints them so a resumed run redoes changed slides."""

    specs: tuple[TileSpec, ...]
    min_tissue: float = 0.5
    mask: MaskParams = field(default_factory=MaskParams)
    align: bool = True
    complete_parents: bool = True
    geojson_dir: Path | None = None  # user masks: <geojson_dir>/<slide_id>.geojson replace computed ones
    save_tiles: bool = False  # also write tile images: <job>/patches/<spec>/<slide_id>/
    tile_format: str = "png"  # png | jpg
    backend: str = "auto"
    align_native: bool = False  # per slide, snap specs to the file's own tiles (wsikit.native)

    def __post_init__(self) -> None:
        if not self.specs:
            raise TilingError("no tile spec given; pass --mpp/--mag or --spec")
        if self.tile_format not in ("png", "jpg"):
            raise TilingError(f"tile image format {self.tile_format!r}: use png or jpg")
        object.__setattr__(self, "specs", tuple(order_specs(list(self.specs))))
        if self.align:  # refuse impossible nestings before touching any slide
            aligned_layouts(list(self.specs), self.specs[0].mpp)
        if not 0.0 <= self.min_tissue <= 1.0:
            raise TilingError(f"--min-tissue {self.min_tissue}: use a fraction in [0, 1]")

    def key(self) -> str:
        settings = {
            "specs": [s.name for s in self.specs],
            "min_tissue": self.min_tissue,
            "mask": asdict(self.mask),
            "align": self.align,
            "complete_parents": self.complete_parents,
            "geojson_dir": str(self.geojson_dir) if self.geojson_dir else None,
            "save_tiles": self.save_tiles and self.tile_format,
        }
        if self.align_native:  # only when set, so earlier jobs keep their fingerprint
            settings["align_native"] = True
        return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def save_tile_images(
    slide: Slide, grid: TileGrid, dest: Path, fmt: str = "png", workers: int | None = None
) -> Path:
    """Write every tile of ``grid`` as ``<dest>/<slide_id>_x<X>_y<Y>.<fmt>`` (folder renamed into place)."""
    from concurrent.futures import ThreadPoolExecutor

    from wsikit.jobs import allotted_cpus
    from wsikit.native import TileSource

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

    The CSV (path, label, patient_id, …) loads as a patch dataset with ``wsikit.core.data.load_images``;
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


def tile_one(entry: SlideEntry, job_dir: str | os.PathLike, cfg: TileConfig) -> StageResult:
    """Mask and tile one slide into ``job_dir``: GeoJSON, QC picture, one coordinates file per spec."""
    import shutil

    from wsikit.slide import open_slide
    from wsikit.tissue import compute_mask, mask_from_geojson, qc_image, working_mpp, write_geojson, write_png

    job = Path(job_dir)
    seconds: dict[str, float] = {}
    warnings: list[str] = []
    t = time.perf_counter()
    with open_slide(entry.path, backend=cfg.backend, mpp=entry.mpp, slide_id=entry.slide_id) as slide:  # type: ignore[arg-type]
        mpp0 = slide.mpp0  # MPPError here names the fix (--mpp or an mpp column)
        for spec in cfg.specs:
            if spec.mpp < mpp0 and not same_mpp(spec.mpp, mpp0):
                warnings.append(f"{spec.name} is finer than the slide ({mpp0:g} µm/px): tiles are upsampled")
        specs = list(cfg.specs)
        if cfg.align_native:
            from wsikit.native import align_specs_to_native

            specs, notes = align_specs_to_native(slide, specs)
            warnings.extend(notes)
        mask_mpp = working_mpp(slide, cfg.mask)  # finer than cfg.mask.mpp on small slides
        thumb = slide.thumbnail(mpp=mask_mpp)
        seconds["thumbnail"] = time.perf_counter() - t
        t = time.perf_counter()
        user_mask = cfg.geojson_dir / f"{entry.slide_id}.geojson" if cfg.geojson_dir else None
        geojson_out = job / "masks" / f"{entry.slide_id}.geojson"
        if user_mask is not None and user_mask.is_file():
            mask = mask_from_geojson(user_mask, slide.dimensions, mpp0, mask_mpp)
            mask_source = str(user_mask)
        else:
            mask = compute_mask(slide, cfg.mask, thumb)
            mask_source = "computed"
        seconds["mask"] = time.perf_counter() - t
        if mask.empty:
            warnings.append(
                f"EMPTY MASK: no tissue found ({mask_source}, {cfg.mask.method} at {mask.mpp:.3g} µm/px); "
                "check the QC picture (excluded ink is hatched), try --no-pen or --mask-method otsu, "
                "or supply an edited GeoJSON (--masks DIR)"
            )
        t = time.perf_counter()
        grids = tile_slide(slide, specs, mask, cfg.min_tissue, cfg.align, cfg.complete_parents)
        seconds["grid"] = time.perf_counter() - t
        t = time.perf_counter()
        outputs = []
        qc_out = job / "qc" / f"{entry.slide_id}.png"
        paths = [grid_path(job, grid.spec, entry.slide_id) for grid in grids]
        for dest in [geojson_out, qc_out, *paths]:  # a killed run's leftovers (we hold the slide's lock)
            clear_stale_temps(dest)
        if mask_source == "computed":
            outputs.append(str(write_geojson(geojson_out, mask)))
        elif user_mask.resolve() != geojson_out.resolve():  # type: ignore[union-attr]
            geojson_out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(geojson_out) as tmp:
                shutil.copyfile(user_mask, tmp)  # type: ignore[arg-type]
            outputs.append(str(geojson_out))
        for grid, path in zip(grids, paths, strict=True):
            grid.attrs["savetodir"] = str(path.parent)
            grid.attrs["mask_source"] = mask_source
            outputs.append(str(write_grid(path, grid)))
            if not len(grid) and grid.size_level0 > min(slide.dimensions):
                warnings.append(
                    f"SLIDE SMALLER THAN A TILE: {'x'.join(map(str, slide.dimensions))} px, but a "
                    f"{grid.spec.name} tile spans {grid.size_level0} px; no tiles (use a smaller --tile-size)"
                )
            elif not len(grid) and not mask.empty:
                warnings.append(f"no tiles kept at {grid.spec.name} (min tissue {cfg.min_tissue:g})")
            if cfg.save_tiles:
                dest = job / "patches" / grid.spec.name / entry.slide_id
                outputs.append(str(save_tile_images(slide, grid, dest, cfg.tile_format)))
                outputs.append(str(_write_slide_manifest(dest, grid, entry, cfg.tile_format)))
        qc_thumb = thumb if max(thumb.shape) >= 1024 else slide.thumbnail(max_side=1024)
        qc = qc_image(qc_thumb, mask, _qc_grids(grids, qc_thumb, slide.dimensions[0]))
        outputs.append(str(write_png(qc_out, qc)))
        seconds["write"] = time.perf_counter() - t
        info = {
            "settings": cfg.key(),
            "user_mask_sha1": _user_mask_digest(cfg, entry.slide_id),
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
            "mask_source": mask_source,
            "mask_method": mask.method,
            "mask_mpp": round(mask.mpp, 4),
            "mask_threshold": mask.threshold,
            "slide_mpp": mpp0,
            "dimensions": list(slide.dimensions),
            "backend": slide.backend,
            "seconds": {k: round(v, 4) for k, v in seconds.items()},
        }
    return StageResult(outputs, info, warnings)


def run_tiling(
    entries: Sequence[SlideEntry],
    job_dir: str | os.PathLike,
    cfg: TileConfig,
    overwrite: bool = False,
    retry_failed: bool = False,
    on_start: Callable[[SlideEntry], None] | None = None,
    on_end: Callable[[SlideEntry, Status | None], None] | None = None,
) -> BatchSummary:
    """Tile every slide with :func:`jobs.run_batch` semantics (resume, locks, failure records).

    A slide already done with other settings (specs, threshold, mask settings…), or whose user
    GeoJSON changed since, is redone.
    """
    key = cfg.key()

    def outdated(previous: Status) -> bool:
        return previous.info.get("settings") != key or previous.info.get(
            "user_mask_sha1"
        ) != _user_mask_digest(cfg, previous.slide_id)

    summary = run_batch(
        STAGE, entries, lambda e: tile_one(e, job_dir, cfg), job_dir, overwrite, retry_failed, on_start, on_end,
        outdated,
    )  # fmt: skip
    if cfg.save_tiles:
        for name in list_specs(job_dir):  # with --align-native a slide's spec names may differ
            write_patch_manifest(job_dir, name)
    return summary
