"""CPU kernels for uint8 tiles: OpenCV table lookups and numpy, with groups of tiles spread over threads.

A per-tile method on CPU is a chain of passes over each tile's pixels with small per-tile algebra in
between. Here each pass is made of OpenCV and numpy calls, which are single-threaded but release the GIL,
so ``in_threads`` gives each of torch's threads a group of the tiles. A 256-entry lookup table replaces
the log of every uint8 value, and numpy's vectorised sort and selection give exact percentiles. Used by
``MacenkoNormalizer`` for uint8 batches on CPU."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import cv2
import numpy as np
import torch

T = TypeVar("T")
LN = np.log(np.arange(256, dtype=np.float64) + 1.0)  # ln(I + 1) for every uint8 value
LN32 = LN.astype(np.float32)
CHUNK_PIXELS = 1 << 22  # pixels per call (64 tiles of 256²): per-call work is small next to the pixels
EXP_SAFE = 80.0  # e^z for |z| < 80 is a normal float32 number
ROUND_SAFE = 21.0  # e^21 < 2³¹: OpenCV rounds floats to bytes through int32

_POOL: dict[int, ThreadPoolExecutor] = {}


def _forget_pool() -> None:  # a forked child has none of its parent's threads
    _POOL.clear()


os.register_at_fork(after_in_child=_forget_pool)


def in_threads(fn: Callable[[int, int], T], k: int) -> list[T]:
    """``fn(start, stop)`` over contiguous groups of k tiles, one group per torch thread, in threads."""
    t = max(1, min(torch.get_num_threads(), k))
    bounds = [k * i // t for i in range(t + 1)]
    if t == 1:
        return [fn(0, k)]
    if t not in _POOL:
        _POOL[t] = ThreadPoolExecutor(t, thread_name_prefix="wsikit-stain")
    return list(_POOL[t].map(lambda i: fn(bounds[i], bounds[i + 1]), range(t)))


def table(x: np.ndarray, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``values[x]`` for uint8 x of any shape: a 256-entry float32 lookup (OpenCV, vectorised)."""
    flat = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    if out is None:
        return cv2.LUT(flat, values.reshape(1, 256)).reshape(x.shape)
    cv2.LUT(flat, values.reshape(1, 256), dst=out.reshape(flat.shape))
    return out


def sorted_quantiles(a: np.ndarray, n: np.ndarray, qs: tuple[float, ...]) -> list[np.ndarray]:
    """Quantiles ``qs`` (0–1, linear like numpy) of each row of a (R,N) sorted ascending, over its first
    n[r] values (the rest are +inf fill). Rows with no values give 0 (callers pass such tiles through)."""
    rows = np.arange(a.shape[0])
    last = np.maximum(n, 1).astype(np.int64) - 1
    out = []
    for q in qs:
        pos = q * last
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, last)
        v_lo, v_hi = (np.where(n >= 1, a[rows, i], 0.0) for i in (lo, hi))  # empty rows: +inf fill
        out.append(v_lo + (pos - lo) * (v_hi - v_lo))
    return out


def row_quantile(a: np.ndarray, q: float) -> np.ndarray:
    """The ``q`` quantile (0–1, linear like numpy) of every row of a (R,N), by selection (a is reordered)."""
    pos = q * (a.shape[1] - 1)
    lo = math.floor(pos)
    a.partition(lo, axis=1)
    v_lo = a[:, lo].astype(np.float64)
    v_hi = a[:, lo + 1 :].min(1).astype(np.float64) if lo + 1 < a.shape[1] else v_lo
    return v_lo + (pos - lo) * (v_hi - v_lo)


def mix_exp(x: np.ndarray, out: np.ndarray, m: np.ndarray, bias: np.ndarray, skip: np.ndarray) -> None:
    """out = exp(m·ln(x+1) + bias) per pixel, rounded to uint8, for uint8 tiles x (k,3,N) into out (k,3,N);
    m (k,3,3) float32, bias (k,3) float64. Tiles marked in ``skip`` (k,) are left alone.

    Per tile: a lookup for ln(x+1), one 3×3 product, exp, and exp(bias) folded into the final rounding.
    If that could leave the ranges of float32 or of the rounding, bias is added first and the exponent
    capped (anything above ln 255.5 saturates to 255 anyway).
    """
    lg, z = np.empty((2, *x.shape[1:]), np.float32)
    z_max = np.clip(m, 0, None).sum(2) * LN[-1]  # bounds of m·ln(x+1) per tile and channel
    z_min = np.clip(m, None, 0).sum(2) * LN[-1]
    fold = ((z_min > -EXP_SAFE) & (z_max < EXP_SAFE) & (z_max + bias < ROUND_SAFE)).all(1)
    for i in np.flatnonzero(~skip):
        np.matmul(m[i], table(x[i], LN32, lg), out=z)
        if fold[i]:
            gain = np.exp(bias[i])
        else:
            z += bias[i].astype(np.float32)[:, None]
            np.minimum(z, ROUND_SAFE, out=z)
            gain = np.ones(3)
        cv2.exp(z, dst=z)
        for c in range(3):  # |gain·z| rounded and saturated to 0–255 (z > 0)
            cv2.convertScaleAbs(z[c], dst=out[i, c], alpha=float(gain[c]))
