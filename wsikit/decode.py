"""JPEG tile streams and batched decoding on the CPU (libjpeg-turbo) or a GPU (nvJPEG), plus the
on-device resize that matches :func:`wsikit.tiles.resize`. Used by :mod:`wsikit.native` and :mod:`wsikit.tiles`."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import numpy as np

from wsikit.io import one_line

PHOTOMETRIC_RGB, PHOTOMETRIC_YCBCR = 2, 6
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # APP14, transform 0 (no colour transform)


class DecodeError(ValueError):
    """A decoding request that cannot run; the message says what to use instead."""


# -- JPEG streams --------------------------------------------------------------------------------------
def _segments(data: bytes) -> tuple[bool, bool, bytes | None]:
    """Scan a JPEG header up to SOS: (has JFIF APP0, has Adobe APP14, SOF component ids)."""
    jfif = adobe = False
    ids = None
    i = 2
    n = len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xDA:  # start of scan: header done
            break
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xE0 and data[i + 4 : i + 9] == b"JFIF\x00":
            jfif = True
        elif marker == 0xEE and data[i + 4 : i + 9] == b"Adobe":
            adobe = True
        elif marker in (0xC0, 0xC1, 0xC2) and i + 10 <= n:
            ncomp = data[i + 9]
            ids = bytes(data[i + 10 + 3 * k] for k in range(ncomp) if i + 10 + 3 * k < n)
        i += 2 + length
    return jfif, adobe, ids


def jpeg_stream(tile: bytes, tables: bytes | None, photometric: int) -> bytes:
    """A self-contained JPEG of one TIFF tile: tables spliced in, RGB marked with an Adobe marker.

    ``tables`` is the ``JPEGTables`` tag (an abbreviated SOI…EOI stream) or None. The Adobe marker is
    added only where a decoder would otherwise guess YCbCr for RGB-encoded data (no JFIF, no Adobe,
    component ids not ``R G B``).
    """
    body = tile[2:] if tile[:2] == b"\xff\xd8" else tile
    head = b"\xff\xd8"
    if tables:
        t = tables[2:] if tables[:2] == b"\xff\xd8" else tables
        head += t[:-2] if t[-2:] == b"\xff\xd9" else t
    if photometric == PHOTOMETRIC_RGB:
        jfif, adobe, ids = _segments(b"\xff\xd8" + body)
        if not jfif and not adobe and ids != b"RGB":
            head = b"\xff\xd8" + _ADOBE_RGB + head[2:]
    return head + body


# -- CPU decoders ----------------------------------------------------------------------------------------
def _decode_imagecodecs(data: bytes) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpeg8_decode(data, outcolorspace="RGB")


def _decode_simplejpeg(data: bytes) -> np.ndarray:
    import simplejpeg

    return simplejpeg.decode_jpeg(data, colorspace="RGB")


def _decode_cv2(data: bytes) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)


def _decode_pil(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _decode_torchvision(data: bytes) -> np.ndarray:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    out = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return out.permute(1, 2, 0).numpy()


#: CPU JPEG decoders by name; all libjpeg-turbo, all give the same pixels (tests/test_native.py).
#: ``benchmarks/bench_read.py`` measures them: simplejpeg was fastest here (up to 2× imagecodecs under
#: load, equal when idle), so it is the default when installed, imagecodecs otherwise.
CPU_DECODERS = {
    "simplejpeg": _decode_simplejpeg,
    "imagecodecs": _decode_imagecodecs,
    "cv2": _decode_cv2,
    "pil": _decode_pil,
    "torchvision": _decode_torchvision,
}
DEFAULT_DECODER = "simplejpeg" if importlib.util.find_spec("simplejpeg") else "imagecodecs"


def decode_jpeg_cpu(data: bytes, decoder: str = DEFAULT_DECODER) -> np.ndarray:
    """Decode one self-contained JPEG stream to (H, W, 3) uint8 RGB."""
    try:
        fn = CPU_DECODERS[decoder]
    except KeyError:
        raise DecodeError(f"unknown JPEG decoder {decoder!r}; use one of {', '.join(CPU_DECODERS)}") from None
    return fn(data)


_gpu_failed: list[str] = []


def _gpu_decode(streams: Sequence[bytes], device: Any) -> Any:
    """Batched nvJPEG decode through torchvision → (B, H, W, 3) uint8 on ``device``; None on failure
    (the first error is kept for :func:`gpu_decode_error` and later batches go straight to the CPU)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if _gpu_failed:
        return None
    try:
        datas = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
        images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        return torch.stack(images).permute(0, 2, 3, 1)
    except RuntimeError as exc:
        _gpu_failed.append(one_line(exc))
        return None


def decode_jpeg_batch(streams: Sequence[bytes], device: Any = "cpu", decoder: str = DEFAULT_DECODER):
    """Decode self-contained YCbCr/greyscale JPEG streams to a (B, H, W, 3) uint8 tensor on ``device``.

    On a CUDA device the batch goes through torchvision's batched nvJPEG ``decode_jpeg`` (workers then
    only ship bytes). nvJPEG treats every 3-component JPEG as YCbCr (it ignores the Adobe marker), so
    RGB-encoded tiles must not come here on a GPU: ``wsikit.tiles.TileSource.gpu_decodable``
    says which can. If
    the GPU decoder fails, this and later batches are decoded on the CPU and moved to ``device``.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        out = _gpu_decode(streams, device)
        if out is not None:
            return out
    arrays = np.stack([decode_jpeg_cpu(s, decoder) for s in streams])
    return torch.from_numpy(arrays).to(device)


def gpu_decode_error() -> str | None:
    """Why GPU decoding was abandoned for this process (None: it was not)."""
    return _gpu_failed[0] if _gpu_failed else None


def _area_weights(n_in: int, n_out: int, device: Any) -> Any:
    """(n_out, n_in) matrix of each output pixel's area overlap with each input pixel (rows sum to 1)."""
    import torch

    scale = n_in / n_out
    edges = torch.arange(n_out + 1, dtype=torch.float64) * scale
    j = torch.arange(n_in, dtype=torch.float64)[None, :]
    overlap = torch.minimum(edges[1:, None], j + 1) - torch.maximum(edges[:-1, None], j)
    return (overlap.clamp_(min=0) / scale).float().to(device)


def resize_batch(x: Any, out_size: int) -> Any:
    """(B, H, W, 3) uint8 → (B, out, out, 3) uint8 on the same device, as :func:`wsikit.tiles.resize`
    does on the CPU: exact area averaging down (separable overlap weights, = cv2 ``INTER_AREA`` up to
    rounding), bilinear up."""
    import torch
    import torch.nn.functional as F

    if x.shape[1] == out_size and x.shape[2] == out_size:
        return x
    if out_size < x.shape[1]:
        wh = _area_weights(x.shape[1], out_size, x.device)
        ww = _area_weights(x.shape[2], out_size, x.device)
        y = torch.einsum("oh,bhwc,pw->bopc", wh, x.float(), ww)
    else:
        y = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(out_size, out_size), mode="bilinear")
        y = y.permute(0, 2, 3, 1)
    return y.round_().clamp_(0, 255).to(x.dtype)
