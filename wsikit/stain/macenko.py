"""Macenko stain normalization, batched over tiles on any torch device.

Macenko et al., "A method for normalizing histology slides for quantitative analysis", ISBI 2009.
Per tile: optical density OD = −log((I+1)/Io); tissue = pixels with OD ≥ β in every channel; the two
leading eigenvectors of the tissue OD covariance (``torch.linalg.eigh`` over the batch) span the stain
plane; the α and 100−α percentiles of the pixels' angle in that plane give the two stain vectors
(haematoxylin = more red absorption); concentrations by least squares on all pixels, scaled so their 99th
percentile matches the target's, and recomposed with the target's stain matrix. Defaults follow the
reference code (Io=240, α=1, β=0.15), as torchstain does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from wsikit.stain.base import (
    Normalizer,
    Params,
    StainError,
    chunk_size,
    luminosity_mask,
    masked_quantile,
    masked_quantiles,
    order_he,
    quantize,
    register,
    tile_chunks,
    write_output,
)


@dataclass(frozen=True)
class MacenkoParams(Params):
    io: float = 240.0  # transmitted light intensity
    alpha: float = 1.0  # angle percentile (%) for the extreme stain directions
    beta: float = 0.15  # OD threshold: pixels below it in any channel are background
    tissue: str = "od"  # "od": the β rule above; "luminosity": CIE L* below 80 (StainTools' rule)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tissue not in ("od", "luminosity"):
            raise StainError(f"tissue={self.tissue!r}: use 'od' or 'luminosity'")

    max_percentile: float = 99.0  # concentration percentile matched to the target's


def optical_density(x: torch.Tensor, io: float) -> torch.Tensor:
    """OD = −log((I+1)/Io) of pixels (B,3,N) (uint8, or float 0–255) as float32, as the reference code."""
    od = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    return od.copy_(x).add_(1.0).div_(io).log_().neg_()


def stain_vectors(
    od: torch.Tensor, mask: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched Macenko estimate from od (B,3,N) and tissue mask (B,N) (bool or 0/1 float).

    Returns stain matrices (B,3,2) [H, E columns], tissue counts (B,), ok (B,) bool.
    """
    b = od.shape[0]
    w = mask if mask.is_floating_point() else mask.to(od.dtype)
    n = w.sum(1)
    n1 = n.clamp(min=1).view(-1, 1, 1)
    mean = (w.unsqueeze(1) @ od.transpose(1, 2)).transpose(1, 2) / n1  # (B,3,1)
    xc = (od - mean).mul_(w.unsqueeze(1))  # centred for float32 accuracy
    cov = xc @ xc.transpose(1, 2) / (n1 - 1).clamp(min=1)
    ok = (n >= 3) & torch.isfinite(cov).flatten(1).all(1)
    eye = torch.eye(3, dtype=od.dtype, device=od.device).expand(b, 3, 3)
    cov = torch.where(ok.view(-1, 1, 1), cov, eye)
    _, vecs = torch.linalg.eigh(cov)
    v = vecs[:, :, 1:3]  # second and first principal directions
    sign = torch.where(v[:, :, 1].sum(1) < 0, -1.0, 1.0).view(-1, 1, 1)  # leading one points into OD > 0
    v = torch.cat((v[:, :, :1], v[:, :, 1:] * sign), dim=2)
    proj = v.transpose(1, 2) @ od  # (B,2,N)
    phi = torch.atan2(proj[:, 1], proj[:, 0])
    lo, hi = masked_quantiles(phi, (alpha / 100.0, 1.0 - alpha / 100.0), w)
    v_lo = (v @ torch.stack((lo.cos(), lo.sin()), 1).unsqueeze(2)).squeeze(2)
    v_hi = (v @ torch.stack((hi.cos(), hi.sin()), 1).unsqueeze(2)).squeeze(2)
    he = order_he(v_lo, v_hi)
    ok &= torch.isfinite(he).flatten(1).all(1)
    return he, n, ok


def max_concentrations(c: torch.Tensor, percentile: float) -> torch.Tensor:
    """Per tile and stain, the ``percentile`` of concentrations (B,2,N) → (B,2)."""
    b = c.shape[0]
    return masked_quantile(c.reshape(b * 2, -1), percentile / 100.0).view(b, 2)


def apply_eager(x: torch.Tensor, out: torch.Tensor, skip: torch.Tensor, m: torch.Tensor, io: float) -> None:
    """io·exp(−m·OD(x)) per pixel into ``out``: x (B,3,N), m (B,3,3) = target stains · scale · source unmixing.

    Computed as exp2(m·log2(x+1) + (1 − Σⱼ mᵢⱼ)·log2 io), in place on cache-sized groups of tiles.
    """
    bias = (1.0 - m.sum(2, keepdim=True)) * math.log2(io)
    k = min(chunk_size(x), x.shape[0])
    lg, z = torch.empty((2, k, 3, x.shape[2]), device=x.device)
    for t in tile_chunks(x, skip):
        xi = x[t]
        li, zi = lg[: len(xi)], z[: len(xi)]
        li.copy_(xi).add_(1.0).log2_()
        write_output(out[t], torch.bmm(m[t], li, out=zi).add_(bias[t]).exp2_())


def apply_fused(x: torch.Tensor, m: torch.Tensor, io: float, as_uint8: bool) -> torch.Tensor:
    """``apply_eager`` written elementwise so ``torch.compile`` fuses it into one pass."""
    od = -torch.log((x.float() + 1.0) / io)
    z = m[:, :, 0:1] * od[:, 0:1] + m[:, :, 1:2] * od[:, 1:2] + m[:, :, 2:3] * od[:, 2:3]
    return quantize(torch.exp(math.log(io) - z), as_uint8)


@register
@dataclass
class MacenkoNormalizer(Normalizer):
    """Macenko normalization; ``source="tile"`` (default) re-estimates each tile's stains, batched."""

    params: MacenkoParams
    method = "macenko"
    params_type = MacenkoParams

    def _tissue(self, od: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.params.tissue == "luminosity":
            return luminosity_mask(x, 0.8)
        return od.amin(1).ge_(self.params.beta)  # 0/1 float

    def estimate(self, x: torch.Tensor) -> dict[str, Any]:
        p = self.params
        od = optical_density(x, p.io)
        mask = self._tissue(od, x)
        frac = float(mask.float().mean())
        if frac < max(p.min_tissue, 1e-6) or int(mask.sum()) < 3:
            raise StainError(
                f"macenko: only {frac:.1%} of the pixels are tissue (OD ≥ {p.beta}); "
                "use images or tiles with more stained tissue"
            )
        he, _, ok = stain_vectors(od, mask, p.alpha)
        if not bool(ok[0]):
            raise StainError("macenko: the stain estimate is degenerate; use images with both stains")
        max_c = max_concentrations(torch.linalg.pinv(he) @ od, p.max_percentile)
        return {
            "stain_matrix": he[0].T.tolist(),  # rows: haematoxylin, eosin (OD per R,G,B)
            "max_concentrations": max_c[0].tolist(),
            "tissue_fraction": frac,
        }

    def transform(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        p = self.params
        dev = x.device
        b = x.shape[0]
        xs = p.subsample(x)  # per-tile estimates use a regular pixel subsample
        od = optical_density(xs, p.io)
        mask = self._tissue(od, xs)
        n_px = od.shape[2]
        ref = self.tensor("stain_matrix", dev).T  # (3,2)
        ref_max = self.tensor("max_concentrations", dev)
        if self.source is not None:
            unmix = torch.linalg.pinv(self.tensor("stain_matrix", dev, "source").T).expand(b, 2, 3)
            src_max = self.tensor("max_concentrations", dev, "source").expand(b, 2)
            passed = mask.sum(1) < p.min_tissue * n_px
        else:
            he, n, ok = stain_vectors(od, mask, p.alpha)
            passed = ~ok | (n < max(p.min_tissue * n_px, 3))
            unmix = torch.linalg.pinv(torch.where(passed.view(-1, 1, 1), ref.expand_as(he), he))
            src_max = max_concentrations(unmix @ od, p.max_percentile)
        good = (src_max > 1e-6).all(1) & torch.isfinite(src_max).all(1)
        passed = passed | ~good
        scale = torch.where(good.view(-1, 1), ref_max / src_max.clamp(min=1e-6), 1.0)
        m = (ref.unsqueeze(0) * scale.unsqueeze(1)) @ unmix  # (B,3,3): one product per pixel
        self.kernel(apply_eager, apply_fused, x, out, passed, m.contiguous(), p.io)
        return passed
