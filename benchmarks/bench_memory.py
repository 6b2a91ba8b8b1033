"""Peak resident memory of tiling and extraction as slides grow: ~10,000 vs ~100,000 tissue tiles.

Builds (once, cached) two pyramidal TIFFs at the bundled slide's 0.499 µm/px by mirroring its real
tissue across the canvas; the pyramid is written file tile by file tile, so building it holds no
whole-slide array. Each measured step runs in a fresh Python process that reports its own peak RSS
(``VmHWM``, plus any DataLoader workers' peak): ``import wsikit, torch`` alone (the interpreter
baseline), ``run_tiling`` (mask, 32-px grid, GeoJSON, QC picture, coordinates file) and
``run_extraction`` (every tile read at the grid, batched, moved to the device and encoded by a
minimal random CNN at 32 px, features streamed through ``BagWriter``; a real CNN on 100k tiles would
take an hour on a shared CPU, and the memory behaviour is the pipeline's, not the model's).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_memory.py [--quick] [--cache DIR]

"arrays" is what a step cannot avoid being proportional to: the grid (coords int64 (N, 2) + tissue
fraction float32) for tiling, and for extraction additionally the bag's features (N, D) float32 and
tile index, were they held at once. "excess" = peak − arrays; bounded memory means the 100k excess
is about the 10k excess (ratio ≈ 1), and the growth over the interpreter baseline stays small.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TILE = 32  # px at the slide's native resolution
FEATURE_DIM = 64
BATCH = 256
SOURCE_MPP = 0.499
N_LEVELS = 5
FILE_TILE = 256


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM), or its DataLoader workers' if larger, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, workers) / 1024


# -- building the slides -------------------------------------------------------------------------------
def _source() -> np.ndarray:
    """The bundled slide's level 0, cropped to a multiple of 2^(levels - 1) px on both sides."""
    from wsikit.slide import SAMPLE_SLIDE, open_slide

    with open_slide(SAMPLE_SLIDE) as slide:
        rgb = slide.read_region((0, 0), 0, slide.dimensions)
    k = 2 ** (N_LEVELS - 1)
    return np.ascontiguousarray(rgb[: rgb.shape[0] // k * k, : rgb.shape[1] // k * k])


def _mirror_index(start: int, n: int, period: int) -> np.ndarray:
    """Source rows/columns of canvas positions start … start + n of a canvas mirrored every ``period``."""
    p = np.arange(start, start + n) % (2 * period)
    return np.where(p < period, p, 2 * period - 1 - p)


def _level_tiles(src: np.ndarray, width: int, height: int):
    """The file tiles (row-major) of a ``width``×``height`` canvas of ``src`` mirrored across it."""
    sh, sw = src.shape[:2]
    for y in range(0, height, FILE_TILE):
        rows = _mirror_index(y, FILE_TILE, sh)
        band = src[rows]
        for x in range(0, width, FILE_TILE):
            yield np.ascontiguousarray(band[:, _mirror_index(x, FILE_TILE, sw)])


def build_slide(path: Path, width: int, height: int, src: np.ndarray) -> Path:
    """A generic tiled pyramid (JPEG, 2× levels, MPP in the resolution tags) of mirrored real tissue."""
    import cv2
    import tifffile

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        level_src, w, h = src, width, height
        for lv in range(N_LEVELS):
            ppcm = 1e4 / (SOURCE_MPP * width / w)
            tw.write(
                _level_tiles(level_src, w, h),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(FILE_TILE, FILE_TILE),
                compression="jpeg",
                compressionargs={"level": 85},
                photometric="rgb",
                subfiletype=1 if lv else 0,
                resolution=(ppcm, ppcm),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
            sh, sw = level_src.shape[:2]
            level_src = cv2.resize(level_src, (sw // 2, sh // 2), interpolation=cv2.INTER_AREA)
            w, h = w // 2, h // 2
    tmp.rename(path)
    return path


def tissue_share(src: np.ndarray) -> float:
    """Share of the source's area in tiles with ≥ 50% tissue (on its mask at 8 µm/px)."""
    import cv2

    from wsikit.tissue import mask_from_rgb

    k = 16
    small = cv2.resize(src, (src.shape[1] // k, src.shape[0] // k), interpolation=cv2.INTER_AREA)
    return float(mask_from_rgb(small, SOURCE_MPP * k).mean())


def slide_dims(n_tiles: int, share: float) -> tuple[int, int]:
    """A 4:3 canvas holding about ``n_tiles`` tissue tiles of ``TILE`` px."""
    area = n_tiles * TILE * TILE / share
    height = int(np.sqrt(area * 3 / 4))
    return int(height * 4 / 3), height


# -- the measured steps (each in a fresh process) -------------------------------------------------------
def tiny_encoder():
    """A random two-layer CNN at 32 px with ``FEATURE_DIM`` outputs, wrapped as a wsikit Encoder."""
    from torch import nn

    from wsikit.encoders import IMAGENET_MEAN, IMAGENET_STD
    from wsikit.encoders.build import Encoder

    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2),
        nn.ReLU(),
        nn.Conv2d(32, FEATURE_DIM, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()
    return Encoder(
        "bench-tiny",
        model,
        FEATURE_DIM,
        TILE,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "bilinear",
        "fp32",
        None,
        "random",
    )


def child(step: str, slide: Path | None, job: Path | None) -> dict:
    """Run one step in this (fresh) process; returns tiles, seconds and peak RSS."""
    import torch  # noqa: F401

    import wsikit  # noqa: F401

    t = time.perf_counter()
    tiles = 0
    if step == "tile":
        from wsikit.jobs import SlideEntry
        from wsikit.settings import TileConfig
        from wsikit.specs import TileSpec
        from wsikit.stages.tile import run_tiling

        cfg = TileConfig((TileSpec(SOURCE_MPP, TILE),))
        summary = run_tiling([SlideEntry(slide, "bench")], job, cfg, overwrite=True)
        if summary.failed:
            raise RuntimeError(summary.failed[0].error)
        tiles = next(iter(summary.done[0].info["tiles"].values()))
    elif step == "extract":
        from wsikit.settings import ExtractConfig
        from wsikit.stages.extract import run_extraction

        cfg = ExtractConfig(
            "bench-tiny", batch_size=BATCH, workers=0, device="cpu", precision="fp32", multiscale=False
        )
        summary = run_extraction(job, cfg, overwrite=True, encoder=tiny_encoder())
        if summary.failed:
            raise RuntimeError(summary.failed[0].error)
        tiles = next(iter(summary.done[0].info["tiles"].values()))
    return {"step": step, "tiles": tiles, "seconds": time.perf_counter() - t, "peak_mib": peak_rss_mib()}


def run_child(step: str, slide: Path | None = None, job: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", step]
    if slide is not None:
        cmd += ["--slide", str(slide), "--job", str(job)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{step} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def arrays_mib(step: str, tiles: int) -> float:
    """Bytes a step cannot avoid being proportional to (see the module docstring), in MiB."""
    grid = tiles * (2 * 8 + 4)
    bag = tiles * (FEATURE_DIM * 4 + 2 * 8 + 8)
    return (grid + (bag if step == "extract" else 0)) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 and 20,000 tiles (a smoke run)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsikit-bench-memory")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--slide", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.slide, args.job)))
        return

    sizes = (2_000, 20_000) if args.quick else (10_000, 100_000)
    src = _source()
    share = tissue_share(src)
    base = run_child("baseline")["peak_mib"]
    print(f"baseline: `import wsikit, torch` in a fresh process peaks at {base:.0f} MiB")
    rows = []
    for n in sizes:
        w, h = slide_dims(n, share)
        path = args.cache / f"mirror_{w}x{h}_{SOURCE_MPP}.tif"
        t = time.perf_counter()
        existed = path.exists()
        build_slide(path, w, h, src)
        built = "cached" if existed else f"built in {time.perf_counter() - t:.0f} s"
        print(f"slide ~{n:,} tiles: {path.name}, {path.stat().st_size / 2**20:.0f} MiB ({built})")
        job = args.cache / f"job_{n}"
        for step in ("tile", "extract"):
            rows.append((n, run_child(step, path, job)))

    print(
        f"\n{'step':8s} {'tiles':>8s} {'seconds':>8s} {'peak MiB':>9s} {'arrays MiB':>11s} "
        f"{'excess MiB':>11s} {'over baseline':>14s}"
    )
    excess: dict[tuple[str, int], float] = {}
    for n, r in rows:
        arrays = arrays_mib(r["step"], r["tiles"])
        excess[r["step"], n] = r["peak_mib"] - arrays
        print(
            f"{r['step']:8s} {r['tiles']:8,d} {r['seconds']:8.1f} {r['peak_mib']:9.0f} {arrays:11.1f} "
            f"{r['peak_mib'] - arrays:11.0f} {r['peak_mib'] - base:14.0f}"
        )
    small, large = sizes
    print()
    for step in ("tile", "extract"):
        ratio = excess[step, large] / excess[step, small]
        peak_growth = excess[step, large] - excess[step, small]
        print(
            f"{step}: excess {large:,} / {small:,} tiles = {ratio:.3f} "
            f"(excess changed by {peak_growth:+.0f} MiB; run-to-run noise is about ±8 MiB)"
        )


if __name__ == "__main__":
    main()
