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

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import wsikit.stain.cpu as cpu
from wsikit.stain.base import (
    Normalizer,
    Params,
    StainError,
    chunk_size,
    quantize,
    register,
    tile_chunks,
    write_output,
)
from wsikit.stain.stats import luminosity_mask, masked_quantile, masked_quantiles, order_he


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
    w = mask if mask.is_floating_point() else mask.to(od.dtype)
    a = torch.cat((od * w.unsqueeze(1), w.unsqueeze(1)), dim=1).double()  # fits pool millions of pixels
    n, cov = tissue_covariance(a @ a.transpose(1, 2))
    v, ok = stain_plane(cov, n)
    proj = v.transpose(1, 2) @ od  # (B,2,N)
    phi = torch.atan2(proj[:, 1], proj[:, 0])
    lo, hi = masked_quantiles(phi, (alpha / 100.0, 1.0 - alpha / 100.0), w)
    he, finite = plane_stains(v, lo, hi)
    return he, n, ok & finite


def tissue_covariance(prod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tissue pixel counts (B,) and OD covariances (B,3,3), in float64, from the products
    [od·w; w][od·w; w]ᵀ (B,4,4) of OD (B,3,N) and 0/1 tissue weights w (B,N)."""
    s = prod.double()
    n = s[:, 3, 3]
    mean = s[:, :3, 3] / n.clamp(min=1).unsqueeze(1)
    outer = n.view(-1, 1, 1) * mean.unsqueeze(2) * mean.unsqueeze(1)
    return n, (s[:, :3, :3] - outer) / (n - 1).clamp(min=1).view(-1, 1, 1)


def stain_plane(cov: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plane of the two leading eigenvectors of OD covariances (B,3,3) of n (B,) tissue pixels: (B,3,2)
    [second, first] with the first pointing into OD > 0, and ok (B,) (enough pixels, finite)."""
    ok = (n >= 3) & torch.isfinite(cov).flatten(1).all(1)
    eye = torch.eye(3, dtype=cov.dtype, device=cov.device).expand_as(cov)
    _, vecs = torch.linalg.eigh(torch.where(ok.view(-1, 1, 1), cov, eye))
    v = vecs[:, :, 1:3].float()  # second and first principal directions
    sign = torch.where(v[:, :, 1].sum(1) < 0, -1.0, 1.0).view(-1, 1, 1)
    return torch.cat((v[:, :, :1], v[:, :, 1:] * sign), dim=2), ok


def plane_stains(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stain matrices (B,3,2) [H, E] from the plane v (B,3,2) and the extreme angles lo, hi (B,) in it, and
    whether they are finite (B,)."""
    lo, hi = lo.to(v.dtype), hi.to(v.dtype)
    v_lo = (v @ torch.stack((lo.cos(), lo.sin()), 1).unsqueeze(2)).squeeze(2)
    v_hi = (v @ torch.stack((hi.cos(), hi.sin()), 1).unsqueeze(2)).squeeze(2)
    he = order_he(v_lo, v_hi)
    return he, torch.isfinite(he).flatten(1).all(1)


def recolour(
    ref: torch.Tensor, ref_max: torch.Tensor, unmix: torch.Tensor, src_max: torch.Tensor, passed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel matrices (B,3,3) = target stains · (target / source max concentrations) · source unmixing,
    and ``passed`` widened to tiles whose source maxima are unusable."""
    good = (src_max > 1e-6).all(1) & torch.isfinite(src_max).all(1)
    scale = torch.where(good.view(-1, 1), ref_max / src_max.clamp(min=1e-6), 1.0)
    return ((ref.unsqueeze(0) * scale.unsqueeze(1)) @ unmix).contiguous(), passed | ~good


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
    """Macenko normalization; ``source="tile"`` (default) re-estimates each tile's stains, batched.

    uint8 batches on CPU run ``wsikit.stain.cpu``'s table kernels; everything else runs torch code."""

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
        if self._tables(x):
            return self._transform_tables(x, out)
        dev = x.device
        b = x.shape[0]
        xs = p.subsample(x)  # per-tile estimates use a regular pixel subsample
        od = optical_density(xs, p.io)
        mask = self._tissue(od, xs)
        n_px = od.shape[2]
        ref = self.tensor("stain_matrix", dev).T  # (3,2)
        if self.source is not None:
            unmix, src_max = self._source(dev, b)
            passed = mask.sum(1) < p.min_tissue * n_px
        else:
            he, n, ok = stain_vectors(od, mask, p.alpha)
            passed = ~ok | (n < max(p.min_tissue * n_px, 3))
            unmix = torch.linalg.pinv(torch.where(passed.view(-1, 1, 1), ref.expand_as(he), he))
            src_max = max_concentrations(unmix @ od, p.max_percentile)
        m, passed = recolour(ref, self.tensor("max_concentrations", dev), unmix, src_max, passed)
        self.kernel(apply_eager, apply_fused, x, out, passed, m, p.io)
        return passed

    def _tables(self, x: torch.Tensor) -> bool:
        """Whether x runs on the CPU table kernels: uint8 on CPU with the OD tissue rule (faster than the
        torch kernels there, compiled or not)."""
        return x.device.type == "cpu" and x.dtype == torch.uint8 and self.params.tissue == "od"

    def chunk_pixels(self, x: torch.Tensor) -> int:
        # the table kernels keep per-call work (threads, the per-tile algebra) small next to the pixels
        return cpu.CHUNK_PIXELS if self._tables(x) else super().chunk_pixels(x)

    def _source(self, dev: torch.device, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slide-level source estimate as unmixing (b,2,3) and max concentrations (b,2)."""
        unmix = torch.linalg.pinv(self.tensor("stain_matrix", dev, "source").T).expand(b, 2, 3)
        return unmix, self.tensor("max_concentrations", dev, "source").expand(b, 2)

    def _transform_tables(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``transform`` for uint8 tiles on CPU (``wsikit.stain.cpu``): the same estimate and result, with OD
        from a lookup table and exact percentiles by numpy's sort and selection. Each pass over the pixels
        runs on groups of tiles in threads; the small per-tile algebra between passes runs once, batched."""
        p = self.params
        dev = x.device
        k = x.shape[0]
        od_table, w_table, inf_table = _lookup_tables(p.io, p.beta)
        step = max(x.shape[2] // p.tile_pixels, 1) if p.tile_pixels else 1
        xn, on = x.numpy(), out.numpy()
        xs = np.empty((k, 3, len(range(0, x.shape[2], step))), np.uint8)  # the per-tile estimate's pixels
        od = np.empty(xs.shape, np.float32)
        darkest = np.empty((k, xs.shape[2]), np.uint8)  # tissue: OD ≥ β in the brightest channel
        prod = np.zeros((k, 4, 4), np.float32)  # [od·w; w][od·w; w]ᵀ (tissue_covariance)

        def moments(i: int, j: int) -> None:
            np.copyto(xs[i:j], xn[i:j, :, ::step])
            w = cpu.table(np.amax(xs[i:j], axis=1, out=darkest[i:j]), w_table)
            if self.source is not None:  # only the tissue count is needed
                prod[i:j, 3, 3] = w.sum(1)
                return
            cpu.table(xs[i:j], od_table, od[i:j])
            a = np.empty((j - i, 4, xs.shape[2]), np.float32)
            a[:, 3] = w
            np.multiply(od[i:j], w[:, None], out=a[:, :3])
            prod[i:j] = a @ a.transpose(0, 2, 1)

        cpu.in_threads(moments, k)
        n, cov = tissue_covariance(torch.from_numpy(prod))
        ref = self.tensor("stain_matrix", dev).T
        if self.source is not None:
            unmix, src_max = self._source(dev, k)
            passed = n < p.min_tissue * xs.shape[2]
        else:
            v, ok = stain_plane(cov, n)
            plane, counts, q = v.numpy(), n.numpy(), p.alpha / 100.0
            lo, hi = np.empty(k), np.empty(k)

            def angles(i: int, j: int) -> None:
                proj = plane[i:j].transpose(0, 2, 1) @ od[i:j]
                phi = np.arctan2(proj[:, 1], proj[:, 0])
                phi += cpu.table(darkest[i:j], inf_table)  # background sorts last
                phi.sort(axis=1)
                lo[i:j], hi[i:j] = cpu.sorted_quantiles(phi, counts[i:j], (q, 1.0 - q))

            cpu.in_threads(angles, k)
            he, finite = plane_stains(v, torch.from_numpy(lo), torch.from_numpy(hi))
            passed = ~(ok & finite) | (n < max(p.min_tissue * xs.shape[2], 3))
            unmix = torch.linalg.pinv(torch.where(passed.view(-1, 1, 1), ref.expand_as(he), he))
            un, maxima = unmix.numpy(), np.empty((k, 2))

            def concentrations(i: int, j: int) -> None:
                c = (un[i:j] @ od[i:j]).reshape(-1, xs.shape[2])
                maxima[i:j] = cpu.row_quantile(c, p.max_percentile / 100.0).reshape(-1, 2)

            cpu.in_threads(concentrations, k)
            src_max = torch.from_numpy(maxima).float()
        m, passed = recolour(ref, self.tensor("max_concentrations", dev), unmix, src_max, passed)
        mn, skip = m.numpy(), passed.numpy()
        bias = ((1.0 - m.double().sum(2)) * math.log(p.io)).numpy()
        cpu.in_threads(lambda i, j: cpu.mix_exp(xn[i:j], on[i:j], mn[i:j], bias[i:j], skip[i:j]), k)
        return passed


@functools.lru_cache(maxsize=8)
def _lookup_tables(io: float, beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lookup tables over uint8 values: OD, tissue weight (OD ≥ β: 1, else 0), background fill (0 or +inf)."""
    od = (math.log(io) - cpu.LN).astype(np.float32)
    tissue = np.arange(256) <= int(np.flatnonzero(od >= beta).max(initial=-1))
    return od, tissue.astype(np.float32), np.where(tissue, 0.0, np.inf).astype(np.float32)
