"""The interface every MIL model implements: a bag of tile features in, slide logits and tile scores out."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MILOutput:
    """One bag's result.

    ``logits`` (C,) slide logits; ``tile_scores`` (N,) one score per tile for heatmaps (attention weight or
    instance probability; higher = more evidence for the predicted / positive class); ``aux_loss`` a
    model-specific training term (CLAM instance clustering, DSMIL max-instance), 0 when not training.
    """

    logits: torch.Tensor
    tile_scores: torch.Tensor
    aux_loss: torch.Tensor | None = None


class MILModel(nn.Module):
    """Base class: ``forward(features (N, D) or (1, N, D), label=None, coords=None) -> MILOutput``.

    ``label`` (an int) is given during training so models with instance-level terms can compute them;
    ``coords`` (N, 2) level-0 tile positions are accepted by every model (used by none of the built-ins
    but part of the interface for spatial models).
    """

    n_classes: int
    score_kind: str = "attention"  # or "probability": what tile_scores mean

    @staticmethod
    def as_bag(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            if x.shape[0] != 1:
                raise ValueError(f"MIL models take one bag at a time, got a batch of {x.shape[0]}")
            x = x[0]
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"a bag must be (N, D) with N >= 1, got shape {tuple(x.shape)}")
        return x

    def positive_class(self, logits: torch.Tensor) -> int:
        """Class whose evidence tile scores show: 1 for binary problems, else the predicted class."""
        return 1 if self.n_classes == 2 else int(logits.argmax())


def mlp_embed(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """The shared first layer: Linear → ReLU → Dropout."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
