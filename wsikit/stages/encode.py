"""The model side of extraction, built once per run: the encoder on its device under autocast, channels-last
for CNNs, fused scaled-dot-product attention for transformers, optional ``torch.compile`` (warmed up once);
the automatic batch size, the out-of-memory back-off, per-slide stain estimates and where JPEG tiles are
decoded (CPU reading workers or the GPU), each chosen by measurement."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wsikit.decode import decode_jpeg_batch, gpu_decode_error, resize_batch
from wsikit.encoders.build import Encoder
from wsikit.grids import TileGrid
from wsikit.runtime import DeviceError, batch_for_memory, is_oom
from wsikit.slide import Slide
from wsikit.tiles import TileSource, read_tile


class ExtractError(RuntimeError):
    """An extraction request that cannot run, or a slide that cannot be extracted; the message says what
    to change."""


#: Batch size on a CPU when none is given (oneDNN's convolutions and GEMMs are saturated well before).
CPU_BATCH = 64
#: A CPU decoding capacity this many times the model's rate counts as keeping up (``--decode auto``).
KEEP_UP = 1.1

#: ``[(rows, normalizer), …]``: consecutive rows of a batch and the stain normalizer (or None) for them.
StainRuns = Sequence[tuple[int, Any]]


def is_transformer(model: torch.nn.Module) -> bool:
    """Whether a model is attention-based (timm attention blocks or ``nn.MultiheadAttention``)."""
    return any(
        hasattr(m, "fused_attn") or isinstance(m, torch.nn.MultiheadAttention) for m in model.modules()
    )


def prepare_model(encoder: Encoder, channels_last: bool = True, compile: bool = False) -> bool:
    """Put the encoder on its fast path in place: fused scaled-dot-product attention in every timm
    attention block, channels-last memory for CNNs (a transformer's patch embedding gains nothing from
    it), and ``torch.compile`` when asked. Returns whether inputs should be channels-last."""
    transformer = is_transformer(encoder.model)
    for module in encoder.model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    channels_last = channels_last and not transformer
    if channels_last:
        encoder.model.to(memory_format=torch.channels_last)
    if compile:
        encoder.model = torch.compile(encoder.model)  # type: ignore[assignment]
    return channels_last


@dataclass
class Runtime:
    """How batches run: device, autocast dtype, memory format, optional stain normalizer (all rows)."""

    encoder: Encoder
    device: torch.device
    autocast: torch.dtype | None = None
    channels_last: bool = True
    stain: Any = None  # a wsikit.stain.Normalizer (already for_slide'd), or None
    compiled: bool = False

    def forward(self, pixels: torch.Tensor, stains: StainRuns = ()) -> torch.Tensor:
        """(B, H, W, 3) uint8 on any device → (B, D) features on the device (not synchronised).
        ``stains`` normalizes runs of rows with each one's slide normalizer (batches span slides)."""
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        if self.stain is not None:
            x = self.stain(x.contiguous())
        if any(norm is not None for _, norm in stains):
            parts, start = [], 0
            for rows, norm in stains:
                part = x[start : start + rows]
                parts.append(norm(part.contiguous()) if norm is not None else part)
                start += rows
            x = torch.cat(parts)
        x = self.encoder.preprocess(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.autocast_context():
            return self.encoder.model(x)

    def autocast_context(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None
        )

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "autocast": str(self.autocast).removeprefix("torch.") if self.autocast else "fp32",
            "channels_last": self.channels_last,
            "attention": "fused sdpa" if is_transformer(self.encoder.model) else None,
            "compiled": self.compiled,
            "torch_threads": torch.get_num_threads(),
        }

    def zeros(self, n: int) -> torch.Tensor:
        size = self.encoder.read_size
        return torch.zeros((n, size, size, 3), dtype=torch.uint8, device=self.device)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# -- batch size and out-of-memory back-off -----------------------------------------------------------
def measure_memory(runtime: Runtime, sizes: tuple[int, int] = (8, 16)) -> tuple[float, float]:
    """(bytes per tile, fixed bytes) of a forward on a GPU, from the peak memory of two probe batches."""
    dev = runtime.device
    runtime.synchronize()
    base = torch.cuda.memory_allocated(dev)
    peaks = []
    for n in sizes:
        x = runtime.zeros(n)
        torch.cuda.reset_peak_memory_stats(dev)
        runtime.forward(x)
        runtime.synchronize()
        peaks.append(torch.cuda.max_memory_allocated(dev) - base)
        del x
    per_tile = max(1.0, (peaks[1] - peaks[0]) / (sizes[1] - sizes[0]))
    return per_tile, peaks[0] - per_tile * sizes[0]


def auto_batch_size(runtime: Runtime) -> int:
    """:data:`CPU_BATCH` on a CPU; on a GPU the largest power of two (≤ 512) whose measured memory fills
    60% of the free device memory for this encoder and precision (:func:`wsikit.runtime.batch_for_memory`)."""
    if runtime.device.type != "cuda":
        return CPU_BATCH
    per_tile, fixed = measure_memory(runtime)
    free, _ = torch.cuda.mem_get_info(runtime.device)
    return batch_for_memory(per_tile, fixed, free)


@dataclass
class Encoding:
    """Forward passes at a batch size that halves (and stays halved) when the device runs out of memory."""

    runtime: Runtime
    batch_size: int
    on_backoff: Callable[[int, int], None] | None = None  # (old size, new size)
    backoffs: list[int] = field(default_factory=list)

    def __call__(self, pixels: torch.Tensor, stains: StainRuns = ()) -> torch.Tensor:
        """Features of a batch; on out-of-memory the batch is retried in halves and the size kept halved.
        A single tile that does not fit raises :class:`DeviceError`."""
        try:
            return self.runtime.forward(pixels, stains)
        except Exception as exc:
            if not is_oom(exc):
                raise
            n = len(pixels)
            if n == 1:
                raise DeviceError(
                    f"{self.runtime.encoder.name} does not fit in {self.runtime.device}'s memory even one "
                    "tile at a time; use a smaller encoder, --precision bf16/fp16, or another device"
                ) from exc
        self._free()
        half = n // 2
        if half < self.batch_size:
            if self.on_backoff:
                self.on_backoff(self.batch_size, half)
            self.backoffs.append(half)
            self.batch_size = half
        first, second = _split_runs(stains, half)
        return torch.cat([self(pixels[:half], first), self(pixels[half:], second)])

    def _free(self) -> None:
        if self.runtime.device.type == "cuda":
            torch.cuda.empty_cache()


def _split_runs(stains: StainRuns, at: int) -> tuple[list, list]:
    """Stain runs of rows ``[:at]`` and ``[at:]``."""
    first, second, start = [], [], 0
    for rows, norm in stains:
        lo, hi = start, start + rows
        if lo < at:
            first.append((min(hi, at) - lo, norm))
        if hi > at:
            second.append((hi - max(lo, at), norm))
        start = hi
    return first, second


def warm_up(runtime: Runtime, batch_size: int) -> float:
    """One forward at the run's batch size (a compiled graph is built here, once); returns seconds."""
    t0 = time.perf_counter()
    runtime.forward(runtime.zeros(batch_size))
    runtime.synchronize()
    return time.perf_counter() - t0


# -- per-slide stain estimate ------------------------------------------------------------------------
def stain_sample(slide: Slide, grid: TileGrid, n: int, size: int) -> torch.Tensor:
    """Up to ``n`` of the most tissue-rich tiles, spread over the slide, as (n, 3, size, size) uint8."""
    if len(grid) == 0:
        return torch.zeros((0, 3, size, size), torch.uint8)
    order = np.argsort(-np.nan_to_num(grid.tissue_fraction, nan=1.0), kind="stable")
    top = order[: max(n * 4, n)]
    pick = top[np.linspace(0, len(top) - 1, num=min(n, len(top))).astype(int)]
    tiles = []
    for i in pick:
        with contextlib.suppress(Exception):
            tiles.append(read_tile(slide, tuple(grid.coords[i]), grid.size_level0, size))
    if not tiles:
        raise DeviceError(f"{slide.path}: no tile could be read for the stain estimate")
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


def slide_stain(runtime: Runtime, stain: Any, slide: Slide, grid: TileGrid, n_sample: int) -> Any:
    """``stain`` (a fitted normalizer, or None) estimated on the slide's own tiles."""
    if stain is None:
        return None
    sample = stain_sample(slide, grid, n_sample, runtime.encoder.read_size)
    return stain.for_slide(sample.to(runtime.device)) if len(sample) else stain


# -- where JPEG tiles are decoded ---------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeChoice:
    """Where compressed tiles are decoded, and why (rates in tiles/s; None where not measured)."""

    where: str  # "cpu" | "gpu"
    why: str
    cpu_rate: float | None = None
    gpu_rate: float | None = None
    model_rate: float | None = None


def choose_decode(
    mode: str,
    device_type: str,
    cpu_rate: float | None = None,
    gpu_rate: float | None = None,
    model_rate: float | None = None,
) -> DecodeChoice:
    """``cpu`` or ``gpu`` for ``--decode mode``. ``auto`` keeps decoding on the CPU workers when they keep
    up with the model (capacity ≥ 1.1 × its rate) or when the GPU decodes no faster, and moves it to the
    GPU otherwise; without a GPU it is always the CPU."""
    rates = {"cpu_rate": cpu_rate, "gpu_rate": gpu_rate, "model_rate": model_rate}
    if mode == "cpu":
        return DecodeChoice("cpu", "--decode cpu", **rates)
    if device_type != "cuda":
        if mode == "gpu":
            raise DeviceError("--decode gpu needs a CUDA device; use --decode cpu or auto")
        return DecodeChoice("cpu", "no GPU", **rates)
    if mode == "gpu":
        return DecodeChoice("gpu", "--decode gpu", **rates)
    if cpu_rate is None or model_rate is None or gpu_rate is None:
        return DecodeChoice("cpu", "no JPEG tiles a GPU decodes", **rates)
    if cpu_rate >= KEEP_UP * model_rate:
        return DecodeChoice(
            "cpu", f"CPU workers keep up ({cpu_rate:.0f} ≥ {model_rate:.0f} tiles/s)", **rates
        )
    if gpu_rate <= cpu_rate:
        return DecodeChoice("cpu", f"the GPU decodes no faster ({gpu_rate:.0f} tiles/s)", **rates)
    return DecodeChoice("gpu", f"CPU workers decode {cpu_rate:.0f} < model {model_rate:.0f} tiles/s", **rates)


def measure_decode(
    source: TileSource, runtime: Runtime, workers: int, n: int = 64
) -> tuple[float, float] | None:
    """(CPU workers' decoding capacity, the GPU's decoding rate) in tiles/s on ``n`` of a source's whole
    JPEG tiles, or None when it has none a GPU decodes. The CPU figure is one process's rate × workers;
    a GPU decoder that fails counts as 0."""
    whole = np.nonzero(source.plan.whole)[0][:n]
    if not source.gpu_decodable or len(whole) < 8:
        return None
    t0 = time.perf_counter()
    for i in whole:
        source.read(int(i))
    cpu = len(whole) / (time.perf_counter() - t0) * max(1, workers)
    streams = [source.stream(int(i)) for i in whole]
    decode_jpeg_batch(streams[:2], runtime.device)  # initialise nvJPEG
    runtime.synchronize()
    if gpu_decode_error() is not None:
        return cpu, 0.0
    t0 = time.perf_counter()
    resize_batch(decode_jpeg_batch(streams, runtime.device), runtime.encoder.read_size)
    runtime.synchronize()
    return cpu, len(whole) / (time.perf_counter() - t0)


def model_rate(runtime: Runtime, batch_size: int) -> float:
    """The encoder's forward rate (tiles/s) at ``batch_size``, timed on zeros after a warm-up."""
    warm_up(runtime, batch_size)
    return batch_size / warm_up(runtime, batch_size)
