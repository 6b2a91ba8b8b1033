"""Benchmark tile reading: OpenSlide vs tiffslide vs the native reader (wsikit.native), side by side.

Builds (cached in a temp folder) a JPEG pyramidal SVS from the real CMU-1 tissue mirrored to
``--width``×``--height`` (256-px tiles, q90), then on the same aligned level-0 tiles measures, in one run:

- tiles/s reading full tiles through ``read_tile`` with OpenSlide, tiffslide and native (1 process),
  and OpenSlide vs native in 2 processes; their ratios; the max pixel difference native vs OpenSlide;
- the same on the bundled CMU-1-Small-Region.svs (RGB-encoded Aperio JPEG, 240-px tiles);
- CPU JPEG decoders on the file's tile streams (imagecodecs, simplejpeg, cv2, PIL, torchvision);
- end to end: the real extraction stage (``wsikit.stages.extract``) after ``tile --align-native``, resnet18
  (random weights; speed does not depend on them), bf16 autocast when the CPU has it, per reader;
- with ``--gpu`` and CUDA: nvJPEG batched decode rate and its difference to the CPU decode, and
  ResNet-50-trunc pure forward vs end to end with 4 workers shipping bytes (GPU decode), decoding
  on the CPU, or reading with OpenSlide.

    .venv/bin/python benchmarks/bench_read.py [--tiles 600 --seconds 2 --extract-tiles 256 --gpu]
    python benchmarks/bench_read.py --gpu-only --width 24576 --height 16384 --tiles 6144   # GPU box

The machine is shared: absolute rates are noisy, ratios measured back to back are the robust numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from wsikit.decode import CPU_DECODERS
from wsikit.native import NativeFile
from wsikit.pyramid import write_pyramid
from wsikit.slide import SAMPLE_SLIDE, open_slide
from wsikit.tiles import TileItems, TileSource, assemble_batch, collate_items, read_tile

HAVE_TIFFSLIDE = importlib.util.find_spec("tiffslide") is not None


def build_slide(path: Path, width: int, height: int) -> Path:
    if path.exists():
        return path
    with open_slide(SAMPLE_SLIDE) as slide:
        src = slide.read_region((0, 0), 0, slide.dimensions)
    reps = (-(-height // src.shape[0]), -(-width // src.shape[1]))
    flip = np.concatenate([src, src[:, ::-1]], axis=1)
    flip = np.concatenate([flip, flip[::-1]], axis=0)
    canvas = np.tile(flip, (-(-reps[0] // 2), -(-reps[1] // 2), 1))[:height, :width]
    return write_pyramid(path, np.ascontiguousarray(canvas), 0.5, tile=256, n_levels=3, layout="svs")


def aligned_coords(dims: tuple[int, int], side: int, n: int) -> np.ndarray:
    xs = np.arange(0, dims[0] - side + 1, side)
    ys = np.arange(0, dims[1] - side + 1, side)
    coords = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.int64)
    return coords[:n]


def _read_range(args: tuple) -> int:
    path, reader, coords, side = args
    with open_slide(path, backend="tiffslide" if reader == "tiffslide" else "openslide") as slide:
        src = TileSource(slide, coords, side, side, reader="native" if reader == "native" else reader)
        for i in range(len(src)):
            src.read(i)
    return len(coords)


def rate(path: Path, reader: str, coords: np.ndarray, side: int, procs: int = 1) -> float:
    """Tiles/s reading ``coords`` (each process opens the slide and reads its share)."""
    parts = [(path, reader, c, side) for c in np.array_split(coords, procs)]
    if procs == 1:
        _read_range((path, reader, coords[:8], side))  # warm the page cache and imports
        t = time.perf_counter()
        _read_range(parts[0])
        return len(coords) / (time.perf_counter() - t)
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_read_range, [(path, reader, coords[:8], side)] * procs))  # start + warm workers
        t = time.perf_counter()
        list(pool.map(_read_range, parts))
        return len(coords) / (time.perf_counter() - t)


def max_diff(path: Path, coords: np.ndarray, side: int) -> int:
    worst = 0
    with open_slide(path, backend="openslide") as slide:
        src = TileSource(slide, coords, side, side, reader="native")
        for i in range(len(coords)):
            ref = read_tile(slide, tuple(coords[i]), side, side)
            worst = max(worst, int(np.abs(src.read(i).astype(int) - ref).max()))
    return worst


def decoder_rates(path: Path, n: int, seconds: float) -> dict[str, float]:
    """Best-of-rounds tiles/s per CPU decoder, rounds interleaved so load changes hit all alike."""
    with open_slide(path) as slide:
        nfile = NativeFile(path, slide.level_dimensions)
    info = nfile.levels[0]
    streams = [nfile.stream(0, i % info.tiles_across, i // info.tiles_across) for i in range(n)]
    usable = {}
    for name, fn in CPU_DECODERS.items():
        try:
            fn(streams[0])
            usable[name] = fn
        except ImportError:
            continue
    best: dict[str, float] = {}
    rounds = 5
    for _ in range(rounds):
        for name, fn in usable.items():
            count, t = 0, time.perf_counter()
            while time.perf_counter() - t < seconds / rounds:
                for s in streams:
                    fn(s)
                count += len(streams)
            best[name] = max(best.get(name, 0.0), count / (time.perf_counter() - t))
    return best


def _loader(
    path: Path,
    reader: str,
    coords: np.ndarray,
    side: int,
    out: int,
    workers: int,
    ship: bool,
    batch: int,
):
    from torch.utils.data import DataLoader

    slide = open_slide(path, backend="tiffslide" if reader == "tiffslide" else "openslide")
    src = TileSource(slide, coords, side, out, reader=reader)
    items = TileItems(src, ship_streams=ship)

    def init(_: int) -> None:
        import torch

        torch.utils.data.get_worker_info().dataset.reopen()  # type: ignore[union-attr]

    return DataLoader(
        items,
        batch_size=batch,
        num_workers=workers,
        collate_fn=collate_items,
        worker_init_fn=init if workers else None,
        prefetch_factor=4 if workers else None,
        pin_memory=False,
    )


def end_to_end(
    encoder,
    runtime,
    path: Path,
    reader: str,
    coords,
    side: int,
    workers: int,
    ship: bool,
    batch: int,
) -> float:
    loader = _loader(path, reader, coords, side, encoder.input_size, workers, ship, batch)
    batches = ((assemble_batch(p, encoder.input_size, runtime.device), i, e) for p, i, e in loader)
    n, t = 0, None
    for k, (pixels, _, _) in enumerate(batches):
        runtime.forward(pixels)
        if k == 0:  # the first batch pays worker start-up and warm-up
            t = time.perf_counter()
        else:
            n += len(pixels)
    if runtime.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    return n / (time.perf_counter() - t) if t and n else float("nan")


def pure_forward(encoder, runtime, batch: int, iters: int) -> float:
    import torch

    x = torch.randint(0, 255, (batch, encoder.input_size, encoder.input_size, 3), dtype=torch.uint8)
    x = x.to(runtime.device)
    runtime.forward(x)
    t = time.perf_counter()
    for _ in range(iters):
        runtime.forward(x)
    return batch * iters / (time.perf_counter() - t)


def make_runtime(name: str, device: str):
    import torch

    from wsikit.encoders.build import get_encoder
    from wsikit.runtime import cpu_has_bf16, tune_malloc
    from wsikit.stages.encode import Runtime, prepare_model

    tune_malloc()
    enc = get_encoder(name, pretrained=False, device=device)
    prepare_model(enc, channels_last=True)
    dev = torch.device(device)
    use_bf16 = dev.type == "cuda" or cpu_has_bf16()
    return enc, Runtime(enc, dev, torch.bfloat16 if use_bf16 else None, True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=12288)
    ap.add_argument("--height", type=int, default=8192)
    ap.add_argument("--tiles", type=int, default=600)
    ap.add_argument("--seconds", type=float, default=2.0, help="per decoder measurement")
    ap.add_argument("--extract-tiles", type=int, default=256, help="tiles per end-to-end run (0: skip)")
    ap.add_argument("--workers", type=int, default=None, help="extraction reader workers (default: wsikit's)")
    ap.add_argument("--gpu", action="store_true", help="also measure nvJPEG decode and GPU extraction")
    ap.add_argument("--gpu-only", action="store_true", help="only the GPU measurements")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsikit-bench-read")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.gpu_only:
        gpu(
            build_slide(args.cache / f"mirror_{args.width}x{args.height}.svs", args.width, args.height),
            aligned_coords((args.width, args.height), 256, args.tiles),
        )
        return
    path = build_slide(args.cache / f"mirror_{args.width}x{args.height}.svs", args.width, args.height)
    print(f"slide: {path} ({args.width}×{args.height}, JPEG q90 YCbCr, 256-px tiles, 3 levels)")
    print(f"cpus: {os.cpu_count()} (shared machine: absolute rates are noisy; ratios are side by side)")
    coords = aligned_coords((args.width, args.height), 256, args.tiles)

    print(f"\n== aligned level-0 tiles, {len(coords)} tiles of 256 px (read_tile, full pixels) ==")
    rates = {
        "openslide (1 proc)": rate(path, "openslide", coords, 256),
        "tiffslide (1 proc)": rate(path, "tiffslide", coords, 256) if HAVE_TIFFSLIDE else float("nan"),
        "native (1 proc)": rate(path, "native", coords, 256),
        "openslide (2 procs)": rate(path, "openslide", coords, 256, 2),
        "native (2 procs)": rate(path, "native", coords, 256, 2),
    }
    base = rates["openslide (1 proc)"]
    for name, r in rates.items():
        print(f"  {name:22s} {r:8.0f} tiles/s   ×{r / base:5.2f} vs OpenSlide 1 proc")
    print(
        f"  native / OpenSlide per process: {rates['native (1 proc)'] / base:.2f}×; "
        f"native 2 procs / 1 proc: {rates['native (2 procs)'] / rates['native (1 proc)']:.2f}×"
    )
    print(f"  max |native − OpenSlide| over these tiles: {max_diff(path, coords, 256)}")

    shifted = coords + np.array([100, 37])  # off the file grid: each tile is cut from 4 file tiles
    shifted = shifted[(shifted[:, 0] + 256 <= args.width) & (shifted[:, 1] + 256 <= args.height)]
    print(f"\n== unaligned level-0 tiles (origin + (100, 37)), {len(shifted)} tiles ==")
    uo, un = rate(path, "openslide", shifted, 256), rate(path, "native", shifted, 256)
    ut = rate(path, "tiffslide", shifted, 256) if HAVE_TIFFSLIDE else float("nan")
    print(f"  openslide {uo:.0f} tiles/s, tiffslide {ut:.0f}, native (crop of 4 decodes) {un:.0f}")
    print(f"  native / OpenSlide: {un / uo:.2f}×; max |native − OpenSlide|: {max_diff(path, shifted, 256)}")

    cmu = Path(SAMPLE_SLIDE)
    ccoords = aligned_coords((2220, 2967), 240, 10_000)
    o, n_ = rate(cmu, "openslide", ccoords, 240), rate(cmu, "native", ccoords, 240)
    print(f"\n== {cmu.name} (RGB-encoded Aperio JPEG, {len(ccoords)} aligned 240-px tiles) ==")
    t_ = rate(cmu, "tiffslide", ccoords, 240) if HAVE_TIFFSLIDE else float("nan")
    print(f"  openslide {o:.0f} tiles/s, tiffslide {t_:.0f}, native {n_:.0f}")
    print(f"  native / OpenSlide: {n_ / o:.2f}×; max |native − OpenSlide|: {max_diff(cmu, ccoords, 240)}")

    print("\n== CPU JPEG decode of the file's 256-px tiles (1 thread) ==")
    import torch

    torch.set_num_threads(1)
    for name, r in sorted(decoder_rates(path, 64, args.seconds).items(), key=lambda kv: -kv[1]):
        print(f"  {name:12s} {r:8.0f} tiles/s")
    torch.set_num_threads(os.cpu_count() or 1)

    if args.extract_tiles:
        extraction(args.cache, args.extract_tiles, args.workers)

    if args.gpu:
        gpu(path, coords)


def extraction(cache: Path, n: int, workers: int | None) -> None:
    """`wsikit tile --align-native` + the real extraction stage (resnet18, bf16 where the CPU has it)
    on a slide of about ``n`` tiles, once per reader; pure forward rate alongside."""
    import shutil

    import torch

    from wsikit.encoders.build import get_encoder
    from wsikit.jobs import SlideEntry
    from wsikit.settings import ExtractConfig, TileConfig
    from wsikit.specs import TileSpec
    from wsikit.stages.extract import Extractor, job_slides
    from wsikit.stages.tile import run_tiling

    cols = 16
    rows = max(1, -(-n // cols))
    path = build_slide(cache / f"mirror_{cols * 256}x{rows * 256}.svs", cols * 256, rows * 256)
    job = cache / "extract-job"
    shutil.rmtree(job, ignore_errors=True)
    run_tiling(
        [SlideEntry(path, "s")], job, TileConfig((TileSpec(0.5, 224),), min_tissue=0.0, align_native=True)
    )
    spec = "mpp0.50_256px_0ov"
    torch.manual_seed(0)
    enc = get_encoder("resnet18", pretrained=False)
    readers = ("openslide", "tiffslide", "native") if HAVE_TIFFSLIDE else ("openslide", "native")
    rates = {}
    for reader in readers:
        cfg = ExtractConfig(
            encoder="resnet18", pretrained=False, device="cpu", batch_size=32, workers=workers, reader=reader
        )
        ex = Extractor.build(cfg, encoder=enc)
        if reader == readers[0]:
            rt = ex.runtime
            print(
                f"\n== extraction stage on CPU: resnet18 {rt.describe()['autocast']}, batch 32, "
                f"{rows * cols} tiles (--align-native), {ex.workers} reader worker(s) =="
            )
            print(f"  pure forward: {pure_forward(enc, rt, 32, 3):.1f} tiles/s")
        st = ex.run(job_slides(job, [spec]), job, [spec], overwrite=True).done[0]
        rates[reader] = st.info["tiles_per_s"][spec]
        secs = st.info["seconds"][spec]
        print(
            f"  reader {reader:10s} {rates[reader]:7.1f} tiles/s   ×{rates[reader] / rates[readers[0]]:4.2f}   {secs}"
        )


def gpu(path: Path, coords: np.ndarray) -> None:
    import torch

    from wsikit.decode import decode_jpeg_batch, gpu_decode_error

    if not torch.cuda.is_available():
        print("\n(no CUDA device: GPU measurements skipped)")
        return
    print(f"\n== GPU: {torch.cuda.get_device_name()} ==")
    with open_slide(path) as slide:
        nfile = NativeFile(path, slide.level_dimensions)
        cmu = open_slide(SAMPLE_SLIDE)
        cfile = NativeFile(SAMPLE_SLIDE, cmu.level_dimensions)
    for label, nf in (("mirror (YCbCr)", nfile), ("CMU-1 (RGB, Adobe marker)", cfile)):
        info = nf.levels[0]
        streams = [nf.stream(0, i % info.tiles_across, i // info.tiles_across) for i in range(64)]
        g = decode_jpeg_batch(streams, "cuda").cpu().numpy()
        c = decode_jpeg_batch(streams, "cpu").numpy()
        d = np.abs(g.astype(int) - c)
        print(
            f"  {label}: nvJPEG vs CPU max |diff| {d.max()}, mean {d.mean():.4f}, error: {gpu_decode_error()}"
        )
    info = nfile.levels[0]
    streams = [nfile.stream(0, i % info.tiles_across, i // info.tiles_across) for i in range(256)]
    for b in (64, 256):
        decode_jpeg_batch(streams[:b], "cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            decode_jpeg_batch(streams[:b], "cuda")
        torch.cuda.synchronize()
        print(f"  nvJPEG batched decode, batch {b}: {10 * b / (time.perf_counter() - t):.0f} tiles/s")
    enc, rt = make_runtime("resnet50-trunc", "cuda")
    pure = pure_forward(enc, rt, 256, 10)
    print(f"  resnet50-trunc pure forward (bf16, batch 256): {pure:.0f} tiles/s")
    many = max(1, min(15, (os.cpu_count() or 2) - 1))
    for workers, reader, ship, label in (
        (4, "native", True, "ship bytes, GPU decode"),
        (4, "native", False, "native, CPU decode"),
        (4, "openslide", False, "OpenSlide read_region"),
        (many, "native", True, "ship bytes, GPU decode"),
        (many, "native", False, "native, CPU decode"),
        (many, "openslide", False, "OpenSlide read_region"),
    ):
        v = end_to_end(enc, rt, path, reader, coords, 256, workers, ship, 256)
        print(
            f"  end to end, {workers:2d} workers, {label:28s} {v:7.0f} tiles/s  ({v / pure:.0%} of pure forward)"
        )


if __name__ == "__main__":
    main()
