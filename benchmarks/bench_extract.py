"""End-to-end extraction rate (slide → bag file) against the encoder's pure forward rate, side by side.

    .venv/bin/python benchmarks/bench_extract.py [--encoder resnet50-trunc] [--batch 32] [--tiles 192]
        [--device auto] [--precision auto] [--reader auto] [--rounds 2] [--compare]

Builds a real slide (the bundled CMU H&E region mirrored 2×2 into a 4096×5888 JPEG pyramid, MPP 0.499),
tiles it at 0.5 µm/px / 256 px, then alternates, ``--rounds`` times:

* forward: the encoder on pre-loaded, pre-normalised (B, 3, 224, 224) tensors of the same batch size
  (channels-last, the same autocast), nothing else;
* end to end: ``Extractor.run`` on the job — DataLoader workers reading and resampling tiles, uint8 →
  device → normalisation → model → features streamed into the h5 bag, status record written;
* reading only: the stage's DataLoader (``wsikit.tiles.TileItems``, ``--reader``) with no model, to
  show the headroom of the readers.

It prints medians and the ratio end-to-end / forward. ``--compare`` adds, each in a fresh process:
fp32 vs bf16 autocast, and glibc malloc with and without wsikit's ``mallopt`` tuning (and tcmalloc
via LD_PRELOAD when installed). The encoder uses random weights (timing only; weights do not change
the cost). On a GPU the same script shows whether the readers keep the GPU fed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsikit.grids import grid_path, write_grid
from wsikit.jobs import SlideEntry
from wsikit.pyramid import write_pyramid
from wsikit.runtime import allotted_cpus, default_workers, resolve_device
from wsikit.settings import ExtractConfig
from wsikit.slide import SAMPLE_SLIDE, open_slide
from wsikit.specs import TileSpec
from wsikit.stages.extract import Extractor
from wsikit.tiles import TileItems, TileSource, collate_items, read_tile
from wsikit.tiling import tile_slide

TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def build_job(root: Path, n_tiles: int) -> tuple[Path, SlideEntry]:
    with open_slide(SAMPLE_SLIDE) as s:
        rgb = s.read_region((0, 0), 0, (2048, 2944))
    big = np.concatenate([np.concatenate([rgb, rgb[:, ::-1]], 1)] * 2, 0)
    slide_path = write_pyramid(root / "bench.svs", np.ascontiguousarray(big), 0.499, layout="svs")
    job = root / "job"
    with open_slide(slide_path) as slide:
        (grid,) = tile_slide(slide, [TileSpec(0.5, 256)])
    if n_tiles < len(grid):
        grid.coords, grid.tissue_fraction = grid.coords[:n_tiles], grid.tissue_fraction[:n_tiles]
    write_grid(grid_path(job, grid.spec, "bench"), grid)
    return job, SlideEntry(slide_path, "bench")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Wall time and CPU time (this process + reaped children, i.e. finished DataLoader workers)."""

    def __enter__(self) -> Clock:
        self.t0, self.r0 = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        (user, system), (user0, system0) = self._cpu(), self.r0
        self.cpu, self.sys = user + system - user0 - system0, system - system0

    @staticmethod
    def _cpu() -> tuple[float, float]:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime

    def record(self, n: int) -> dict[str, float]:
        return {
            "tiles_s": n / self.wall,
            "cpu_ms_tile": 1000 * self.cpu / n,
            "sys_ms_tile": 1000 * self.sys / n,
        }


def forward(ex: Extractor, batches: list[torch.Tensor]) -> dict[str, float]:
    rt = ex.runtime
    ctx = dict(
        device_type=rt.device.type, dtype=rt.autocast or torch.float32, enabled=rt.autocast is not None
    )
    with torch.inference_mode(), torch.autocast(**ctx):
        rt.encoder.model(batches[0])  # warm-up
        _sync(rt.device)
        with Clock() as clock:
            for x in batches:
                rt.encoder.model(x).float().cpu()
            _sync(rt.device)
    return clock.record(sum(len(x) for x in batches))


def end_to_end(ex: Extractor, job: Path, entry: SlideEntry, n: int) -> dict[str, float]:
    with Clock() as clock:
        summary = ex.run([entry], job, ["mpp0.50_256px_0ov"], overwrite=True)
    assert not summary.failed, summary.failed[0].error
    parts = summary.done[0].info["seconds"]["mpp0.50_256px_0ov"]
    return {**clock.record(n), **{f"s_{k}": v for k, v in parts.items()}, "s_run": clock.wall}


def reading(entry: SlideEntry, job: Path, ex: Extractor) -> dict[str, float]:
    from torch.utils.data import DataLoader

    from wsikit.grids import read_grid
    from wsikit.stages.extract import _worker_init

    grid = read_grid(grid_path(job, "mpp0.50_256px_0ov", "bench"))
    with open_slide(entry.path) as slide:
        source = TileSource(
            slide, grid.coords, grid.size_level0, ex.runtime.encoder.input_size, ex.cfg.reader
        )
        loader = DataLoader(
            TileItems(source, ship_streams=ex.runtime.device.type == "cuda"),
            batch_size=ex.cfg.batch_size,
            num_workers=ex.workers,
            collate_fn=collate_items,
            worker_init_fn=_worker_init if ex.workers else None,
        )
        with Clock() as clock:
            n = sum(len(idx) for _, idx, _ in loader)
    return clock.record(n)


def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def measure(args: argparse.Namespace) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        job, entry = build_job(root, args.tiles)
        cfg = ExtractConfig(
            args.encoder,
            pretrained=False,
            batch_size=args.batch,
            device=args.device,
            precision=args.precision,
            workers=args.workers,
            reader=args.reader,
        )
        ex = Extractor.build(cfg)
        rt = ex.runtime
        from wsikit.grids import read_grid

        grid = read_grid(grid_path(job, "mpp0.50_256px_0ov", "bench"))
        n = len(grid)
        with open_slide(entry.path) as slide:
            tiles = np.stack(
                [read_tile(slide, tuple(c), grid.size_level0, rt.encoder.input_size) for c in grid.coords]
            )
        pixels = torch.from_numpy(tiles)
        batches = []
        for i in range(0, n, args.batch):
            x = rt.encoder.preprocess(pixels[i : i + args.batch].to(rt.device).permute(0, 3, 1, 2))
            batches.append(x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x)
        fwd, e2e = [], []
        for _ in range(args.rounds):  # interleaved, so load changes on a shared machine hit both alike
            fwd.append(forward(ex, batches))
            e2e.append(end_to_end(ex, job, entry, n))
        return {
            "encoder": args.encoder,
            "device": str(rt.device),
            "autocast": rt.describe()["autocast"],
            "batch": args.batch,
            "tiles": n,
            "workers": ex.workers,
            "torch_threads": torch.get_num_threads(),
            "allotted_cpus": allotted_cpus(),
            "forward": fwd,
            "end_to_end": e2e,
            "reading": reading(entry, job, ex),
            "ratio_wall": _median(e2e, "tiles_s") / _median(fwd, "tiles_s"),
            "ratio_cpu": _median(fwd, "cpu_ms_tile") / _median(e2e, "cpu_ms_tile"),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _child(args: argparse.Namespace, env: dict[str, str], precision: str) -> dict:
    cmd = [sys.executable, __file__, "--json", "--encoder", args.encoder, "--batch", str(args.batch)]
    cmd += ["--tiles", str(args.tiles), "--device", args.device, "--precision", precision, "--rounds", "1"]
    cmd += ["--reader", args.reader]
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", default="resnet50-trunc")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tiles", type=int, default=192)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--reader", default="auto", help="auto | native | openslide | tiffslide")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare", action="store_true", help="fp32 vs bf16, malloc variants (subprocesses)")
    parser.add_argument("--json", action="store_true", help="print one JSON line (used by --compare)")
    args = parser.parse_args()
    result = measure(args)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{result['encoder']} on {result['device']} ({result['autocast']}, channels-last), batch {result['batch']}, "
        f"{result['tiles']} tiles of 256 px → 224, {result['workers']} reader process(es), "
        f"reader {args.reader}, "
        f"{result['torch_threads']} torch threads, {result['allotted_cpus']} allotted CPUs "
        f"(default readers for this device: {default_workers(resolve_device(args.device))}); random weights"
    )
    rows = [
        ("pure forward (pre-loaded tensors)", result["forward"]),
        ("end to end (slide → bag)", result["end_to_end"]),
    ]
    for label, runs in rows:
        rates = ", ".join(f"{r['tiles_s']:.1f}" for r in runs)
        cpu = ", ".join(f"{r['cpu_ms_tile']:.0f}" for r in runs)
        sys_ = ", ".join(f"{r['sys_ms_tile']:.1f}" for r in runs)
        print(f"  {label:<34} {rates} tiles/s | CPU {cpu} ms/tile (kernel {sys_})")
    r = result["reading"]
    print(
        f"  {'reading only (DataLoader, no model)':<34} {r['tiles_s']:.1f} tiles/s | CPU {r['cpu_ms_tile']:.1f} ms/tile"
    )
    for e in result["end_to_end"]:
        print(
            f"  end-to-end split (s): run {e['s_run']:.2f} = waiting for tiles {e['s_read_wait']:.2f} + model "
            f"{e['s_model']:.2f} + writing {e['s_write']:.3f} + setup/status {e['s_run'] - e['s_total']:.2f}"
        )
    print(
        f"  ratio end-to-end / forward: {result['ratio_wall']:.3f} (wall-clock tiles/s, medians), "
        f"{result['ratio_cpu']:.3f} (CPU time per tile, medians)"
    )
    if not args.compare:
        return
    print("variants, one fresh process each (1 round):")
    variants = [
        ("fp32, glibc malloc, no mallopt", {"WSIKIT_TUNE_MALLOC": "0"}, "fp32"),
        ("fp32, glibc + wsikit mallopt", {}, "fp32"),
        ("bf16, glibc malloc, no mallopt", {"WSIKIT_TUNE_MALLOC": "0"}, "bf16"),
        ("bf16, glibc + wsikit mallopt", {}, "bf16"),
    ]
    if TCMALLOC.exists():
        variants.append(
            ("bf16, tcmalloc (LD_PRELOAD)", {"LD_PRELOAD": str(TCMALLOC), "WSIKIT_TUNE_MALLOC": "0"}, "bf16")
        )
    for label, env, precision in variants:
        r = _child(args, env, precision)
        f, e = r["forward"][0], r["end_to_end"][0]
        print(
            f"  {label:<32} forward {f['tiles_s']:5.1f} tiles/s, CPU {f['cpu_ms_tile']:4.0f} ms/tile "
            f"(kernel {f['sys_ms_tile']:5.1f}) | end to end {e['tiles_s']:5.1f} tiles/s, "
            f"CPU {e['cpu_ms_tile']:4.0f} ms/tile (kernel {e['sys_ms_tile']:5.1f})"
        )


if __name__ == "__main__":
    main()
