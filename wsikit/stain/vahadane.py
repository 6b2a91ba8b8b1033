"""Vahadane stain normalization in torch (no SPAMS): sparse non-negative dictionary learning, batched.

Vahadane et al., "Structure-preserving color normalization and sparse stain separation for histological
images", IEEE TMI 2016. With StainTools' conventions (the reference): OD = max(−log(I/255), 1e-6) with
I=0 read as 1; tissue = CIE L* below 80 (``luminosity`` 0.8); the stain matrix W (2 unit-norm,
non-negative stains) minimises ½‖x − Wᵀc‖² + λ‖c‖₁ over tissue pixels with c ≥ 0 (λ = 0.1);
concentrations use the same non-negative lasso with λ = 0.01 on every pixel; their 99th percentile is
matched to the target's and the image is recomposed with the target's stain matrix.

For two stains the non-negative lasso has a closed form (the one active set that satisfies the KKT
conditions), so concentrations are exact, elementwise and batched. The dictionary is learned by
alternating that exact sparse coding with Mairal et al.'s block-coordinate dictionary update (projected
onto non-negative, unit-norm columns), started from the Macenko estimate of the same pixels.

Because learning is costly, the default (``source="slide"``) estimates the source stains once per slide
from a sample of tissue tiles (``for_slide``) and applies them to every tile; ``source="tile"`` learns a
dictionary per tile, batched.
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
    lookup,
    quantize,
    register,
    tile_chunks,
    write_output,
)
from wsikit.stain.macenko import stain_vectors
from wsikit.stain.stats import luminosity_mask, masked_quantile, order_he

RUIFROK_HE = ((0.650, 0.704, 0.286), (0.072, 0.990, 0.105))  # fallback start: Ruifrok & Johnston 2001


@dataclass(frozen=True)
class VahadaneParams(Params):
    source: str = "slide"
    luminosity: float = 0.8  # tissue: CIE L* below luminosity × 100
    lambda_dict: float = 0.1  # L1 weight while learning the stain matrix
    lambda_conc: float = 0.01  # L1 weight of the concentrations
    max_percentile: float = 99.0
    dl_iters: int = 100  # most dictionary-learning iterations (stops earlier once stable)
    dl_pixels: int = 100_000  # tissue pixels sampled for a pooled (target / slide) estimate
    seed: int = 0


def _od(v: torch.Tensor) -> torch.Tensor:
    return (-torch.log(v.clamp(min=1.0) / 255.0)).clamp_(min=1e-6)


def optical_density(x: torch.Tensor) -> torch.Tensor:
    """StainTools' OD of pixels (B,3,N) (uint8, or float 0–255)."""
    return lookup(x, _od, ("staintools_od", 255.0))


def _codes(b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The KKT-satisfying active set of the 2-stain non-negative lasso: b = Wᵀx − λ (B,2,N), g = WᵀW (B,2,2)."""
    g11, g12, g22 = g[:, 0, 0, None], g[:, 0, 1, None], g[:, 1, 1, None]
    det = (g11 * g22 - g12 * g12).clamp(min=1e-12)
    b1, b2 = b[:, 0], b[:, 1]
    c1 = (g22 * b1 - g12 * b2) / det
    c2 = (g11 * b2 - g12 * b1) / det
    both = (c1 > 0) & (c2 > 0)
    c1_only = (b1 / g11.clamp(min=1e-12)).clamp(min=0)
    only1 = ~both & (b2 - g12 * c1_only <= 0)
    c2_only = (b2 / g22.clamp(min=1e-12)).clamp(min=0)
    zero = torch.zeros_like(c1)
    c1 = torch.where(both, c1, torch.where(only1, c1_only, zero))
    c2 = torch.where(both, c2, torch.where(only1, zero, c2_only))
    return torch.stack((c1, c2), dim=1)


def nn_lasso(od: torch.Tensor, w: torch.Tensor, lam: float) -> torch.Tensor:
    """Exact argmin_c≥0 ½‖od − W c‖² + λ Σc for two stains: od (B,3,N), W (B,3,2) or (3,2) → c (B,2,N)."""
    if w.ndim == 2:
        w = w.unsqueeze(0)
    wt = w.transpose(1, 2)
    return _codes(wt @ od - lam, wt @ w)


def apply_eager(
    x: torch.Tensor, out: torch.Tensor, skip: torch.Tensor, ws: torch.Tensor, wr: torch.Tensor, lam: float
) -> None:
    """255·exp(−W_ref·diag(scale)·c) into ``out``, c the source concentrations: ws (B,3,2) source, wr (B,3,2)
    scaled target. Runs on cache-sized groups of tiles."""
    for t in tile_chunks(x, skip):
        c = nn_lasso(optical_density(x[t]), ws[t], lam)
        write_output(out[t], torch.bmm(-wr[t], c).exp_().mul_(255.0))


def apply_fused(
    x: torch.Tensor, ws: torch.Tensor, wr: torch.Tensor, lam: float, as_uint8: bool
) -> torch.Tensor:
    """``apply_eager`` written elementwise so ``torch.compile`` fuses it into one pass."""
    od = (-torch.log(x.float().clamp(min=1.0) / 255.0)).clamp(min=1e-6)
    b = (ws.unsqueeze(-1) * od.unsqueeze(2)).sum(1) - lam  # (B,2,N)
    c = _codes(b, ws.transpose(1, 2) @ ws)
    z = (wr.unsqueeze(-1) * c.unsqueeze(1)).sum(2)  # (B,3,N)
    return quantize(torch.exp(math.log(255.0) - z), as_uint8)


def learn_stains(od: torch.Tensor, mask: torch.Tensor, lam: float, iters: int) -> torch.Tensor:
    """Non-negative sparse dictionary learning of 2 stains per row: od (B,3,N), mask (B,N) → W (B,3,2)."""
    b = od.shape[0]
    he, _, ok = stain_vectors(od, mask, alpha=1.0)
    fallback = torch.tensor(RUIFROK_HE, dtype=od.dtype, device=od.device).T.expand(b, 3, 2)
    w = torch.where(ok.view(-1, 1, 1), he.clamp(min=1e-3), fallback)
    w = w / w.norm(dim=1, keepdim=True)
    weight = mask.to(od.dtype).unsqueeze(1)
    for _ in range(iters):
        c = nn_lasso(od, w, lam) * weight
        a = c @ c.transpose(1, 2)  # (B,2,2)
        bx = od @ c.transpose(1, 2)  # (B,3,2)
        prev = w
        cols = []
        for k in range(2):
            akk = a[:, k, k].unsqueeze(1)
            wk = w[:, :, k] + (bx[:, :, k] - (w @ a[:, :, k : k + 1]).squeeze(2)) / akk.clamp(min=1e-12)
            wk = torch.where(akk > 1e-12, wk, w[:, :, k]).clamp(min=0)
            wk = wk / wk.norm(dim=1, keepdim=True).clamp(min=1.0)
            cols.append(wk)
            w = torch.stack((cols[0], w[:, :, 1]), 2) if k == 0 else torch.stack(cols, 2)
        if float((w - prev).abs().max()) < 1e-5:
            break
    w = w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return order_he(w[:, :, 0], w[:, :, 1])


def _sample_pixels(
    od: torch.Tensor, mask: torch.Tensor, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``n`` of the pooled tissue pixels (1,3,N), chosen reproducibly."""
    idx = mask[0].nonzero().squeeze(1)
    if idx.numel() > n:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(idx.numel(), generator=gen)[:n].to(idx.device)
        idx = idx[pick]
    sub = od[:, :, idx]
    return sub, torch.ones(1, sub.shape[2], dtype=torch.bool, device=od.device)


@register
@dataclass
class VahadaneNormalizer(Normalizer):
    """Vahadane normalization; default ``source="slide"``: call ``for_slide(sample)`` per slide."""

    params: VahadaneParams
    method = "vahadane"
    params_type = VahadaneParams

    def estimate(self, x: torch.Tensor) -> dict[str, Any]:
        p = self.params
        od = optical_density(x)
        mask = luminosity_mask(x, p.luminosity)
        frac = float(mask.float().mean())
        if frac < max(p.min_tissue, 1e-6) or int(mask.sum()) < 3:
            raise StainError(
                f"vahadane: only {frac:.1%} of the pixels are tissue (L* < {p.luminosity * 100:g}); "
                "use images or tiles with more stained tissue"
            )
        w = learn_stains(*_sample_pixels(od, mask, p.dl_pixels, p.seed), p.lambda_dict, p.dl_iters)
        c = nn_lasso(od, w, p.lambda_conc)
        max_c = masked_quantile(c[0], p.max_percentile / 100.0)
        return {
            "stain_matrix": w[0].T.tolist(),  # rows: haematoxylin, eosin (OD per R,G,B)
            "max_concentrations": max_c.tolist(),
            "tissue_fraction": frac,
        }

    def transform(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        p = self.params
        dev = x.device
        b = x.shape[0]
        xs = p.subsample(x)  # per-tile estimates use a regular pixel subsample
        mask = luminosity_mask(xs, p.luminosity)
        passed = mask.sum(1) < max(p.min_tissue * xs.shape[2], 3)
        if self.source is not None:
            ws = self.tensor("stain_matrix", dev, "source").T.expand(b, 3, 2)
            src_max = self.tensor("max_concentrations", dev, "source").expand(b, 2)
        else:
            od = optical_density(xs)
            ws = learn_stains(od, mask, p.lambda_dict, p.dl_iters)
            c = nn_lasso(od, ws, p.lambda_conc)
            src_max = masked_quantile(c.reshape(b * 2, -1), p.max_percentile / 100.0).view(b, 2)
        good = (src_max > 1e-6).all(1) & torch.isfinite(src_max).all(1)
        passed = passed | ~good
        ref = self.tensor("stain_matrix", dev).T  # (3,2)
        scale = torch.where(
            good.view(-1, 1), self.tensor("max_concentrations", dev) / src_max.clamp(min=1e-6), 1.0
        )
        wr = (ref.unsqueeze(0) * scale.unsqueeze(1)).contiguous()
        self.kernel(apply_eager, apply_fused, x, out, passed, ws.contiguous(), wr, p.lambda_conc)
        return passed
