"""What the viewer's modules share: its error, the slide record, packed typed arrays for the page, the
lattice of a grid's tiles, and the one path check (a job file must resolve inside its folder)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class ViewError(ValueError):
    """A job, slide or layer the viewer cannot show; the message names the file and the fix."""


def pack(values: np.ndarray, dtype: str) -> dict[str, str]:
    """An array as ``{"dtype", "b64"}``: little-endian bytes in base64 (``int32``, ``float32``, ``uint8``)."""
    arr = np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"dtype": dtype, "b64": base64.b64encode(arr.tobytes()).decode("ascii")}


def lattice(coords: np.ndarray, size0: int) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """The regular grid tiles lie on: stride (level-0 px), origin (x, y) and (cols, rows).

    The stride is the greatest common divisor of the corners' offsets, at most the tile side; every tile
    then owns one cell ``((x - ox) // stride, (y - oy) // stride)``, which the browser uses to draw all
    tiles as one image and to find the tile under the pointer.
    """
    if len(coords) == 0:
        return max(1, size0), (0, 0), (0, 0)
    xy = np.asarray(coords, np.int64)
    origin = xy.min(axis=0)
    gcd = int(np.gcd.reduce(np.concatenate([xy[:, 0] - origin[0], xy[:, 1] - origin[1]])))
    stride = min(gcd, size0) if gcd > 0 else size0
    cells = (xy.max(axis=0) - origin) // stride + 1
    if cells[0] * cells[1] > 4096 * 4096:  # tiles off any common lattice: one tile side per cell
        stride = size0
        cells = (xy.max(axis=0) - origin) // stride + 1
    return int(stride), (int(origin[0]), int(origin[1])), (int(cells[0]), int(cells[1]))


def tile_arrays(coords: np.ndarray, size0: int) -> dict[str, Any]:
    """The geometry part of a per-tile layer: corners, side, lattice."""
    stride, origin, cells = lattice(coords, size0)
    xy = np.asarray(coords, np.int64).reshape(-1, 2)
    return {
        "count": len(xy),
        "size0": int(size0),
        "stride0": stride,
        "origin": list(origin),
        "cells": list(cells),
        "x": pack(xy[:, 0], "int32"),
        "y": pack(xy[:, 1], "int32"),
    }


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves (symlinks followed) to a place under ``root`` (resolved too)."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False


@dataclass
class SlideRecord:
    """One slide of the job: id, URL key, slide file (if known), MPP and the tile specs it has."""

    slide_id: str
    key: str
    path: Path | None
    mpp: float | None
    specs: list[str] = field(default_factory=list)
