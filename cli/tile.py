"""`wsikit tile`: tissue masks and aligned multi-magnification tile coordinates for many slides."""

from __future__ import annotations

from pathlib import Path

import typer

from wsikit.cli.common import (
    SLIDE_MPP_HELP,
    build_settings,
    exit_for,
    fail,
    layered_settings,
    print_summary,
    say,
    select_slides,
    warn,
    with_progress,
)


def _ink(info: dict) -> str:
    """Excluded marker ink: area and colours, e.g. ``1.42 (green, red)``."""
    colours = ", ".join(info.get("ink_colours") or {})
    return f"{info.get('ink_area_mm2', 0.0):.2f}" + (f" ({colours})" if colours else "")


def tile(
    ctx: typer.Context,
    slides: list[str] = typer.Argument(
        ...,
        help="Slide files, folders, globs, or a CSV/TSV list (path, optional slide_id, mpp, patient_id, label).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Job directory (shared by the later stages)."),
    config: Path | None = typer.Option(
        None, "--config", help="YAML config whose 'tile' section sets defaults; options given here win."
    ),
    mpp: float | None = typer.Option(None, "--mpp", help="Target resolution in µm/px (default 0.5)."),
    mag: float | None = typer.Option(
        None, "--mag", help="Target magnification; converted by mpp = 10 / mag."
    ),
    tile_size: int = typer.Option(256, "--tile-size", help="Tile side in pixels at the target resolution."),
    overlap: int = typer.Option(0, "--overlap", help="Overlap in pixels at the target resolution."),
    spec: list[str] = typer.Option(
        [],
        "--spec",
        help="More aligned grids: RES, RES/SIZE or RES/SIZE/OVERLAP, e.g. 10x or 1.0/256/0 (repeat; size/overlap default "
        "to --tile-size/--overlap).",
    ),
    min_tissue: float = typer.Option(
        0.5, "--min-tissue", help="Keep tiles whose tissue area fraction is ≥ this."
    ),
    slide_mpp: float | None = typer.Option(None, "--slide-mpp", help=SLIDE_MPP_HELP),
    masks: Path | None = typer.Option(
        None,
        "--masks",
        help="Folder of edited GeoJSON masks (<slide_id>.geojson) used instead of computed ones.",
    ),
    mask_method: str = typer.Option(
        "od",
        "--mask-method",
        help="od (optical density; H&E, IHC, greyscale, faint) | otsu (the earlier default).",
    ),
    mask_mpp: float = typer.Option(
        8.0, "--mask-mpp", help="Working resolution of the tissue mask (µm/px; finer on slides under 1 mm)."
    ),
    mask_channel: str = typer.Option(
        "saturation", "--mask-channel", help="saturation | darkness | both (otsu only)."
    ),
    pen: bool = typer.Option(
        True,
        "--pen/--no-pen",
        help="Exclude marker ink (od: blue, green, black, red; otsu: red, green, blue).",
    ),
    min_object: float = typer.Option(20_000.0, "--min-object-um2", help="Drop tissue pieces smaller (µm²)."),
    max_hole: float = typer.Option(20_000.0, "--max-hole-um2", help="Fill holes smaller (µm²)."),
    align: bool = typer.Option(
        True, "--align/--no-align", help="Nest coarser grids so each fine tile has a parent."
    ),
    complete_parents: bool = typer.Option(
        True,
        "--complete-parents/--no-complete-parents",
        help="Keep every coarse tile that is a kept tile's parent.",
    ),
    save_tiles: bool = typer.Option(False, "--save-tiles", help="Also write tile images (patch datasets)."),
    tile_format: str = typer.Option("png", "--tile-format", help="png | jpg (with --save-tiles)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo slides already done."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry slides that failed before."),
    shard: str | None = typer.Option(
        None, "--shard", help="i/n: this process's share (default: from SLURM/SGE/LSF/PBS array variables)."
    ),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Search folders recursively."),
    id_from: str = typer.Option("stem", "--id-from", help="stem | relpath: how slide ids are derived."),
    backend: str = typer.Option("auto", "--backend", help="auto | openslide | tiffslide"),
    align_native: bool = typer.Option(
        False,
        "--align-native",
        help="Per slide, snap each spec to the file's own tiles at the matching level (tile side, no "
        "overlap) so `wsikit extract --reader native` reads compressed tiles without resampling.",
    ),
) -> None:
    """Tissue masks (GeoJSON, QC picture) and tile coordinates per spec, resumable and shardable."""
    from wsikit.settings import SettingsError, TileConfig, expand_specs, tile_specs
    from wsikit.specs import TilingError
    from wsikit.stages.tile import run_tiling
    from wsikit.tissue import MaskError

    try:
        specs = [
            {"mpp": s.mpp, "size": s.size, "overlap": s.overlap}
            for s in tile_specs(mpp, mag, tile_size, overlap, spec)
        ]
        options = {
            "specs": (("mpp", "mag", "tile_size", "overlap", "spec"), specs),
            "min_tissue": (("min_tissue",), min_tissue),
            "mask.method": (("mask_method",), mask_method),
            "mask.mpp": (("mask_mpp",), mask_mpp),
            "mask.channel": (("mask_channel",), mask_channel),
            "mask.exclude_pen": (("pen",), pen),
            "mask.min_object_um2": (("min_object",), min_object),
            "mask.max_hole_um2": (("max_hole",), max_hole),
            "align": (("align",), align),
            "complete_parents": (("complete_parents",), complete_parents),
            "geojson_dir": (("masks",), masks),
            "save_tiles": (("save_tiles",), save_tiles),
            "tile_format": (("tile_format",), tile_format),
            "backend": (("backend",), backend),
            "align_native": (("align_native",), align_native),
        }
        data = expand_specs(layered_settings(ctx, config, "tile", options), f"{config}:tile")
        cfg = build_settings(TileConfig, data, config, "tile")
    except (TilingError, MaskError, SettingsError) as exc:
        raise fail(str(exc)) from exc
    if masks is not None and not masks.is_dir():
        raise fail(f"{masks}: no such folder of GeoJSON masks")
    mine = select_slides(slides, recursive, id_from, slide_mpp, shard)
    say(f"tiling {len(mine)} slide(s) into {out}: {', '.join(s.name for s in cfg.specs)}")
    summary = with_progress(
        "tile",
        mine,
        run_tiling,
        job_dir=out,
        cfg=cfg,
        overwrite=overwrite,
        retry_failed=retry_failed,
        on_note=warn,
    )
    print_summary(
        f"wsikit tile → {out}",
        summary,
        {
            "tiles per spec": lambda s: " / ".join(str(n) for n in s.info.get("tiles", {}).values()),
            "tissue %": lambda s: f"{100 * s.info.get('tissue_fraction', 0):.1f}",
            "ink mm²": lambda s: _ink(s.info),
            "mask": lambda s: "computed" if s.info.get("mask_source") == "computed" else "GeoJSON",
        },
    )
    exit_for(summary)
