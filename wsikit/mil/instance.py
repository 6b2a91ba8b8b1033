"""A patch (instance) classifier trained with slide labels only.

Each tile gets class logits from a small MLP; the slide aggregates them per class: ``mean`` (the mean of
the tiles' class probabilities; slide logits are its log), ``max`` (max tile logit, as in mi-Net), or
``topk`` (mean of the k highest tile logits, as in Campanella et al. 2019). Tile scores are
the tiles' probabilities of the positive (binary) or predicted class.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from wsikit.mil.base import MILModel, MILOutput, mlp_embed


class InstanceMIL(MILModel):
    score_kind = "probability"

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        aggregation: str = "topk",
        k: int = 5,
        hidden: int = 256,
        dropout: float = 0.25,
    ):
        super().__init__()
        if aggregation not in ("mean", "max", "topk"):
            raise ValueError(f"aggregation {aggregation!r}: use mean, max or topk")
        self.n_classes = n_classes
        self.aggregation = aggregation
        self.k = k
        self.net = nn.Sequential(mlp_embed(in_dim, hidden, dropout), nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor, label: int | None = None, coords=None) -> MILOutput:
        tile_logits = self.net(self.as_bag(x))  # (N, C)
        if (
            self.aggregation == "mean"
        ):  # mean of the tiles' probabilities (patch voting), as log-probabilities
            logits = torch.log_softmax(tile_logits, dim=1).logsumexp(dim=0) - math.log(tile_logits.shape[0])
        elif self.aggregation == "max":
            logits = tile_logits.max(dim=0).values
        else:
            k = min(self.k, tile_logits.shape[0])
            logits = tile_logits.topk(k, dim=0).values.mean(dim=0)
        probs = torch.softmax(tile_logits, dim=1)
        return MILOutput(logits=logits, tile_scores=probs[:, self.positive_class(logits)])
