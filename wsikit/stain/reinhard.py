"""Reinhard colour transfer in CIE L*a*b*, batched over tiles on any torch device.

Reinhard et al., "Color transfer between images", IEEE CG&A 2001: each L*a*b* channel is standardised
with the tile's mean and standard deviation and given the target's. L*a*b* is the float CIE space (sRGB,
D65) that torchstain also uses; StainTools goes through OpenCV's 8-bit L*a*b*, which quantises each channel
to 256 levels first (a difference by design, about 1 unit of 255 on average). Tissue (for the pass-through
rule) is L* below 80, as in StainTools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from wsikit.stain.base import Normalizer, Params, StainError, lookup, quantize, register, tile_chunks
from wsikit.stain.stats import _linear_rgb

_RGB2XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.950456, 1.0, 1.088754)  # D65


@dataclass(frozen=True)
class ReinhardParams(Params):
    luminosity: float = 0.8  # tissue: L* below luminosity × 100


def _matrix(rows: tuple, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32, device=like.device)


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """Pixels (B,3,N) (uint8, or float 0–255) → CIE L*a*b* (B,3,N) float (L* 0–100)."""
    lin = lookup(x, _linear_rgb, ("linear_rgb", 0.0))
    m = _matrix(_RGB2XYZ, lin) / _matrix(_WHITE, lin).unsqueeze(1)
    t = m @ lin
    f = torch.where(t > 0.008856, t.clamp(min=1e-12).pow(1.0 / 3.0), 7.787 * t + 16.0 / 116.0)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (B,3,N) → float RGB (B,3,N) in 0–255 (out-of-gamut values clamped)."""
    fy = (lab[:, 0] + 16.0) / 116.0
    f = torch.stack((lab[:, 1] / 500.0 + fy, fy, fy - lab[:, 2] / 200.0), dim=1)
    t = torch.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787)
    m = torch.linalg.inv(_matrix(_RGB2XYZ, lab)) * _matrix(_WHITE, lab).unsqueeze(0)
    lin = (m @ t).clamp(min=0.0)
    srgb = torch.where(lin > 0.0031308, 1.055 * lin.pow(1.0 / 2.4) - 0.055, 12.92 * lin)
    return srgb * 255.0


def lab_stats(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile and channel mean and (population) standard deviation: (B,3), (B,3)."""
    std, mean = torch.std_mean(lab, dim=2, correction=0)
    return mean, std


@register
@dataclass
class ReinhardNormalizer(Normalizer):
    """Reinhard normalization; per tile by default, or per slide with ``source="slide"``."""

    params: ReinhardParams
    method = "reinhard"
    params_type = ReinhardParams

    def estimate(self, x: torch.Tensor) -> dict[str, Any]:
        lab = rgb_to_lab(x)
        frac = float((lab[:, 0] < self.params.luminosity * 100.0).float().mean())
        if frac < max(self.params.min_tissue, 1e-6):
            raise StainError(
                f"reinhard: only {frac:.1%} of the pixels are tissue (L* < {self.params.luminosity * 100:g}); "
                "use images or tiles with more stained tissue"
            )
        mean, std = lab_stats(lab)
        return {"lab_mean": mean[0].tolist(), "lab_std": std[0].tolist(), "tissue_fraction": frac}

    def transform(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        p = self.params
        dev = x.device
        b = x.shape[0]
        lab_s = rgb_to_lab(p.subsample(x))  # per-tile statistics use a regular pixel subsample
        passed = (lab_s[:, 0] < p.luminosity * 100.0).sum(1) < max(p.min_tissue * lab_s.shape[2], 3)
        if self.source is not None:
            mean = self.tensor("lab_mean", dev, "source").expand(b, 3)
            std = self.tensor("lab_std", dev, "source").expand(b, 3)
        else:
            mean, std = lab_stats(lab_s)
        good = (std > 1e-3).all(1)
        passed = passed | ~good
        gain = torch.where(good.view(-1, 1), self.tensor("lab_std", dev) / std.clamp(min=1e-3), 1.0)
        shift = self.tensor("lab_mean", dev) - mean * gain
        self.kernel(
            apply_eager,
            apply,
            x,
            out,
            passed,
            gain.unsqueeze(2).contiguous(),
            shift.unsqueeze(2).contiguous(),
        )
        return passed


def apply_eager(
    x: torch.Tensor, out: torch.Tensor, skip: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor
) -> None:
    """``apply`` into ``out`` on cache-sized groups of tiles."""
    for t in tile_chunks(x, skip):
        out[t].copy_(apply(x[t], gain[t], shift[t], out.dtype == torch.uint8))


def apply(x: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor, as_uint8: bool) -> torch.Tensor:
    """The per-pixel transfer: L*a*b* · gain + shift → RGB; gain and shift (B,3,1)."""
    return quantize(lab_to_rgb(rgb_to_lab(x) * gain + shift), as_uint8)
