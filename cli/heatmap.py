"""`wsikit heatmap`: a trained model's per-tile scores drawn over the slide, plus montage, CSV, GeoJSON."""

from __future__ import annotations

from pathlib import Path

import typer

from wsikit.bags import BagError
from wsikit.cli.common import build_settings, fail, layered_settings, out
from wsikit.cli.train import THREADS_HELP, set_threads
from wsikit.heatmap import HeatmapError, heatmap_for_slide
from wsikit.mil.evaluate import CheckpointError
from wsikit.pipeline import HeatmapConfig
from wsikit.slide import SlideError


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
    tile_size_level0: int | None = typer.Option(
        None, "--tile-size-level0", help="Tile side in level-0 px if the bag lacks it."
    ),
    mpp: float | None = typer.Option(None, "--mpp", help="Override the slide's resolution (µm/px)."),
    device: str = typer.Option("auto", "--device"),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Heatmap of a model's per-tile scores over the slide thumbnail."""
    set_threads(threads)
    names = ("model", "normalize", "cmap", "alpha", "max_side", "top_k")
    values = (model, normalize, cmap, alpha, max_side, top_k)
    options = {n: ((n,), v) for n, v in zip(names, values, strict=True)}
    hm = build_settings(HeatmapConfig, layered_settings(ctx, config, "heatmap", options), config, "heatmap")
    try:
        paths = heatmap_for_slide(
            hm.model, slide, bag, out_png, hm.normalize, hm.cmap, hm.alpha, hm.max_side, hm.top_k, device, mpp,
            tile_size_level0,
        )  # fmt: skip
    except (HeatmapError, CheckpointError, BagError, SlideError) as exc:
        raise fail(str(exc)) from exc
    for name, path in paths.items():
        out.print(f"  {name:<8} {path}")
