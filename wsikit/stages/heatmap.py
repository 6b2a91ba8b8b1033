"""Per-tile model scores as pictures and tables: heatmaps over the slide, tile montages, CSV and GeoJSON.

Scores come from any MIL model's ``tile_scores`` (attention or instance probabilities). They are
normalised per slide (``rank``: ranks mapped to [0, 1], ties averaged; ``percentile``: clipped to the
1st-99th percentile then scaled; ``minmax``; ``none``: taken as they are, expected in [0, 1]) and
rasterised at the tiles' level-0 rectangles onto a thumbnail: where tiles overlap their values are
averaged, outside every tile the heatmap is transparent.

Written for ``out=heatmap.png``::

    heatmap.png           original | overlay side by side, with a colour bar
    heatmap_overlay.png   the blend at thumbnail resolution (pixel-aligned with the thumbnail)
    heatmap_rgba.png      the coloured heatmap alone, transparent outside tiles (for other viewers)
    heatmap_montage.png   the top-k and bottom-k tiles read from the slide, with their scores
    heatmap_scores.csv    x, y, width, height (level-0 px), score, score_norm, rank
    heatmap.geojson       one square per tile with its measurements (QuPath: import, then Measurement map)
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from wsikit.bags import BagError, read_bag, require_positions
from wsikit.io import write_png, write_text
from wsikit.jobs import BatchSummary, SlideEntry, StageResult, run_batch
from wsikit.mil.evaluate import fold_dirs, load_checkpoint
from wsikit.reports import save_figure
from wsikit.runtime import resolve_device
from wsikit.settings import HeatmapConfig
from wsikit.slide import Slide, open_slide
from wsikit.tiles import read_tile

NORMALIZATIONS = ("rank", "percentile", "minmax", "none")


class HeatmapError(ValueError):
    """Inputs that cannot be drawn (bag without tile size, bag not of this slide); names the fix."""


@dataclass
class TileScores:
    """Per-tile scores of one slide with where the tiles are."""

    coords: np.ndarray  # (N, 2) int64 level-0 top-left
    scores: np.ndarray  # (N,) raw model scores
    size_level0: int  # tile side in level-0 pixels
    info: dict[str, Any] = field(default_factory=dict)


def normalize_scores(scores: np.ndarray, method: str = "rank") -> np.ndarray:
    """Scores mapped to [0, 1] per slide (see the module docstring); float32."""
    s = np.asarray(scores, dtype=np.float64)
    if method not in NORMALIZATIONS:
        raise HeatmapError(f"normalisation {method!r}: use one of {', '.join(NORMALIZATIONS)}")
    if s.size == 0 or method == "none":
        return np.clip(s, 0, 1).astype(np.float32)
    if method == "rank":
        return ((rankdata(s) - 1) / max(s.size - 1, 1)).astype(np.float32)
    lo, hi = np.percentile(s, [1, 99]) if method == "percentile" else (s.min(), s.max())
    if hi <= lo:
        return np.full(s.shape, 0.5, np.float32)
    return np.clip((s - lo) / (hi - lo), 0, 1).astype(np.float32)


def size_level0_of(bag: Any) -> int:
    """Tile side in level-0 pixels from the bag's coordinate attributes (``patch_size_level0``)."""
    for attrs in (bag.coords_attrs, bag.attrs):
        for key in ("patch_size_level0", "size_level0"):
            if attrs.get(key):
                return int(attrs[key])
    raise HeatmapError(
        "the bag does not say its tile size (no patch_size_level0 attribute); pass --size-level0"
    )


def rasterize(
    coords: np.ndarray,
    values: np.ndarray,
    size_level0: int,
    scale: tuple[float, float],
    shape: tuple[int, int],
) -> np.ndarray:
    """(H, W) float32 image of ``values`` painted at the tiles' rectangles, scaled by ``scale`` (sx, sy)
    from level 0; overlapping tiles are averaged, pixels outside every tile are nan."""
    h, w = shape
    total = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.int32)
    sx, sy = scale
    xy = np.asarray(coords, dtype=np.float64)
    x0 = np.clip(np.round(xy[:, 0] * sx).astype(int), 0, w)
    y0 = np.clip(np.round(xy[:, 1] * sy).astype(int), 0, h)
    x1 = np.clip(np.maximum(np.round((xy[:, 0] + size_level0) * sx).astype(int), x0 + 1), 0, w)
    y1 = np.clip(np.maximum(np.round((xy[:, 1] + size_level0) * sy).astype(int), y0 + 1), 0, h)
    for i in range(len(xy)):
        total[y0[i] : y1[i], x0[i] : x1[i]] += values[i]
        count[y0[i] : y1[i], x0[i] : x1[i]] += 1
    out = np.full(shape, np.nan, np.float32)
    covered = count > 0
    out[covered] = total[covered] / count[covered]
    return out


def colorize(raster: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """(H, W, 4) uint8 RGBA of a [0, 1] raster; alpha 0 where it is nan."""
    import matplotlib

    rgba = matplotlib.colormaps[cmap](np.nan_to_num(raster, nan=0.0), bytes=True)
    rgba[..., 3] = np.where(np.isnan(raster), 0, 255)
    return rgba


def blend(thumb: np.ndarray, rgba: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The thumbnail with the heatmap laid over it at ``alpha`` where the heatmap is opaque."""
    a = (rgba[..., 3:4].astype(np.float32) / 255.0) * alpha
    return (
        (thumb.astype(np.float32) * (1 - a) + rgba[..., :3].astype(np.float32) * a).round().astype(np.uint8)
    )


def figure(thumb: np.ndarray, overlay: np.ndarray, cmap: str, title: str, label: str, path: Path) -> Path:
    """Original and overlay side by side with a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    h, w = thumb.shape[:2]
    panel = 5.5 if w >= h else 5.5 * w / h  # panel width (inches); portrait slides get narrower panels
    fig, axes = plt.subplots(1, 2, figsize=(2 * panel + 1.0, panel * h / w + 0.7), layout="constrained")
    for ax, img, name in zip(axes, (thumb, overlay), ("original", "heatmap"), strict=True):
        ax.imshow(img)
        ax.set_title(name)
        ax.axis("off")
    fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=axes, fraction=0.03, pad=0.01, label=label)
    fig.suptitle(title)
    return save_figure(fig, path, dpi=120, tight="bbox")


def montage(slide: Slide, ts: TileScores, norm: np.ndarray, k: int, path: Path, tile_px: int = 160) -> Path:
    """Top-k (first row) and bottom-k (second row) tiles by score, read from the slide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-ts.scores, kind="stable")
    k = max(1, min(k, len(order) // 2 or 1))
    rows = [("highest", order[:k]), ("lowest", order[::-1][:k])]
    fig, axes = plt.subplots(2, k, figsize=(1.9 * k, 4.4), squeeze=False)
    for r, (name, idx) in enumerate(rows):
        for c in range(k):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(idx):
                continue
            i = int(idx[c])
            x, y = (int(v) for v in ts.coords[i])
            ax.imshow(read_tile(slide, (x, y), ts.size_level0, tile_px))
            ax.set_title(f"{name} #{c + 1}\n{norm[i]:.2f} @ ({x},{y})", fontsize=7)
    return save_figure(fig, path, dpi=120, tight="bbox")


def write_scores_csv(path: Path, ts: TileScores, norm: np.ndarray) -> Path:
    rank = rankdata(-ts.scores, method="min").astype(int)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["x", "y", "width", "height", "score", "score_norm", "rank"])
    for (x, y), s, n, r in zip(
        ts.coords.tolist(), ts.scores.tolist(), norm.tolist(), rank.tolist(), strict=True
    ):
        w.writerow([x, y, ts.size_level0, ts.size_level0, f"{s:.6g}", f"{n:.6f}", r])
    return write_text(path, buf.getvalue())


def write_scores_geojson(path: Path, ts: TileScores, norm: np.ndarray) -> Path:
    """A FeatureCollection of tile squares (level-0 px) with ``measurements`` QuPath shows and maps."""
    s = ts.size_level0
    features = []
    for (x, y), raw, n in zip(ts.coords.tolist(), ts.scores.tolist(), norm.tolist(), strict=True):
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "tile", "measurements": {"score": raw, "score_norm": n}},
            }
        )
    return write_text(path, json.dumps({"type": "FeatureCollection", "features": features}))


def render(
    slide: Slide,
    ts: TileScores,
    out: str | os.PathLike,
    normalize: str = "rank",
    cmap: str = "jet",
    alpha: float = 0.5,
    max_side: int = 2048,
    top_k: int = 8,
    title: str | None = None,
) -> dict[str, Path]:
    """Draw ``ts`` over ``slide`` and write every output listed in the module docstring."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise HeatmapError(f"{out}: the heatmap output must be a .png path")
    W, H = slide.dimensions
    inside = (ts.coords[:, 0] < W) & (ts.coords[:, 1] < H) & (ts.coords >= -ts.size_level0).all(axis=1)
    if len(ts.coords) and inside.mean() < 0.9:
        raise HeatmapError(
            f"{(~inside).sum()} of {len(inside)} tiles lie outside {slide.path.name} ({W}×{H}); "
            "is the bag from this slide?"
        )
    norm = normalize_scores(ts.scores, normalize)
    thumb = slide.thumbnail(max_side=max_side)
    th, tw = thumb.shape[:2]
    raster = rasterize(ts.coords, norm, ts.size_level0, (tw / W, th / H), (th, tw))
    rgba = colorize(raster, cmap)
    overlay = blend(thumb, rgba, alpha)
    stem = out.with_suffix("")
    label = {
        "rank": "score rank (0 = lowest, 1 = highest)",
        "percentile": "score (1st-99th percentile scaled)",
    }
    paths = {
        "heatmap": figure(thumb, overlay, cmap, title or slide.slide_id, label.get(normalize, "score"), out),
        "overlay": write_png(Path(f"{stem}_overlay.png"), overlay),
        "rgba": write_png(Path(f"{stem}_rgba.png"), rgba),
        "montage": montage(slide, ts, norm, top_k, Path(f"{stem}_montage.png")),
        "csv": write_scores_csv(Path(f"{stem}_scores.csv"), ts, norm),
        "geojson": write_scores_geojson(Path(f"{stem}.geojson"), ts, norm),
    }
    return paths


def model_tile_scores(
    model_dir: str | os.PathLike,
    bag_path: str | os.PathLike,
    device: str = "auto",
    size_level0: int | None = None,
) -> tuple[TileScores, dict[str, Any]]:
    """Tile scores of a bag under a trained fold model (or every fold of a run: mean of rank-normalised
    scores), and the slide-level calibrated prediction."""
    bag = read_bag(bag_path)
    if len(bag) == 0:
        raise HeatmapError(f"{bag_path}: the bag has no tiles")
    try:
        require_positions(bag, str(bag_path), "a heatmap")
    except BagError as exc:
        raise HeatmapError(str(exc)) from exc
    dev = resolve_device(device)
    folds = [load_checkpoint(d, dev) for d in fold_dirs(model_dir)]
    if bag.dim != folds[0].spec.in_dim:
        raise HeatmapError(f"{bag_path}: {bag.dim}-d features but the model takes {folds[0].spec.in_dim}-d")
    x = torch.from_numpy(np.ascontiguousarray(bag.features, dtype=np.float32)).to(dev)
    scores, probs = [], []
    with torch.no_grad():
        for f in folds:
            o = f.model(x, coords=torch.from_numpy(bag.coords))
            scores.append(o.tile_scores.float().cpu().numpy())
            probs.append(f.probs(o.logits.float().cpu().numpy()[None])[0])
    raw = scores[0] if len(folds) == 1 else np.mean([normalize_scores(s) for s in scores], axis=0)
    names = folds[0].class_names
    p = np.mean(probs, axis=0)
    info = {
        "model": folds[0].spec.name,
        "folds": [str(f.path) for f in folds],
        "probabilities": {c: float(v) for c, v in zip(names, p, strict=True)},
        "score_kind": getattr(folds[0].model, "score_kind", "attention"),
    }
    size = size_level0 or size_level0_of(bag)
    return TileScores(np.asarray(bag.coords, np.int64), raw.astype(np.float64), size, info), info


def heatmap_for_slide(
    model_dir: str | os.PathLike,
    slide_path: str | os.PathLike,
    bag_path: str | os.PathLike,
    out: str | os.PathLike,
    normalize: str = "rank",
    cmap: str = "jet",
    alpha: float = 0.5,
    max_side: int = 2048,
    top_k: int = 8,
    device: str = "auto",
    size_level0: int | None = None,
) -> dict[str, Path]:
    """Score the bag with the model and draw it over the slide; returns the written paths."""
    ts, info = model_tile_scores(model_dir, bag_path, device, size_level0)
    with open_slide(slide_path) as slide:
        pred = ", ".join(f"{c} {p:.2f}" for c, p in info["probabilities"].items())
        title = f"{slide.slide_id} — {info['model']} ({pred})"
        return render(slide, ts, out, normalize, cmap, alpha, max_side, top_k, title)


def heatmap_job(
    entry: SlideEntry, job_dir: str | os.PathLike, cfg: HeatmapConfig, bag: Path, overwrite: bool = False
) -> BatchSummary:
    """The `heatmap` stage of a job for one slide: ``<job>/heatmaps/<slide_id>.png`` and its siblings,
    with :func:`wsikit.jobs.run_batch` semantics (skip done, lock, failure record)."""

    def work(e: SlideEntry) -> StageResult:
        out = Path(job_dir) / "heatmaps" / f"{e.slide_id}.png"
        written = heatmap_for_slide(
            cfg.model, e.path, bag, out, cfg.normalize, cfg.cmap, cfg.alpha, cfg.max_side, cfg.top_k
        )
        return StageResult(outputs=[str(p) for p in written.values()])

    return run_batch("heatmap", [entry], work, job_dir, overwrite=overwrite)
