"""`wsikit extract` end to end, timed the way a user runs it, against the encoder's pure forward rate.

    .venv/bin/python benchmarks/bench_extract.py single [--encoder resnet18] [--tiles 1000] [--rounds 3]
        [--before 784afb8]
    .venv/bin/python benchmarks/bench_extract.py cohort [--encoder vit_small] [--slides 100]
        [--tiles-per-slide 500] [--rounds 1] [--before 784afb8]

``single``: one slide (the bundled CMU H&E region mirrored into a mosaic, MPP 0.499) with ``--tiles`` tiles
at 0.5 µm/px, 256 px. ``cohort``: ``--slides`` small slides of ``--tiles-per-slide`` tiles each, four
mosaics of the bundled slide (flipped differently) copied to ``--slides`` files.

Each round, interleaved so that load on a shared machine hits all alike:

* pure forward, in this process: the encoder built as the CLI builds it (``Extractor.build``: the same
  threads, autocast, channels-last for CNNs, fused attention) on pre-loaded, pre-normalised batches of
  real tiles, before and after the end-to-end runs (their mean is the reference);
* end to end: ``python -m wsikit.cli.main extract JOB -e ENC --random-weights -b B`` in a fresh process on
  a job without bags, the process layout a user gets; the stage rate is the one the command prints
  (``encoded N tiles in S s``) and start-up (interpreter, imports, model build, job scan, summary) is the
  rest of its wall time; the same command with nothing left to do is timed too, so the stage time is
  also measured from outside (wall − wall with nothing to do) as a check of what the command prints;
* with ``--before REV``: the same command run from the code at git revision REV (``git archive`` into a
  temporary folder put first on PYTHONPATH), the per-slide loop this engine replaces.

Cohort runs also record the peak memory (VmHWM) of the command when its 10th slide is recorded and at the
end. Random weights (seeded): weights do not change the cost. Printed: medians per round, ratios, load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
from wsikit.pyramid import write_pyramid
from wsikit.settings import ExtractConfig
from wsikit.slide import SAMPLE_SLIDE, open_slide
from wsikit.specs import TileSpec
from wsikit.stages.extract import Extractor, stage_name
from wsikit.tiles import read_tile
from wsikit.tiling import tile_slide

SPEC = TileSpec(0.5, 256)
STAGE_LINE = re.compile(r"encoded (\d+) tiles in ([\d.]+) s")


# -- slides and jobs -----------------------------------------------------------------------------------
def mosaic(rows: int, cols: int, flip: int = 0) -> np.ndarray:
    """The bundled slide's 2048×2944 region tiled rows × cols, mirrored so neighbours join seamlessly."""
    with open_slide(SAMPLE_SLIDE) as s:
        rgb = s.read_region((0, 0), 0, (2048, 2944))
    rgb = rgb[::-1] if flip & 1 else rgb
    rgb = rgb[:, ::-1] if flip & 2 else rgb
    row = np.concatenate([rgb if c % 2 == 0 else rgb[:, ::-1] for c in range(cols)], 1)
    return np.ascontiguousarray(np.concatenate([row if r % 2 == 0 else row[::-1] for r in range(rows)], 0))


def add_slide(job: Path, slide: Path, slide_id: str, n_tiles: int, grid=None):
    """Coordinates for ``slide`` (every tile, no mask) cut to ``n_tiles``; returns the grid for reuse."""
    if grid is None:
        with open_slide(slide) as s:
            (grid,) = tile_slide(s, [SPEC])
        if len(grid) < n_tiles:
            raise SystemExit(f"{slide}: only {len(grid)} tiles; ask for fewer")
        grid.coords, grid.tissue_fraction = grid.coords[:n_tiles], grid.tissue_fraction[:n_tiles]
    grid.slide_id = slide_id
    grid.attrs = {**grid.attrs, "slide_path": str(slide), "slide_id": slide_id}
    write_grid(grid_path(job, SPEC, slide_id), grid)
    return grid


def build_single(root: Path, n_tiles: int) -> Path:
    side = int(np.ceil(np.sqrt(n_tiles))) * 257
    rows, cols = -(-side // 2944), -(-side // 2048)
    slide = write_pyramid(root / "big.svs", mosaic(rows, cols), 0.499)
    add_slide(root / "job", slide, "big", n_tiles)
    return root / "job"


def build_cohort(root: Path, n_slides: int, per_slide: int) -> Path:
    rows = -(-int(np.ceil(per_slide / 15)) * 257 // 2944)
    grids, job = [], root / "job"
    for v in range(4):
        path = write_pyramid(root / f"variant{v}.svs", mosaic(rows, 2, flip=v)[:, :4096], 0.499)
        grids.append((path, None))
    for i in range(n_slides):
        src, grid = grids[i % 4]
        copy = Path(shutil.copy(src, root / f"s{i:03d}.svs"))
        grids[i % 4] = (src, add_slide(job, copy, f"s{i:03d}", per_slide, grid))
    return job


# -- measurements --------------------------------------------------------------------------------------
def cpu_seconds(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def forward(ex: Extractor, batches: list[torch.Tensor], seconds: float) -> dict[str, float]:
    """Pure forward rate: the model on pre-normalised batches, repeated for ``seconds``."""
    rt = ex.runtime
    with torch.inference_mode(), rt.autocast_context():
        rt.encoder.model(batches[0])
        t0, c0, n = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF), 0
        while time.perf_counter() - t0 < seconds:
            for x in batches:
                rt.encoder.model(x).float().cpu()
                n += len(x)
        rt.synchronize()
        wall = time.perf_counter() - t0
    return {"tiles_s": n / wall, "cpu_ms_tile": 1000 * (cpu_seconds(resource.RUSAGE_SELF) - c0) / n}


def real_batches(ex: Extractor, job: Path, slide_id: str, batch: int, n: int = 4) -> list[torch.Tensor]:
    from wsikit.grids import read_grid

    grid, rt = read_grid(grid_path(job, SPEC, slide_id)), ex.runtime
    size = rt.encoder.read_size
    with open_slide(grid.attrs["slide_path"]) as slide:
        tiles = [read_tile(slide, tuple(c), grid.size_level0, size) for c in grid.coords[: batch * n]]
    tiles = [tiles[i % len(tiles)] for i in range(batch * n)]  # a small slide's tiles, repeated
    out = []
    for i in range(0, len(tiles) - batch + 1, batch):
        x = torch.from_numpy(np.stack(tiles[i : i + batch])).to(rt.device).permute(0, 3, 1, 2)
        x = rt.encoder.preprocess(x)
        out.append(x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x)
    return out


def cli(job: Path, args: argparse.Namespace, env: dict[str, str], fresh: bool) -> dict[str, float]:
    """One `wsikit extract` process (on a job cleared of bags first when ``fresh``): wall, CPU, what it
    printed, and (cohort) its peak memory after 10 slides and at the end."""
    if fresh:
        for sub in ("bags", "status", "locks"):
            shutil.rmtree(job / sub, ignore_errors=True)
    cmd = [sys.executable, "-m", "wsikit.cli.main", "extract", str(job), "-e", args.encoder, "--random-weights",
           *(["-b", str(args.batch)] if args.batch else []), *(["-j", str(args.workers)] if args.workers is not None else []),
           *args.cli_args.split()]  # fmt: skip
    status_dir = job / "status" / stage_name(args.encoder)
    log = job.parent / "extract.log"
    c0, t0 = cpu_seconds(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(log, "w") as fh:
        # run outside the checkout: `python -m` puts the working folder first on sys.path
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=fh, cwd=job.parent)
        peaks = {}
        while proc.poll() is None:
            hwm = _vm_hwm(proc.pid)
            done = len(list(status_dir.glob("*.json"))) if status_dir.is_dir() else 0
            if hwm is not None:
                peaks["end"] = hwm
                for k in (10, 50, 99):
                    if done >= k and str(k) not in peaks:
                        peaks[str(k)] = hwm
            time.sleep(0.1)
    err = log.read_text()
    wall, cpu = time.perf_counter() - t0, cpu_seconds(resource.RUSAGE_CHILDREN) - c0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    found = STAGE_LINE.search(" ".join(err.split()))
    row = {"wall": wall, "cpu": cpu, **{f"peak_mb_{k}": v / 1024 for k, v in peaks.items()}}
    if found:
        row.update(tiles=int(found.group(1)), printed_s=float(found.group(2)))
    return row


def _vm_hwm(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmHWM:\s+(\d+) kB", text)
    return float(found.group(1)) if found else None


def export_revision(rev: str, dest: Path) -> dict[str, str]:
    """The package at git revision ``rev`` under ``dest`` (wsikit/ with its cli/), as an environment."""
    archive = subprocess.run(
        ["git", "archive", rev, "wsikit", "cli"], capture_output=True, check=True
    )  # this checkout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    shutil.move(str(dest / "cli"), str(dest / "wsikit" / "cli"))
    return {**os.environ, "PYTHONPATH": str(dest), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def run_rounds(args: argparse.Namespace, job: Path, n_tiles: int, envs: dict[str, dict[str, str]]) -> dict:
    """Rounds of: forward, then per code its end-to-end run, forward again, its nothing-to-do run; each
    run is compared with the mean of the two forward measurements around it."""
    cfg = ExtractConfig(args.encoder, pretrained=False, batch_size=args.batch, workers=args.workers)
    ex = Extractor.build(cfg)
    args.batch = args.batch or ex.batch_size  # the forward's batch: the CLI's automatic one
    first = sorted(p.stem for p in (job / "tiles" / SPEC.name).glob("*.h5"))[0]
    batches = real_batches(ex, job, first, args.batch)
    rounds = []
    for _ in range(args.rounds):
        row = {"load": os.getloadavg()[0], "forward": [forward(ex, batches, args.forward_seconds)]}
        for name, env in envs.items():
            run = cli(job, args, env, fresh=True)
            row["forward"].append(forward(ex, batches, args.forward_seconds))
            run["forward"] = statistics.mean(f["tiles_s"] for f in row["forward"][-2:])
            run["idle"] = cli(job, args, env, fresh=False)
            run["tiles_s"] = n_tiles / (run["wall"] - run["idle"]["wall"])
            row[name] = run
        row["load_after"] = os.getloadavg()[0]
        rounds.append(row)
        print(json.dumps(row), flush=True)
    return {"describe": ex.describe(), "tiles": n_tiles, "rounds": rounds}


# -- report --------------------------------------------------------------------------------------------
def summarize(result: dict, names: list[str]) -> list[str]:
    """Medians over rounds of each run's rates and of their ratios to the forward measured around it."""
    rounds, n = result["rounds"], result["tiles"]
    med = statistics.median
    fwd = med(f["tiles_s"] for r in rounds for f in r["forward"])
    fwd_cpu = med(f["cpu_ms_tile"] for r in rounds for f in r["forward"])
    lines = [
        f"{result['describe']}; {n} tiles, {len(rounds)} round(s), load (1-min) "
        f"{min(r['load'] for r in rounds):.1f}–{max(r['load_after'] for r in rounds):.1f} on {os.cpu_count()} CPUs",
        f"  pure forward (this process)        {fwd:8.1f} tiles/s   1.000   CPU {fwd_cpu:5.1f} ms/tile",
    ]
    for name in names:
        runs = [r[name] for r in rounds]
        rates = {"stage": [x["tiles_s"] for x in runs], "whole": [n / x["wall"] for x in runs]}
        if all("printed_s" in x for x in runs):
            rates["printed"] = [x["tiles"] / x["printed_s"] for x in runs]
        ratio = {k: med(v / x["forward"] for v, x in zip(vs, runs, strict=True)) for k, vs in rates.items()}
        cpu = med(1000 * (x["cpu"] - x["idle"]["cpu"]) / n for x in runs)
        lines.append(f"  {name}: end to end (stage)    {med(rates['stage']):8.1f} tiles/s   {ratio['stage']:.3f}"
                     f"   CPU {cpu:5.1f} ms/tile   (wall − wall with nothing to do)")  # fmt: skip
        if "printed" in rates:
            agree = med(p / s for p, s in zip(rates["printed"], rates["stage"], strict=True))
            lines.append(f"  {name}: stage as printed      {med(rates['printed']):8.1f} tiles/s   "
                         f"{ratio['printed']:.3f}   (the command's own line; ÷ the outside measure: {agree:.3f})")  # fmt: skip
        startup = med(x["wall"] - x.get("printed_s", x["wall"] - x["idle"]["wall"]) for x in runs)
        lines.append(f"  {name}: whole command         {med(rates['whole']):8.1f} tiles/s   {ratio['whole']:.3f}"
                     f"   start-up {startup:.1f} s, nothing-to-do run {med(x['idle']['wall'] for x in runs):.1f} s")  # fmt: skip
        peaks = {k: med(x.get(f"peak_mb_{k}", 0) for x in runs) for k in ("10", "50", "99", "end")}
        if peaks["10"]:
            lines.append(f"  {name}: peak memory (VmHWM) after 10 / 50 / 99 slides / at exit: "
                         + " / ".join(f"{v:.0f}" for v in peaks.values()) + " MB")  # fmt: skip
    if len(names) == 2:
        a, b = ([r[k]["tiles_s"] for r in rounds] for k in names)
        lines.append(
            f"  {names[0]} / {names[1]} (stage, per round): "
            + ", ".join(f"{x / y:.2f}" for x, y in zip(a, b, strict=True))
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=("single", "cohort"))
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument(
        "--batch", type=int, default=None, help="default: the CLI's (64 on a CPU, measured on a GPU)"
    )
    parser.add_argument("--workers", type=int, default=None, help="reading workers (default: wsikit's)")
    parser.add_argument("--tiles", type=int, default=1000, help="single: tiles of the slide")
    parser.add_argument("--slides", type=int, default=100, help="cohort: slides")
    parser.add_argument("--tiles-per-slide", type=int, default=500, help="cohort: tiles per slide")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--forward-seconds", type=float, default=20.0, help="each pure forward measurement")
    parser.add_argument("--before", default=None, help="git revision to compare with (e.g. 784afb8)")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="build the slides here and keep them (reused)"
    )
    parser.add_argument(
        "--cli-args", default="", help="more options for `wsikit extract`, e.g. '--decode gpu'"
    )
    args = parser.parse_args()
    name = f"single_{args.tiles}" if args.mode == "single" else f"cohort_{args.slides}x{args.tiles_per_slide}"
    root = args.workdir / name if args.workdir else Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        n = args.tiles if args.mode == "single" else args.slides * args.tiles_per_slide
        if (root / "job").is_dir():
            job = root / "job"
        elif args.mode == "single":
            root.mkdir(parents=True, exist_ok=True)
            job = build_single(root, args.tiles)
        else:
            root.mkdir(parents=True, exist_ok=True)
            job = build_cohort(root, args.slides, args.tiles_per_slide)
        envs = {"after": {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}}
        if args.before:
            envs["before"] = export_revision(args.before, root / "before")
        print(
            f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True
        )
        result = run_rounds(args, job, n, envs)
        print("\n".join(summarize(result, list(envs))))
        if args.json:
            args.json.write_text(
                json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **result}, indent=1)
            )
    finally:
        shutil.rmtree(root / "before", ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
