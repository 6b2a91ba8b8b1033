"""Mean- and max-pooling baselines: embed tiles, pool the embeddings, classify.

Because the classifier is linear, a tile's score is the classifier's positive-class margin on that tile's
embedding (for mean pooling the slide logit is exactly the mean of these).
"""

from __future__ import annotations

import torch
from torch import nn

from wsikit.mil.base import MILModel, MILOutput, mlp_embed


class PoolMIL(MILModel):
    score_kind = "margin"

    def __init__(
        self, in_dim: int, n_classes: int, pool: str = "mean", hidden: int = 256, dropout: float = 0.25
    ):
        super().__init__()
        if pool not in ("mean", "max"):
            raise ValueError(f"pool {pool!r}: use mean or max")
        self.n_classes = n_classes
        self.pool = pool
        self.embed = mlp_embed(in_dim, hidden, dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, label: int | None = None, coords=None) -> MILOutput:
        h = self.embed(self.as_bag(x))
        pooled = h.mean(dim=0) if self.pool == "mean" else h.max(dim=0).values
        logits = self.classifier(pooled)
        k = self.positive_class(logits)
        tile_logits = self.classifier(h)
        others = torch.cat([tile_logits[:, :k], tile_logits[:, k + 1 :]], dim=1)
        scores = tile_logits[:, k] - others.max(dim=1).values
        return MILOutput(logits=logits, tile_scores=scores)
