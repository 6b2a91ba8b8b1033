"""TransMIL (Shao et al., NeurIPS 2021): a class token and two Nyström-attention layers over the tiles.

Tiles are embedded, padded to a square number by repeating the first ones, prefixed with a class token,
passed through attention → PPEG (depth-wise convolutions over the tiles laid out on a square, the
"pyramid position encoding generator") → attention, and the class token is classified. Attention uses the
Nyström approximation (Xiong et al. 2021: segment-mean landmarks, iterative pseudo-inverse) when the
sequence is longer than the number of landmarks, and exact softmax attention otherwise, so memory grows
linearly with N. Tile scores = the class token's last-layer attention to each tile (mean over heads; a tile's
padded copy adds to it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wsikit.mil.base import MILModel, MILOutput


def _pinv(x: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of a batch of softmax matrices by Newton-Schulz-type iteration."""
    col = x.abs().sum(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1)
    row = x.abs().sum(dim=-2).amax(dim=-1, keepdim=True).unsqueeze(-1)
    z = x.transpose(-1, -2) / (col * row)
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    def __init__(
        self, dim: int, heads: int = 8, landmarks: int = 256, dropout: float = 0.1, conv_kernel: int = 33
    ):
        super().__init__()
        self.heads = heads
        self.dim_head = dim // heads
        self.landmarks = landmarks
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        # depth-wise convolution of the values along the sequence (the residual of the reference model)
        self.res_conv = nn.Conv2d(
            heads, heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=heads, bias=False
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, dim) → (output (n, dim), attention of token 0 to every token (heads, n))."""
        n, dim = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.heads, self.dim_head).permute(1, 2, 0, 3)  # each (h, n, d)
        q = q * self.dim_head**-0.5
        if n <= self.landmarks:
            attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
            out, cls_row = attn @ v, attn[:, 0]
        else:
            m = self.landmarks
            seg = math.ceil(n / m)
            pad = seg * m - n
            real = F.pad(x.new_ones(n), (0, pad)).view(m, seg).sum(dim=1)  # real tokens per segment

            def landmarks(t: torch.Tensor) -> torch.Tensor:  # segment means over real tokens
                summed = F.pad(t, (0, 0, 0, pad)).view(self.heads, m, seg, self.dim_head).sum(2)
                return summed / real.clamp(min=1)[:, None]

            q_l, k_l = landmarks(q), landmarks(k)
            keep = real > 0
            q_l, k_l = q_l[:, keep], k_l[:, keep]
            k1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)  # (h, n, m)
            k2 = _pinv(torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1))  # (h, m, m)
            k3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)  # (h, m, n)
            out = (k1 @ k2) @ (k3 @ v)
            cls_row = ((k1[:, :1] @ k2) @ k3)[:, 0]
        out = out + self.res_conv(v.unsqueeze(0))[0]
        out = out.permute(1, 0, 2).reshape(n, dim)
        return self.out(out), cls_row


class TransLayer(nn.Module):
    def __init__(self, dim: int, heads: int, landmarks: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads, landmarks, dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, cls_row = self.attn(self.norm(x))
        return x + out, cls_row


class PPEG(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, feat = x[:1], x[1:]
        grid = feat.T.reshape(1, -1, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.reshape(x.shape[1], -1).T])


class TransMIL(MILModel):
    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        dim: int = 512,
        heads: int = 8,
        landmarks: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.n_classes = n_classes
        self.embed = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, dim) * 0.02)
        self.layer1 = TransLayer(dim, heads, landmarks, dropout)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, heads, landmarks, dropout)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor, label: int | None = None, coords=None) -> MILOutput:
        h = self.embed(self.as_bag(x))
        n = h.shape[0]
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        h = torch.cat([self.cls_token, h, h[:extra].repeat(math.ceil(extra / n) if extra else 0, 1)[:extra]])
        h, _ = self.layer1(h)
        h = self.ppeg(h, side)
        h, cls_row = self.layer2(h)
        logits = self.classifier(self.norm(h[0]))
        att = cls_row.mean(dim=0)[1:]  # attention to the tiles and their padded copies
        scores = att[:n].clone()
        if extra:
            scores.index_add_(0, torch.arange(extra, device=h.device) % n, att[n:])
        return MILOutput(logits=logits, tile_scores=scores)
