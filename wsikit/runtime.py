"""Where and how model work runs: the device, the autocast precision, torch threads, the CPUs this job was
allotted, glibc malloc tuning, and checkpoint files.

torch is imported by the functions that need it, not at module import, so the torch-free stages (masks,
tiling, job status) can ask for their CPU allotment without loading it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsikit.io import atomic_path, first_line

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


class DeviceError(RuntimeError):
    """A device or precision that cannot be used here, or an unreadable checkpoint; says what to use."""


def allotted_cpus() -> int:
    """CPUs this process may use: the least of affinity, ``SLURM_CPUS_PER_TASK`` and the cgroup quota."""
    counts = [len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)]
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit():
        counts.append(int(slurm))
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            counts.append(max(1, int(int(quota) / int(period))))
    return max(1, min(counts))


def set_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads to ``threads`` (default: the allotted CPUs, unless ``OMP_NUM_THREADS`` is
    set and ``threads`` is None); returns the number in use."""
    import torch

    if threads is not None or "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, threads or allotted_cpus()))
    return torch.get_num_threads()


def default_workers(device: torch.device, cpus: int | None = None) -> int:
    """Tile-reading processes: on a GPU all allotted CPUs but one (≤ 16). On a CPU the model already uses
    every allotted core and reading costs 2–3 ms of CPU per tile (5–10% of a bf16 ResNet-50 forward);
    a reader process then only competes with the model's threads, which all wait for the slowest one,
    so small CPU jobs (≤ 8 CPUs) read in the main process and larger ones use one reader per 8 CPUs."""
    cpus = cpus or allotted_cpus()
    if device.type == "cuda":
        return max(1, min(16, cpus - 1))
    return 0 if cpus <= 8 else cpus // 8


def tune_malloc() -> bool:
    """Stop glibc returning large blocks to the kernel after every batch (the page-fault cost of big
    activations); returns whether it applied. Off with ``WSIKIT_TUNE_MALLOC=0``; a no-op off glibc."""
    if os.environ.get("WSIKIT_TUNE_MALLOC", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        return False
    return bool(ok)


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (a CUDA GPU when one is visible, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"--device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: no CUDA GPU is visible; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible (cuda:0…); pick one of those"
            )
    return dev


def resolve_devices(devices: str | None, device: str = "auto") -> list[str]:
    """The devices of a run, one extraction engine each: ``devices`` (``"0,1,2,3"`` or ``"cuda:0,cuda:1"``
    for GPUs, ``"all"`` for every visible GPU, ``"cpu,cpu"`` for CPU engines) or, when None, ``device``."""
    import torch

    if not devices:
        return [str(resolve_device(device))]
    if devices.strip() == "all":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not n:
            raise DeviceError(
                "--devices all: no CUDA GPU is visible; use --device cpu (or check CUDA_VISIBLE_DEVICES)"
            )
        return [f"cuda:{i}" for i in range(n)]
    names = [d.strip() for d in devices.split(",") if d.strip()]
    out = [str(resolve_device(f"cuda:{d}" if d.isdigit() else d)) for d in names]
    gpus = [d for d in out if d != "cpu"]
    if len(set(gpus)) != len(gpus) or "cuda" in gpus:
        raise DeviceError(f"--devices {devices}: name each GPU once by number (e.g. 0,1,2,3) or use all")
    return out


def split_cpus(n_engines: int, cpus: int | None = None) -> list[int]:
    """The allotted CPUs shared between ``n_engines`` engines (each gets at least one)."""
    cpus = cpus or allotted_cpus()
    base, extra = divmod(cpus, n_engines)
    return [max(1, base + (i < extra)) for i in range(n_engines)]


#: Largest automatic GPU batch: GPU throughput is flat beyond it, while pinned host memory and the
#: pipeline's latency keep growing.
MAX_AUTO_BATCH = 512


def batch_for_memory(per_tile: float, fixed: float, free: float, fraction: float = 0.6) -> int:
    """The automatic GPU batch size: the largest power of two whose measured memory (``fixed`` bytes plus
    ``per_tile`` bytes a tile, from two probe forwards) fits in ``fraction`` of the ``free`` device memory,
    between 1 and :data:`MAX_AUTO_BATCH`."""
    room = fraction * free - max(0.0, fixed)
    n = int(room // per_tile) if per_tile > 0 else MAX_AUTO_BATCH
    size = 1
    while size * 2 <= min(n, MAX_AUTO_BATCH):
        size *= 2
    return size


def is_oom(exc: BaseException) -> bool:
    """Whether an exception is the device (or the host allocator) running out of memory."""
    text = str(exc).lower()
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
    )


def resolve_precision(precision: str, device: torch.device, preferred: str = "fp16") -> torch.dtype | None:
    """Autocast dtype for ``precision`` (auto | fp32 | bf16 | fp16) on ``device``; None means fp32.

    ``auto`` is the model's ``preferred`` precision on a GPU, bf16 on CPUs that run it natively, else fp32.
    """
    import torch

    if precision not in PRECISIONS:
        raise DeviceError(f"--precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = preferred if device.type == "cuda" else "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise DeviceError("--precision fp16 is for GPUs; use bf16 or fp32 on a CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def save_checkpoint(path: str | os.PathLike, obj: dict[str, Any]) -> Path:
    """``torch.save`` of ``obj`` to ``path``, atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def read_checkpoint(
    path: str | os.PathLike,
    error: type[Exception] = DeviceError,
    fix: str = "",
    device: Any = "cpu",
    weights_only: bool = False,
) -> dict[str, Any]:
    """A checkpoint dict written by :func:`save_checkpoint` (weights included: nothing is downloaded);
    an unreadable file raises ``error`` naming it and ``fix``."""
    import torch

    try:
        ckpt = torch.load(path, map_location=device, weights_only=weights_only)
    except Exception as exc:  # torch.load raises many types (pickle, zip, OS errors)
        raise error(f"{path}: not a readable wsikit checkpoint ({first_line(exc)}); {fix}") from exc
    if not isinstance(ckpt, dict):
        raise error(f"{path}: not a wsikit checkpoint (it holds a {type(ckpt).__name__}); {fix}")
    return ckpt


def read_config_checkpoint(
    path: str | os.PathLike, config: type, error: type[Exception], fix: str, device: Any = "cpu"
) -> tuple[dict[str, Any], Any]:
    """A ``{"config": …, "state_dict": …}`` checkpoint and its ``config`` dataclass; a file that is not one
    raises ``error`` naming it and ``fix``."""
    ckpt = read_checkpoint(path, error, fix, device)
    try:
        return ckpt, config(**ckpt["config"])
    except (KeyError, TypeError) as exc:
        raise error(f"{path}: not a wsikit {config.__name__} checkpoint ({first_line(exc)}); {fix}") from exc
