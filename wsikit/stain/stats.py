"""Batched statistics the stain methods share: top values and masked quantiles per tile, tissue by
luminosity, ordering of stain vectors (H before E) and their agreement."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from wsikit.stain.base import lookup


def top_values(x: torch.Tensor, k: int, group: int = 8) -> torch.Tensor:
    """The k largest values of each row of x (B,N), sorted descending (exact).

    A row's k largest values all lie in the k groups (of ``group`` neighbours) with the largest maxima, so
    ``topk`` runs on the groups' maxima and then on those k groups' members instead of on all N values.
    """
    b, n = x.shape
    if 4 * k * group > n:
        return x.topk(k, dim=1, sorted=True).values
    if n % group:
        x = torch.nn.functional.pad(x, (0, -n % group), value=float("-inf"))
    n_groups = x.shape[1] // group
    best = torch.nn.functional.max_pool1d(x.unsqueeze(1), group).squeeze(1)
    idx = best.topk(k, dim=1, sorted=False).indices
    idx += torch.arange(b, device=x.device).unsqueeze(1) * n_groups
    members = x.reshape(-1, group).index_select(0, idx.view(-1)).view(b, -1)
    return members.topk(k, dim=1, sorted=True).values


def masked_quantile(x: torch.Tensor, q: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row ``q`` quantile (0–1, linear interpolation like numpy) of x (B,N) over ``mask``'s pixels."""
    return masked_quantiles(x, (q,), None if mask is None else mask.to(x.dtype))[0]


def masked_quantiles(
    x: torch.Tensor, qs: Sequence[float], weight: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Per-row quantiles ``qs`` of x (B,N) over the pixels whose ``weight`` (0/1 float, (B,N)) is 1.

    Linear interpolation like numpy. Each quantile selects only the tail nearest it (``top_values``), so
    the 1st/99th percentiles cost O(N). Rows without valid pixels give 0 (callers pass such tiles through).
    """
    b, n_all = x.shape
    n = weight.sum(1) if weight is not None else torch.full((b,), float(n_all), device=x.device)
    empty = n < 1
    n = n.clamp(min=1).to(x.dtype)
    k = max(min(n_all, int(np.ceil(min(q, 1 - q) * (n_all - 1))) + 2) for q in qs)
    if weight is None and len(qs) == 1 and qs[0] >= 0.5:
        tails = x.unsqueeze(0)
    else:  # each q's tail as the largest values of a row: x, or −x for the smallest; invalid pixels → −max
        tails = torch.empty((len(qs), b, n_all), dtype=x.dtype, device=x.device)
        skip = weight.sub(1.0).mul_(torch.finfo(x.dtype).max) if weight is not None else None
        for q, tail in zip(qs, tails, strict=True):
            sign = 1.0 if q >= 0.5 else -1.0
            if skip is None:
                torch.mul(x, sign, out=tail)
            else:
                torch.add(skip, x, alpha=sign, out=tail)
    vals = top_values(tails.view(-1, n_all), k).view(len(qs), b, k)
    out = []
    for q, v in zip(qs, vals, strict=True):
        largest = q >= 0.5
        pos = q * (n - 1)  # ascending position among valid values
        dist = (n - 1 - pos) if largest else pos  # position counted from the tail kept
        lo = dist.floor().long().clamp(0, k - 1)
        hi = torch.minimum((lo + 1).clamp(max=k - 1), (n - 1).long().clamp(min=0))
        frac = (dist - lo.to(x.dtype)).unsqueeze(1)
        v_lo, v_hi = v.gather(1, lo.unsqueeze(1)), v.gather(1, hi.unsqueeze(1))
        r = (v_lo + (v_hi - v_lo) * frac).squeeze(1)
        r = torch.where(empty, 0.0, r if largest else -r)
        out.append(torch.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0))
    return out


def _linear_rgb(v: torch.Tensor) -> torch.Tensor:
    c = v / 255.0
    return torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def luminosity_mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pixels darker than ``threshold`` (0–1) in CIE L* (StainTools' tissue rule); x (B,3,N) 0–255."""
    lin = lookup(x, _linear_rgb, ("linear_rgb", 0.0))
    y = 0.212671 * lin[:, 0] + 0.715160 * lin[:, 1] + 0.072169 * lin[:, 2]
    y_max = ((threshold * 100.0 + 16.0) / 116.0) ** 3  # L* = 116·Y^(1/3) − 16 above the linear toe
    return y < y_max


def order_he(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """Stack two (B,3) stain vectors as (B,3,2) with haematoxylin (more red absorption) first."""
    h_first = (v1[:, 0] >= v2[:, 0]).view(-1, 1)
    h = torch.where(h_first, v1, v2)
    e = torch.where(h_first, v2, v1)
    return torch.stack((h, e), dim=2)


def cosine_per_stain(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> list[float]:
    """Cosine similarity of each stain (row) of two 2×3 stain matrices."""
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    num = (a_ * b_).sum(1)
    return (num / (np.linalg.norm(a_, axis=1) * np.linalg.norm(b_, axis=1))).tolist()
