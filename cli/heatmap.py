"""`wsikit heatmap`: a trained model's per-tile scores drawn over the slide, plus montage, CSV, GeoJSON."""

from __future__ import annotations

from pathlib import Path

import typer

from wsikit.cli.common import (
    THREADS_HELP,
    build_settings,
    fail,
    layered_settings,
    options_of,
    out,
    warn,
)


def heatmap(
    ctx: typer.Context,
    model: Path = typer.Option(
        ..., "--model", "-m", help="A fold folder (RUN/fold_k) or a run (folds averaged)."
    ),
    slide: Path = typer.Option(..., "--slide", "-s", help="The slide file."),
    bag: Path = typer.Option(..., "--bag", "-b", help="The slide's feature bag."),
    out_png: Path = typer.Option(
        ..., "--out", "-o", help="Output .png; siblings get _overlay, _montage, ..."
    ),
    config: Path | None = typer.Option(
        None, "--config", help="YAML config whose 'heatmap' section sets defaults; options given here win."
    ),
    normalize: str = typer.Option("rank", "--normalize", help="rank | percentile | minmax | none"),
    cmap: str = typer.Option("jet", "--cmap", help="Matplotlib colour map."),
    alpha: float = typer.Option(0.5, "--alpha", help="Heatmap opacity over the thumbnail."),
    max_side: int = typer.Option(2048, "--max-side", help="Thumbnail size (longer side, px)."),
    top_k: int = typer.Option(8, "--top-k", help="Tiles per row in the montage."),
    size_level0: int | None = typer.Option(
        None, "--size-level0", help="Tile side in level-0 px if the bag lacks it."
    ),
    old_size_level0: int | None = typer.Option(None, "--tile-size-level0", hidden=True),
    old_mpp: float | None = typer.Option(None, "--mpp", hidden=True),
    device: str = typer.Option("auto", "--device"),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Heatmap of a model's per-tile scores over the slide thumbnail."""
    from wsikit.bags import BagError
    from wsikit.mil.evaluate import CheckpointError
    from wsikit.runtime import DeviceError, set_threads
    from wsikit.settings import HeatmapConfig
    from wsikit.slide import SlideError
    from wsikit.stages.heatmap import HeatmapError, heatmap_for_slide

    if old_mpp is not None:
        warn("--mpp is not needed by heatmap (it draws in level-0 pixels) and is ignored; drop it")
    set_threads(threads)
    names = ("model", "normalize", "cmap", "alpha", "max_side", "top_k")
    options = options_of(names, (model, normalize, cmap, alpha, max_side, top_k))
    hm = build_settings(HeatmapConfig, layered_settings(ctx, config, "heatmap", options), config, "heatmap")
    try:
        paths = heatmap_for_slide(
            hm.model, slide, bag, out_png, hm.normalize, hm.cmap, hm.alpha, hm.max_side, hm.top_k, device,
            size_level0 or old_size_level0,
        )  # fmt: skip
    except (HeatmapError, CheckpointError, BagError, SlideError, DeviceError) as exc:
        raise fail(str(exc)) from exc
    for name, path in paths.items():
        out.print(f"  {name:<8} {path}")
