"""Stain normalization throughput: wsikit (batched) vs torchstain and StainTools (one tile at a time).

All methods run in one benchmark on the same real 256×256 tiles (cut from the bundled H&E slide
CMU-1-Small-Region.svs), each normalizer fitted once to torchstain's real H&E target image:

    .venv/bin/python benchmarks/bench_stain.py [--tiles 128] [--batch 64] [--threads 2] [--rounds 3]
        [--min-seconds 0.5] [--only macenko] [--one-process]

Each contender runs in a worker process of its own and the main process asks them in turn. A turn is one
untimed call, then timed calls for at least ``--min-seconds``: a steady state, as in a pipeline. Both
matter on this VM: CPUs that sat idle for a fraction of a second take 10–50 ms to come back up to speed
(a 5 ms numpy loop takes 10 / 23 / 47 ms after 0.1 / 0.5 / 2 s of idling), so one short timed call right
after the other contenders' turns showed batched Macenko at half its rate. In one process
(``--one-process``) SPAMS (inside StainTools) and torch.compile's kernels also bring further OpenMP
runtimes whose threads compete with torch's.

torchstain normalizes per tile (it re-estimates each tile's Macenko stains, as wsikit's Macenko does);
StainTools re-estimates each tile's stains for Macenko and Vahadane (SPAMS dictionary learning).
wsikit's Vahadane applies a slide-level source estimate (``for_slide`` on a sample, timed separately) to
every tile. "compiled" rows run the per-pixel work as one fused ``torch.compile`` kernel (``.compile()``;
the warm-up is excluded and printed). The contenders are timed round-robin, ``--rounds`` times each,
and each keeps its best round, so a shared, noisy machine slows them alike; compare the ratios printed
from one run, not absolute rates across runs. A CUDA device, if present, is timed too.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
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


Contender = tuple[Callable[[], object], int, Callable[[], None]]  # normalize k tiles, k, sync
LIBRARIES = ("wsikit", "torchstain", "staintools")


def build(library: str, args: argparse.Namespace) -> dict[str, Callable[[], Contender]]:
    """One library's contenders by name, each built (fitted, compiled, warmed up) only when called."""
    torch.set_num_threads(args.threads)
    tiles = real_tiles(args.tiles)
    target = load_image(TARGET) if TARGET.is_file() else tiles[0]
    batch = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
    chw = [torch.from_numpy(t).permute(2, 0, 1).contiguous() for t in tiles]
    factories: dict[str, Callable[[], Contender]] = {}

    def batched(norm, data: torch.Tensor) -> Callable[[], object]:
        return lambda: [norm(data[i : i + args.batch]) for i in range(0, len(data), args.batch)]

    def add_wsikit(
        name: str, make, data: torch.Tensor = batch, sync=lambda: None, k: int | None = None, fuse=True
    ) -> None:
        n = k or len(data)
        factories[name] = lambda: (batched(make(), data[:n]), n, sync)
        if args.compile and k is None and fuse:

            def compiled() -> Contender:
                fused = copy.copy(make()).compile()
                t0 = time.perf_counter()
                fused(data[: args.batch])
                sync()
                print(f"  {name}: torch.compile warm-up {time.perf_counter() - t0:.1f} s (once per process)")
                return batched(fused, data), len(data), sync

            factories[f"{name}, compiled"] = compiled

    def vahadane_for_slide():
        t0 = time.perf_counter()
        norm = fit_normalizer("vahadane", target).for_slide(batch[:16])
        print(f"  wsikit vahadane for_slide on 16 tiles: {time.perf_counter() - t0:.3f} s (once per slide)")
        return norm

    def per_tile(make, items: list, k: int) -> Callable[[], Contender]:
        k = min(k, len(items))

        def factory() -> Contender:
            norm = make()
            return (lambda: [norm(t) for t in items[:k]]), k, lambda: None

        return factory

    if library == "wsikit":
        devices = [("", batch, lambda: None)]
        if torch.cuda.is_available():
            devices.append((", cuda", batch.cuda(), torch.cuda.synchronize))
        for suffix, data, sync in devices:
            add_wsikit(
                f"wsikit macenko (per tile), batch{suffix}",
                lambda: fit_normalizer("macenko", target),
                data,
                sync,
                fuse=bool(suffix),  # uint8 on CPU runs table kernels, compiled or not
            )
            add_wsikit(f"wsikit vahadane apply, batch{suffix}", vahadane_for_slide, data, sync)
            add_wsikit(
                f"wsikit vahadane per-tile learning, batch{suffix}",
                lambda: fit_normalizer("vahadane", target, source="tile"),
                data,
                sync,
                k=64,
            )
            add_wsikit(
                f"wsikit reinhard, batch{suffix}", lambda: fit_normalizer("reinhard", target), data, sync
            )
    elif library == "torchstain":
        try:
            from torchstain.torch.normalizers import TorchMacenkoNormalizer, TorchReinhardNormalizer
        except ImportError:
            print("  torchstain not installed: its rows are skipped")
            return factories

        def fitted(cls, **kw):
            norm = cls()
            norm.fit(torch.from_numpy(target).permute(2, 0, 1))
            return lambda t: norm.normalize(t, **kw)

        factories["torchstain macenko (torch), per tile"] = per_tile(
            lambda: fitted(TorchMacenkoNormalizer, stains=False), chw, 32
        )
        factories["torchstain reinhard (torch), per tile"] = per_tile(
            lambda: fitted(TorchReinhardNormalizer), chw, 32
        )
    elif library == "staintools":
        try:
            import staintools
        except ImportError:
            print("  staintools not installed: its rows are skipped")
            return factories

        def fitted_st(method: str):
            norm = staintools.StainNormalizer(method)
            norm.fit(target.copy())
            return lambda t: norm.transform(t.copy())

        factories["staintools macenko, per tile"] = per_tile(lambda: fitted_st("macenko"), list(tiles), 8)
        factories["staintools vahadane, per tile"] = per_tile(
            lambda: fitted_st("vahadane"), list(tiles), args.staintools_vahadane_tiles
        )
    return factories


def time_one(contender: Contender, threads: int, min_seconds: float) -> float:
    """Seconds per call in a steady state: one untimed call first (this VM's CPUs take 10–50 ms to come
    back up to speed after the other contenders' turns), then calls until ``min_seconds`` have passed."""
    fn, _, sync = contender
    torch.set_num_threads(threads)  # SPAMS (StainTools) resets OpenMP's thread count
    fn()
    sync()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        sync()
        calls += 1
        if (elapsed := time.perf_counter() - t0) >= min_seconds:
            return elapsed / calls


def worker(library: str, name: str, args: argparse.Namespace, conn) -> None:
    """One contender's own process: builds it, then times one call per message."""
    contender = build(library, args)[name]()
    conn.send(contender[1])
    while conn.recv() is not None:
        conn.send(time_one(contender, args.threads, args.min_seconds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=0.5, help="timed calls per turn last at least this")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    ap.add_argument("--staintools-vahadane-tiles", type=int, default=3, help="tiles per round (~1 s each)")
    ap.add_argument("--only", metavar="WORD", help="time only the rows whose name holds WORD (e.g. macenko)")
    ap.add_argument(
        "--one-process", action="store_true", help="all contenders in this process (interference)"
    )
    args = ap.parse_args()
    print(f"{args.tiles} real 256×256 tiles, batch {args.batch}, {args.threads} threads, "
          f"{'one process' if args.one_process else 'one process per contender'}")  # fmt: skip

    runners: dict[str, Callable[[], float]] = {}  # name -> time one call
    sizes: dict[str, int] = {}
    conns = []
    for library in LIBRARIES:
        for name, make in build(library, args).items():
            if args.only and args.only.lower() not in name:
                continue
            if args.one_process:
                contender = make()
                sizes[name] = contender[1]
                runners[name] = lambda c=contender: time_one(c, args.threads, args.min_seconds)
            else:  # started one after the other, so their set-up lines print in order
                here, there = mp.get_context("spawn").Pipe()
                mp.get_context("spawn").Process(
                    target=worker, args=(library, name, args, there), daemon=True
                ).start()
                sizes[name] = here.recv()
                conns.append(here)
                runners[name] = lambda c=here: (c.send(True), c.recv())[1]
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(args.rounds):
        for name, run in runners.items():
            best[name] = min(best[name], run())
    for conn in conns:
        conn.send(None)
    rates = {name: sizes[name] / best[name] for name in runners}
    print(f"Throughput (best of {args.rounds} round-robin turns of ≥ {args.min_seconds} s each)")
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
