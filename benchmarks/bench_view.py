"""Benchmark `wsikit view`: DeepZoom tile latency (cold and cached) and, in headless Chromium, the time to
the first picture, to each zoom step, and to load and draw a 100,000-tile score layer.

Slides: the bundled CMU-1-Small-Region (2220×2967, one level) and the 40,000×30,000 pyramid of
``bench_tile.build_slide`` (cached in a temp folder). Each gets a job (``wsikit tile`` at 20x/224) and a
heatmap folder of made-up scores; the large slide's scores are on a 112-px lattice (≈95,000 tiles).

    .venv/bin/python benchmarks/bench_view.py [--cache /tmp/wsikit-bench] [--zoom-steps 5]

HTTP timings are single requests from one client (what one user's first look costs); browser timings are
wall time from navigation / viewport change until OpenSeadragon reports every tile it wants loaded.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tile import build_slide
from chromium import CHROMIUM, Chromium
from view_server import Server

from wsikit.grids import read_grid
from wsikit.jobs import SlideEntry
from wsikit.settings import TileConfig
from wsikit.slide import SAMPLE_SLIDE
from wsikit.specs import TileSpec
from wsikit.stages.tile import run_tiling
from wsikit.view.data import ViewJob
from wsikit.view.dzi import SHARED_CACHE


def make_job(slide: Path, root: Path, stride: int | None) -> tuple[Path, Path]:
    """A tiled job of ``slide`` and a heatmap folder with smooth made-up scores (on the grid, or a finer lattice)."""
    job, hm = root / "job", root / "heatmaps"
    if not job.exists():
        run_tiling([SlideEntry(slide, slide.stem)], job, TileConfig(specs=(TileSpec.from_mag(20, 224),)))
    hm.mkdir(parents=True, exist_ok=True)
    grid = read_grid(job / "tiles" / "mpp0.50_224px_0ov" / f"{slide.stem}.h5")
    if stride:
        xs, ys = np.meshgrid(
            np.arange(0, grid.attrs["level0_width"] - stride, stride),
            np.arange(0, grid.attrs["level0_height"] - stride, stride),
        )
        coords, size = np.c_[xs.ravel(), ys.ravel()], stride
    else:
        coords, size = grid.coords, grid.size_level0
    score = np.sin(coords[:, 0] / 3000.0) * np.cos(coords[:, 1] / 2000.0)
    norm = (score - score.min()) / max(np.ptp(score), 1e-9)
    rank = np.argsort(np.argsort(-score)) + 1
    lines = ["x,y,width,height,score,score_norm,rank"]
    lines += [
        f"{x},{y},{size},{size},{s:.5f},{n:.5f},{r}"
        for (x, y), s, n, r in zip(coords.tolist(), score, norm, rank, strict=True)
    ]
    (hm / f"{slide.stem}_scores.csv").write_text("\n".join(lines) + "\n")
    return job, hm


def http_levels(server: Server, key: str) -> list[tuple[int, float, float]]:
    """(level, cold ms, cached ms) of the centre tile of the finest 6 levels and the coarsest."""
    out = []
    dz = server.job.deepzoom(key)
    for level in sorted({0, *range(max(0, dz.max_level - 5), dz.max_level + 1)}):
        cols, rows = dz.tile_count(level)
        path = f"/dzi/{key}/{level}/{cols // 2}_{rows // 2}.jpeg"
        t = time.perf_counter()
        assert server.get(path)[0] == 200
        cold = time.perf_counter() - t
        t = time.perf_counter()
        server.get(path)
        out.append((level, cold * 1e3, (time.perf_counter() - t) * 1e3))
    return out


def browser(server: Server, key: str, zoom_steps: int) -> dict[str, object]:
    """First picture and zoom-step times in Chromium, plus the score layer's load and draw times."""
    with Chromium(1280, 800) as b:
        t = time.perf_counter()
        b.navigate(f"http://127.0.0.1:{server.port}/?token={server.token}#slide={key}")
        b.wait_for("window.wsikitView && wsikitView.settled()", 300)
        first = time.perf_counter() - t
        stats = json.loads(b.evaluate("JSON.stringify(wsikitView.state.stats)"))
        steps, tiles = [], [b.evaluate("wsikitView.state.stats.tiles_loaded || 0")]
        for _ in range(zoom_steps):
            t = time.perf_counter()
            b.evaluate(
                "wsikitView.state.viewer.viewport.zoomBy(2, undefined, true); wsikitView.state.viewer.viewport.applyConstraints(true); 0"
            )
            time.sleep(0.05)
            b.wait_for("wsikitView.settled()", 300)
            steps.append(time.perf_counter() - t)
            tiles.append(b.evaluate("wsikitView.state.stats.tiles_loaded || 0"))
        draws = []
        for _ in range(20):  # overlay redraw while panning (zoomed in)
            b.evaluate(
                "wsikitView.state.viewer.viewport.panBy(new OpenSeadragon.Point(0.01, 0), true); wsikitView.redraw(); 0"
            )
            draws.append(b.evaluate("wsikitView.state.stats.draw_ms"))
        b.evaluate("wsikitView.state.viewer.viewport.goHome(true); 0")
        b.wait_for("wsikitView.settled()", 300)
        home_draws = []
        for _ in range(20):
            b.evaluate("wsikitView.redraw(); 0")
            home_draws.append(b.evaluate("wsikitView.state.stats.draw_ms"))
    return {
        "tiles": tiles,
        "first": first,
        "stats": stats,
        "steps": steps,
        "draw_in": statistics.median(draws),
        "draw_home": statistics.median(home_draws),
    }


def clear_tiles() -> None:
    SHARED_CACHE._items.clear()
    SHARED_CACHE.bytes = 0


def report(run: str, r: dict[str, object]) -> None:
    stats = r["stats"]
    layer = stats["layers"].get("scores-0", {})
    print(
        f"  browser, {run}: first picture {r['first']:.2f} s ({r['tiles'][0]} tiles; slide facts {stats['open_ms']:.0f} ms), "
        "zoom ×2 steps "
        + ", ".join(
            f"{s:.2f} s ({b - a} tiles)"
            for s, a, b in zip(r["steps"], r["tiles"], r["tiles"][1:], strict=False)
        )
        + f"; scores fetch {layer.get('fetch_ms', 0):.0f} ms + decode {layer.get('decode_ms', 0):.0f} ms; "
        f"overlay frame {r['draw_home']:.1f} ms (whole slide), {r['draw_in']:.1f} ms (zoomed in)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsikit-bench")
    ap.add_argument("--zoom-steps", type=int, default=5)
    args = ap.parse_args()
    if not CHROMIUM.is_file():
        sys.exit(f"{CHROMIUM} missing: apt-get install chromium")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    big = build_slide(args.cache / "cmu_mirror_40000x30000_0.25.svs", 40_000, 30_000)
    for slide, stride in ((SAMPLE_SLIDE, None), (big, 112)):
        job, hm = make_job(slide, args.cache / f"view_{slide.stem}", stride)
        server = Server(ViewJob(job, heatmaps=[hm]))
        key = next(iter(server.job.slides))
        try:
            dims = server.job.deepzoom(key).descriptor()
            t = time.perf_counter()
            _, headers, body = server.get(f"/api/slide/{key}/scores-0", headers={"Accept-Encoding": "gzip"})
            build = time.perf_counter() - t
            raw = gzip.decompress(body) if headers.get("content-encoding") == "gzip" else body
            print(
                f"{slide.name} ({dims['width']}×{dims['height']}): score layer of {json.loads(raw)['count']} tiles "
                f"{len(raw) / 1e6:.2f} MB JSON, {len(body) / 1e6:.2f} MB sent (gzip), built in {build * 1e3:.0f} ms"
            )
            clear_tiles()
            report("tiles cold", browser(server, key, args.zoom_steps))
            report("tiles in the server's cache (new browser profile)", browser(server, key, args.zoom_steps))
            clear_tiles()
            for level, cold, cached in http_levels(server, key):
                print(f"  HTTP tile level {level:>2}: cold {cold:6.1f} ms, cached {cached:5.1f} ms")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
