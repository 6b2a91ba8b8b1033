"""Benchmark `wsikit tile` on a large slide built from real tissue; vectorised vs naive per-tile filter.

Builds (once, cached in a temp folder) a 40,000×30,000 px pyramidal SVS at 0.25 µm/px by upsampling the
bundled CMU-1-Small-Region tissue 2× and mirroring it across the canvas, then times, side by side in one
run: the mask (thumbnail read + Otsu), coordinates + tissue fractions for several specs, the whole
per-slide stage, and the same tissue filter written the naive way (a Python loop over tiles).

    .venv/bin/python benchmarks/bench_tile.py [--width 40000 --height 30000 --repeats 3]

Timings on a shared machine are noisy: the ratio (measured back to back) is the robust number.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from wsikit.jobs import SlideEntry
from wsikit.pyramid import write_pyramid
from wsikit.settings import TileConfig
from wsikit.slide import SAMPLE_SLIDE, open_slide
from wsikit.specs import TileSpec, nominal_layout
from wsikit.stages.tile import tile_one
from wsikit.tiling import build_grids
from wsikit.tissue import compute_mask


def build_slide(path: Path, width: int, height: int) -> Path:
    """Mirror-tile the real CMU-1 tissue (upsampled to 0.25 µm/px) into a ``width``×``height`` pyramid."""
    if path.exists():
        return path
    with open_slide(SAMPLE_SLIDE) as slide:
        src = slide.read_region((0, 0), 0, slide.dimensions)
    src = cv2.resize(src, (src.shape[1] * 2, src.shape[0] * 2), interpolation=cv2.INTER_LINEAR)
    h, w = src.shape[:2]
    canvas = np.empty((height, width, 3), np.uint8)  # filled in place: no concatenated copies
    for y in range(0, height, h):
        for x in range(0, width, w):
            block = src[:, ::-1] if (x // w) % 2 else src  # mirror alternate copies so edges meet
            block = block[::-1] if (y // h) % 2 else block
            canvas[y : y + h, x : x + w] = block[: height - y, : width - x]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.svs")
    write_pyramid(tmp, canvas, 0.25, tile=256, n_levels=6, layout="svs", quality=85)
    tmp.rename(path)
    return path


def naive_filter(
    mask: np.ndarray, scale: tuple[float, float], dims, size0: int, stride0: int, min_tissue: float
):
    """The per-tile way: loop over tiles, slice the mask, take the mean."""
    kept = []
    for y in range(0, dims[1] - size0 + 1, stride0):
        for x in range(0, dims[0] - size0 + 1, stride0):
            x0, y0 = int(x / scale[0]), int(y / scale[1])
            x1, y1 = max(x0 + 1, int((x + size0) / scale[0])), max(y0 + 1, int((y + size0) / scale[1]))
            if mask[y0:y1, x0:x1].mean() >= min_tissue:
                kept.append((x, y))
    return np.array(kept, np.int64).reshape(-1, 2)


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=40_000)
    ap.add_argument("--height", type=int, default=30_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsikit-bench")
    args = ap.parse_args()

    path = args.cache / f"cmu_mirror_{args.width}x{args.height}_0.25.svs"
    t = time.perf_counter()
    existed = path.exists()
    build_slide(path, args.width, args.height)
    print(
        f"slide: {path} ({path.stat().st_size / 2**20:.0f} MiB, {'cached' if existed else f'built in {time.perf_counter() - t:.1f} s'})"
    )

    with open_slide(path) as slide:
        dims, mpp0 = slide.dimensions, slide.mpp0
        print(f"  {dims[0]}×{dims[1]} px, {slide.level_count} levels, {mpp0} µm/px, backend {slide.backend}")
        t_thumb, thumb = best_of(lambda: slide.thumbnail(mpp=8.0), args.repeats)
        t_mask, mask = best_of(lambda: compute_mask(slide, thumbnail=thumb), args.repeats)
    print(
        f"mask: thumbnail at 8 µm/px {thumb.shape[1]}×{thumb.shape[0]} read in {t_thumb * 1e3:.0f} ms, "
        f"Otsu mask {t_mask * 1e3:.0f} ms, tissue {100 * mask.fraction:.1f}% ({mask.area_um2 / 1e6:.1f} mm²)"
    )

    cases = [
        ("20x/256", [TileSpec.from_mag(20)]),
        ("40x/256", [TileSpec.from_mag(40)]),
        ("40x+20x+10x /256 aligned", [TileSpec.from_mag(m) for m in (40, 20, 10)]),
        ("40x/128 overlap 32", [TileSpec.from_mag(40, 128, 32)]),
    ]
    print(
        f"\n{'coordinates + tissue fractions':46s} {'grid':>8s} {'kept':>8s} {'vectorised':>11s} {'tiles/s':>12s} "
        f"{'naive loop':>11s} {'tiles/s':>10s} {'speed-up':>9s}"
    )
    for label, specs in cases:
        t_vec, grids = best_of(
            lambda specs=specs: build_grids(specs, dims, mpp0, mask.mask, mask.scale, 0.5), args.repeats
        )
        n_full = sum(int(np.prod(nominal_layout(s, mpp0).shape(dims))) for s in specs)
        n_kept = sum(len(g[2]) for g in grids)
        layouts = [nominal_layout(s, mpp0) for s in specs]
        t_naive, naive = best_of(
            lambda layouts=layouts: [
                naive_filter(mask.mask, mask.scale, dims, lay.size_level0, lay.stride_level0, 0.5)
                for lay in layouts
            ],
            1,
        )
        if len(specs) == 1:  # aligned coarse grids differ from independent ones, so compare single specs
            agree = len(set(map(tuple, naive[0])) & set(map(tuple, grids[0][2]))) / max(1, len(grids[0][2]))
            label += f" [{100 * agree:.0f}% same]"
        print(
            f"{label:46s} {n_full:8d} {n_kept:8d} {t_vec * 1e3:9.1f}ms {n_full / t_vec:12,.0f} "
            f"{t_naive * 1e3:9.0f}ms {n_full / t_naive:10,.0f} {t_naive / t_vec:8.0f}×"
        )

    job = args.cache / "job"  # outputs are replaced in place on every run
    cfg = TileConfig((TileSpec.from_mag(40), TileSpec.from_mag(20), TileSpec.from_mag(10)))
    t_stage, result = best_of(lambda: tile_one(SlideEntry(path, "bench"), job, cfg), 1)
    seconds = result.info["seconds"]
    print(
        f"\nwhole stage per slide (thumbnail, mask, 3 aligned grids, GeoJSON, QC PNG, 3 h5 files): "
        f"{t_stage:.2f} s  ({', '.join(f'{k} {v:.2f}s' for k, v in seconds.items())}); tiles {result.info['tiles']}"
    )
    print(f"QC picture: {job / 'qc' / 'bench.png'}")


if __name__ == "__main__":
    main()
