"""Tile encoders on this CPU: tiles/s and forward-pass peak memory of ViT-S/B/L/H, timm's fused attention
(``F.scaled_dot_product_attention``) against the eager path (explicit softmax(QKᵀ)V).

Speed: one subprocess per model builds it once with random weights, warms both paths up, then runs
them alternately (``reps`` timed batches each) so that load on a shared machine hits both alike.
Memory: a fresh subprocess per model and path measures its first forward pass's resident-set peak
above the resident set of the built model (Linux ``/proc/self/clear_refs`` resets the peak), so the
allocator's reuse of earlier batches does not hide it.
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


def _build(name: str, threads: int):
    import timm
    import torch

    torch.set_num_threads(threads)
    model = timm.create_model(name, pretrained=False, num_classes=0).eval()
    return model, [m for m in model.modules() if hasattr(m, "fused_attn")]


def peak(name: str, batch: int, mode: str, threads: int) -> dict:
    """The first forward pass's resident-set peak above the built model, in a fresh process."""
    import torch

    model, attention = _build(name, threads)
    for m in attention:
        m.fused_attn = mode == "fused"
    x = torch.randn(batch, 3, 224, 224)
    base = _kib("VmRSS")
    _reset_peak()
    with torch.inference_mode():
        model(x)
    return {"peak_mib": round((_kib("VmHWM") - base) / 1024, 1)}


def speed(name: str, batch: int, reps: int, threads: int) -> dict:
    """Both attention paths, warmed up, then alternated batch by batch."""
    import torch

    model, attention = _build(name, threads)
    x = torch.randn(batch, 3, 224, 224)
    seconds = {"fused": 0.0, "eager": 0.0}
    with torch.inference_mode():
        for rep in range(reps + 1):
            for mode in ("fused", "eager") if rep % 2 else ("eager", "fused"):
                for m in attention:
                    m.fused_attn = mode == "fused"
                start = time.perf_counter()
                model(x)
                if rep:  # the first round is the warm-up
                    seconds[mode] += time.perf_counter() - start
    return {
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "fused": round(batch * reps / seconds["fused"], 2),
        "eager": round(batch * reps / seconds["eager"], 2),
    }


def _run(args: list[str], threads: int) -> dict:
    cmd = [sys.executable, __file__, "--threads", str(threads), "--child", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="ViT-S and ViT-B only")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, name, batch, extra = args.child
        result = (
            speed(name, int(batch), int(extra), args.threads)
            if what == "speed"
            else peak(name, int(batch), extra, args.threads)
        )
        print(json.dumps(result))
        return
    load_before = os.getloadavg()[0]
    print(f"{len(os.sched_getaffinity(0))} CPUs, {args.threads} torch threads, fp32, 224 px, random weights")
    header = f"{'model':9} {'params M':>8} {'batch':>5} {'fused t/s':>10} {'eager t/s':>10} {'fused/eager':>11} {'fused MiB':>10} {'eager MiB':>10}"
    print(header)
    for label, name, batch, reps in MODELS[:2] if args.quick else MODELS:
        r = _run(["speed", name, str(batch), str(reps)], args.threads)
        mib = {
            mode: _run(["peak", name, str(batch), mode], args.threads)["peak_mib"]
            for mode in ("fused", "eager")
        }
        print(
            f"{label:9} {r['params_m']:8.1f} {batch:5d} {r['fused']:10.2f} {r['eager']:10.2f} "
            f"{r['fused'] / r['eager']:11.2f} {mib['fused']:10.1f} {mib['eager']:10.1f}",
            flush=True,
        )
    print(f"1-min load average: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
