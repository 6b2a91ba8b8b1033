"""Attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018) with plain or gated attention."""

from __future__ import annotations

import torch
from torch import nn

from wsikit.mil.base import MILModel, MILOutput, mlp_embed


class Attention(nn.Module):
    """a_i = w^T tanh(V h_i) (plain) or w^T (tanh(V h_i) ⊙ sigmoid(U h_i)) (gated); one row per branch."""

    def __init__(self, dim: int, hidden: int, n_branches: int = 1, gated: bool = True, dropout: float = 0.0):
        super().__init__()
        self.gated = gated
        self.v = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.u = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        self.w = nn.Linear(hidden, n_branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, dim) → raw attention logits (n_branches, N)."""
        a = self.v(h)
        if self.u is not None:
            a = a * self.u(h)
        return self.w(a).T


class ABMIL(MILModel):
    """Embed tiles, attention-pool them into one slide vector, classify it. Tile scores = attention."""

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 256,
        attn_dim: int = 128,
        gated: bool = False,
        dropout: float = 0.25,
    ):
        super().__init__()
        self.n_classes = n_classes
        self.embed = mlp_embed(in_dim, hidden, dropout)
        self.attention = Attention(hidden, attn_dim, 1, gated=gated)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, label: int | None = None, coords=None) -> MILOutput:
        h = self.embed(self.as_bag(x))
        a = torch.softmax(self.attention(h), dim=1)  # (1, N)
        logits = self.classifier(a @ h)[0]
        return MILOutput(logits=logits, tile_scores=a[0])
