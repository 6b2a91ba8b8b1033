"""Tissue-mask quality and speed: ``otsu`` (the old default) and ``od`` (the new) side by side.

On the labelled evaluation set of ``tests/mask_eval.py`` (real tissue and glass at known places; IHC,
faint, greyscale and marker ink made from them — how, in that module and ``docs/tissue.md``), prints
per class the IoU against the reference tissue (mean and worst scene), the share of ink lying over
tissue that is excluded, and the time per 2,048-px picture (median of repeats, one OpenCV thread;
at the scenes' 2 µm/px and with the same pixels taken as 8 µm/px, the default working resolution).
Then the ``otsu`` code path against histolab's Otsu reference mask.

    .venv/bin/python benchmarks/bench_mask.py [--seeds 0 1 2] [--size 1536x2048] [--repeats 5]

Needs ``../shared/data`` (or ``WSIKIT_SHARED_DATA``). Timings on a shared machine are noisy: both
methods run back to back on the same pictures, and the ratio is the robust number.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the evaluation set's module
from mask_eval import cases

from wsikit.tissue import MASK_METHODS, MaskParams, iou, otsu_mask

DATA = Path(os.environ.get("WSIKIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
METHODS = {"otsu": MaskParams(method="otsu"), "od": MaskParams()}


def timed(rgb: np.ndarray, mpp: float, params: MaskParams, repeats: int) -> tuple[object, float, float]:
    """The method's result and its median wall and CPU time over ``repeats`` runs."""
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        result = MASK_METHODS[params.method](rgb, mpp, params)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return result, statistics.median(wall), statistics.median(cpu)


def evaluate(seeds: tuple[int, ...], shape: tuple[int, int], repeats: int) -> dict[str, dict[str, list]]:
    """Per class and method: IoUs, ink-over-tissue excluded shares and times (at 2 and at 8 µm/px)."""
    rows: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(DATA, Path(tmp), shape, seeds):
            for name, params in METHODS.items():
                result, seconds, _ = timed(case.rgb, case.mpp, params, repeats)
                row = rows[case.kind]
                row[f"{name} iou"].append(iou(result.mask, case.tissue))
                row[f"{name} s"].append(seconds)
                _, seconds8, cpu8 = timed(case.rgb, 8.0, params, repeats)
                row[f"{name} s@8"].append(seconds8)
                row[f"{name} cpu@8"].append(cpu8)
                if case.covered.any():
                    row[f"{name} excl"].append(1 - float(result.mask[case.covered].mean()))
    return rows


def print_table(rows: dict[str, dict[str, list]], shape: tuple[int, int]) -> None:
    print(
        f"\n{shape[0]}×{shape[1]} px scenes at 2 µm/px, {len(next(iter(rows.values()))['od iou'])} per class\n"
    )
    print("| class | IoU otsu (mean / worst) | IoU od (mean / worst) | ink over tissue excluded otsu / od |"
          " s per picture otsu / od (2 µm/px) | s otsu / od (as 8 µm/px) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for kind, row in rows.items():
        cells = [f"{np.mean(row[f'{m} iou']):.3f} / {min(row[f'{m} iou']):.3f}" for m in METHODS]
        excl = (
            " / ".join(f"{100 * np.mean(row[f'{m} excl']):.0f} %" for m in METHODS) if row["od excl"] else "–"
        )
        secs = " / ".join(f"{statistics.median(row[f'{m} s']):.3f}" for m in METHODS)
        secs8 = " / ".join(f"{statistics.median(row[f'{m} s@8']):.3f}" for m in METHODS)
        print(f"| {kind} | {cells[0]} | {cells[1]} | {excl} | {secs} | {secs8} |")
    every = {
        k: {m: [s for row in rows.values() for s in row[f"{m} {k}"]] for m in METHODS}
        for k in ("s", "s@8", "cpu@8")
    }
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in every.items()}
    worst = {m: max(every["cpu@8"][m]) for m in METHODS}
    print(f"\nmedian wall s per picture, all classes: otsu {med['s']['otsu']:.3f}, od {med['s']['od']:.3f} at 2 µm/px; "
          f"as 8 µm/px otsu {med['s@8']['otsu']:.3f}, od {med['s@8']['od']:.3f} (CPU s: otsu {med['cpu@8']['otsu']:.3f}, "
          f"od {med['cpu@8']['od']:.3f}; slowest picture, CPU: otsu {worst['otsu']:.3f}, od {worst['od']:.3f}); "
          f"od / otsu = {med['s']['od'] / med['s']['otsu']:.2f}")  # fmt: skip


def histolab_reference() -> None:
    """The ``otsu`` code path (grey level, no morphology) against histolab's expected Otsu mask."""
    from PIL import Image

    rgb = np.asarray(Image.open(DATA / "thumbnails/diagnostic-slide-thumb-rgb.png").convert("RGB"))
    expected = np.load(DATA / "thumbnails/diagnostic-slide-thumb-otsu-threshold-mask.npy")
    raw = MaskParams(method="otsu", channel="darkness", blur_um=0, close_um=0, open_um=0, max_hole_um2=0,
                     min_object_um2=0, exclude_pen=False, exclude_black=False, exclude_white=False)  # fmt: skip
    mask, threshold = otsu_mask(rgb, 8.0, raw)
    print(f"\nhistolab's Otsu reference (diagnostic-slide-thumb): otsu code path IoU {iou(mask, ~expected):.4f} "
          f"(threshold {threshold:g}); its dark class is ink plus dense tissue, so it is no tissue reference")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", default="1536x2048", help="scene height×width in px (2 µm/px)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: no shared data; set WSIKIT_SHARED_DATA")
    cv2.setNumThreads(1)
    shape = tuple(int(v) for v in args.size.lower().split("x"))
    print_table(evaluate(tuple(args.seeds), shape, args.repeats), shape)  # type: ignore[arg-type]
    histolab_reference()


if __name__ == "__main__":
    main()
