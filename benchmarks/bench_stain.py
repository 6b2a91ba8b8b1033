"""Stain normalization throughput: wsikit (batched) vs torchstain and StainTools (one tile at a time).

All methods run in one process on the same real 256×256 tiles (cut from the bundled H&E slide
CMU-1-Small-Region.svs), each normalizer fitted once to torchstain's real H&E target image:

    .venv/bin/python benchmarks/bench_stain.py [--tiles 128] [--batch 64] [--threads 2] [--rounds 3]
        [--only macenko]

torchstain normalizes per tile (it re-estimates each tile's Macenko stains, as wsikit's Macenko does);
StainTools re-estimates each tile's stains for Macenko and Vahadane (SPAMS dictionary learning).
wsikit's Vahadane applies a slide-level source estimate (``for_slide`` on a sample, timed separately) to
every tile. "compiled" rows run the per-pixel work as one fused ``torch.compile`` kernel (``.compile()``;
the warm-up is excluded and printed). The contenders are timed round-robin, ``--rounds`` times each,
and each keeps its best round, so a shared, noisy machine slows them alike; compare the ratios printed
from one run, not absolute rates across runs. A CUDA device, if present, is timed too.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads (SPAMS, torch) must not spin

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from wsikit.slide import SAMPLE_SLIDE, open_slide
from wsikit.stain import fit_normalizer, load_image

TARGET = Path(__file__).resolve().parents[2] / "shared" / "data" / "stain" / "torchstain_target.png"


def real_tiles(n: int, size: int = 256) -> np.ndarray:
    """``n`` tissue tiles (n,size,size,3) uint8 from the bundled slide (half-overlapping, reading order)."""
    with open_slide(SAMPLE_SLIDE) as slide:
        w, h = slide.dimensions
        rgb = slide.read_region((0, 0), 0, (w, h))
    tiles = []
    for y in range(0, h - size + 1, size // 2):
        for x in range(0, w - size + 1, size // 2):
            t = rgb[y : y + size, x : x + size]
            if (t.min(axis=2) < 200).mean() > 0.5:  # mostly tissue, as a tiler would keep
                tiles.append(t)
    tiles = (tiles * (n // max(len(tiles), 1) + 1))[:n]
    return np.stack(tiles)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    ap.add_argument("--staintools-vahadane-tiles", type=int, default=3, help="tiles per round (~1 s each)")
    ap.add_argument("--only", metavar="WORD", help="time only the rows whose name holds WORD (e.g. macenko)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tiles = real_tiles(args.tiles)
    target = load_image(TARGET) if TARGET.is_file() else tiles[0]
    batch = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    chw = [torch.from_numpy(t).permute(2, 0, 1).contiguous() for t in tiles]
    print(f"{len(tiles)} real 256×256 tiles, batch {args.batch}, {torch.get_num_threads()} threads")

    # name -> (function normalizing k tiles, k, sync)
    contenders: dict[str, tuple[Callable[[], object], int, Callable[[], None]]] = {}

    def batched(norm, data: torch.Tensor) -> Callable[[], object]:
        return lambda: [norm(data[i : i + args.batch]) for i in range(0, len(data), args.batch)]

    def add_wsikit(name: str, norm, data: torch.Tensor = batch, sync=lambda: None) -> None:
        contenders[name] = (batched(norm, data), len(data), sync)
        if args.compile:
            fused = copy.copy(norm).compile()
            t0 = time.perf_counter()
            fused(data[: args.batch])
            sync()
            print(f"  {name}: torch.compile warm-up {time.perf_counter() - t0:.1f} s (once per process)")
            contenders[f"{name}, compiled"] = (batched(fused, data), len(data), sync)

    mac = fit_normalizer("macenko", target)
    add_wsikit("wsikit macenko (per tile), batch", mac)
    vah = fit_normalizer("vahadane", target)
    t0 = time.perf_counter()
    vah_slide = vah.for_slide(batch[:16])
    print(f"  wsikit vahadane for_slide on 16 tiles: {time.perf_counter() - t0:.3f} s (once per slide)")
    add_wsikit("wsikit vahadane apply, batch", vah_slide)
    vah_tile = fit_normalizer("vahadane", target, source="tile")
    contenders["wsikit vahadane per-tile learning, batch"] = (batched(vah_tile, batch[:64]), 64, lambda: None)
    rein = fit_normalizer("reinhard", target)
    add_wsikit("wsikit reinhard, batch", rein)
    try:
        from torchstain.torch.normalizers import TorchMacenkoNormalizer, TorchReinhardNormalizer

        ts = TorchMacenkoNormalizer()
        ts.fit(torch.from_numpy(target).permute(2, 0, 1))
        contenders["torchstain macenko (torch), per tile"] = (
            lambda: [ts.normalize(t, stains=False) for t in chw[:32]],
            32,
            lambda: None,
        )
        tr = TorchReinhardNormalizer()
        tr.fit(torch.from_numpy(target).permute(2, 0, 1))
        contenders["torchstain reinhard (torch), per tile"] = (
            lambda: [tr.normalize(t) for t in chw[:32]],
            32,
            lambda: None,
        )
    except ImportError:
        print("  torchstain not installed: its rows are skipped")
    try:
        import staintools

        st_mac = staintools.StainNormalizer("macenko")
        st_mac.fit(target.copy())
        contenders["staintools macenko, per tile"] = (
            lambda: [st_mac.transform(t.copy()) for t in tiles[:8]],
            8,
            lambda: None,
        )
        st_vah = staintools.StainNormalizer("vahadane")
        st_vah.fit(target.copy())
        k = args.staintools_vahadane_tiles
        contenders["staintools vahadane, per tile"] = (
            lambda: [st_vah.transform(t.copy()) for t in tiles[:k]],
            k,
            lambda: None,
        )
    except ImportError:
        print("  staintools not installed: its rows are skipped")
    if torch.cuda.is_available():
        gpu, sync = batch.cuda(), torch.cuda.synchronize
        add_wsikit("wsikit macenko (per tile), batch, cuda", mac, gpu, sync)
        add_wsikit("wsikit vahadane apply, batch, cuda", vah_slide, gpu, sync)
        contenders["wsikit vahadane per-tile learning, cuda"] = (batched(vah_tile, gpu), len(gpu), sync)
        add_wsikit("wsikit reinhard, batch, cuda", rein, gpu, sync)

    if args.only:
        contenders = {name: c for name, c in contenders.items() if args.only.lower() in name}
    best: dict[str, float] = dict.fromkeys(contenders, float("inf"))
    for fn, _, sync in contenders.values():  # warm-up
        fn()
        sync()
    for _ in range(args.rounds):
        for name, (fn, _, sync) in contenders.items():
            torch.set_num_threads(args.threads)  # SPAMS (StainTools) resets OpenMP's thread count
            t0 = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    rates = {name: contenders[name][1] / best[name] for name in contenders}
    print(f"Throughput (best of {args.rounds} round-robin rounds)")
    for name, rate in rates.items():
        print(f"  {name:<48} {rate:9.1f} tiles/s")

    print("Ratios (same run, same tiles)")
    goals = {
        ("macenko (per tile)", "torchstain macenko (torch), per tile"): "goal ≥ 10×",
        ("vahadane apply", "staintools vahadane, per tile"): "goal ≥ 100×",
    }
    pairs = [
        ("macenko (per tile)", "torchstain macenko (torch), per tile"),
        ("macenko (per tile)", "staintools macenko, per tile"),
        ("vahadane apply", "staintools vahadane, per tile"),
        ("vahadane per-tile learning", "staintools vahadane, per tile"),
        ("reinhard", "torchstain reinhard (torch), per tile"),
    ]
    for key, ref in pairs:
        for name in rates:
            if name.startswith(f"wsikit {key}") and ref in rates:
                print(f"  {name} / {ref}: {rates[name] / rates[ref]:8.1f}×  {goals.get((key, ref), '')}")


if __name__ == "__main__":
    main()
