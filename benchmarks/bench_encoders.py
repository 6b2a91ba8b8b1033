"""Tile encoders on this CPU: tiles/s and forward-pass peak memory of ViT-S/B/L/H, timm's fused attention
(``F.scaled_dot_product_attention``) against the eager path (explicit softmax(QKᵀ)V).

One subprocess per model (so peak memory is the model's own): the model is built once with random
weights, both paths are warmed up, then run alternately (``reps`` timed batches each) so
that load on a shared machine hits both alike. Memory: the resident-set peak during the forward
passes above the resident set after building (Linux ``/proc/self/clear_refs`` resets the peak).
Prints a table and the 1-minute load average before and after; ``--quick`` runs ViT-S/B only.

    python benchmarks/bench_encoders.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODELS = (  # (label, timm name, batch, timed batches)
    ("ViT-S/16", "vit_small_patch16_224", 8, 3),
    ("ViT-B/16", "vit_base_patch16_224", 8, 2),
    ("ViT-L/16", "vit_large_patch16_224", 4, 2),
    ("ViT-H/14", "vit_huge_patch14_224", 2, 1),
)


def _kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def child(name: str, batch: int, reps: int, threads: int) -> dict:
    """Time one model with both attention paths; runs in its own process."""
    import timm
    import torch

    torch.set_num_threads(threads)
    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    x = torch.randn(batch, 3, 224, 224)
    seconds = {"fused": 0.0, "eager": 0.0}
    peak = {}

    def use(mode: str) -> None:
        for m in attention:
            m.fused_attn = mode == "fused"

    with torch.inference_mode():
        for mode in ("fused", "eager"):  # warm-up: one-time allocations and kernel caches
            use(mode)
            model(x)
        for mode in ("fused", "eager"):  # the forward pass's own peak, one mode at a time
            use(mode)
            base = _kib("VmRSS")
            _reset_peak()
            model(x)
            peak[mode] = round((_kib("VmHWM") - base) / 1024, 1)
        for _ in range(reps):
            for mode in ("fused", "eager"):
                use(mode)
                start = time.perf_counter()
                model(x)
                seconds[mode] += time.perf_counter() - start
    tiles = batch * reps
    return {
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "fused_tiles_s": round(tiles / seconds["fused"], 2),
        "eager_tiles_s": round(tiles / seconds["eager"], 2),
        "fused_peak_mib": peak["fused"],
        "eager_peak_mib": peak["eager"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="ViT-S and ViT-B only")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, batch, reps = args.child
        print(json.dumps(child(name, int(batch), int(reps), args.threads)))
        return
    load_before = os.getloadavg()[0]
    print(f"{len(os.sched_getaffinity(0))} CPUs, {args.threads} torch threads, fp32, 224 px, random weights")
    header = f"{'model':9} {'params M':>8} {'batch':>5} {'fused t/s':>10} {'eager t/s':>10} {'fused/eager':>11} {'fused MiB':>10} {'eager MiB':>10}"
    print(header)
    for label, name, batch, reps in MODELS[:2] if args.quick else MODELS:
        cmd = [
            sys.executable,
            __file__,
            "--threads",
            str(args.threads),
            "--child",
            name,
            str(batch),
            str(reps),
        ]
        r = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        )
        ratio = r["fused_tiles_s"] / r["eager_tiles_s"]
        print(
            f"{label:9} {r['params_m']:8.1f} {batch:5d} {r['fused_tiles_s']:10.2f} {r['eager_tiles_s']:10.2f} "
            f"{ratio:11.2f} {r['fused_peak_mib']:10.1f} {r['eager_peak_mib']:10.1f}",
            flush=True,
        )
    print(f"1-min load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
