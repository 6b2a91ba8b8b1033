"""Write pyramidal TIFFs (Aperio-SVS-like or generic tiled) that OpenSlide and tiffslide both read.

Used to turn an RGB array into a test or benchmark slide, and to convert plain images into slides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

Layout = Literal["svs", "generic"]


def pyramid_levels(image: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """Level 0 and its successive 2× area-averaged downsamples (at most ``n_levels``, none below 1 px)."""
    levels = [image]
    for _ in range(1, n_levels):
        prev = levels[-1]
        h, w = prev.shape[0] // 2, prev.shape[1] // 2
        if min(h, w) < 1:
            break
        levels.append(cv2.resize(prev, (w, h), interpolation=cv2.INTER_AREA))
    return levels


def write_pyramid(
    path: str | os.PathLike,
    image: np.ndarray,
    mpp: float | None,
    tile: int = 256,
    n_levels: int = 3,
    layout: Layout = "svs",
    compression: str = "jpeg",
    quality: int = 90,
) -> Path:
    """Write ``image`` (H, W, 3) uint8 as a tiled pyramid with 2× levels.

    ``layout="svs"`` writes an Aperio ImageDescription carrying ``MPP`` and ``AppMag``; ``"generic"``
    writes a generic tiled TIFF whose resolution tags carry the MPP (pixels per centimetre). With
    ``mpp=None`` no resolution is recorded at all (a slide without MPP).
    """
    import tifffile

    path = Path(path)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"write_pyramid needs an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    levels = pyramid_levels(image, n_levels)
    H, W = image.shape[:2]
    big = image.nbytes > 2**31
    with tifffile.TiffWriter(path, bigtiff=big) as tw:
        for lv, img in enumerate(levels):
            h, w = img.shape[:2]
            kwargs: dict = {}
            if layout == "svs":
                head = f"Aperio Image Library v12.0.0\n{W}x{H} [0,0 {W}x{H}] ({tile}x{tile}) JPEG/RGB Q={quality}"
                if lv:
                    head += f" -> {w}x{h}"
                fields = [head]
                if mpp is not None:
                    fields += [f"AppMag = {10.0 / mpp:g}", f"MPP = {mpp:.4f}"]
                kwargs["description"] = "|".join(fields)
            elif mpp is not None:
                ppcm = 1e4 / (mpp * W / w)
                kwargs.update(resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
            if layout == "svs" and lv == 1:  # Aperio's second page is a stripped thumbnail, not a level
                thumb = cv2.resize(image, (max(1, W * 768 // max(W, H)), max(1, H * 768 // max(W, H))))
                tw.write(
                    thumb,
                    photometric="rgb",
                    metadata=None,
                    description=f"{head} -> thumbnail",
                    compression="jpeg",
                )
            tw.write(
                img,
                tile=(tile, tile),
                compression=compression,
                compressionargs={"level": quality} if compression == "jpeg" else None,
                photometric="rgb",
                subfiletype=1 if lv and layout == "generic" else 0,  # Aperio marks no level as reduced
                metadata=None,
                **kwargs,
            )
    return path
