"""DSMIL (Li, Li & Eliceiri, CVPR 2021): dual-stream MIL with a critical instance.

Stream 1 classifies every tile and max-pools (the *critical* tile of each class). Stream 2 attends to all
tiles by their similarity to the critical tile's query and classifies the attention-pooled vector with a
1-D convolution over classes. Loss = 0.5 × CE(stream 2) + 0.5 × CE(max-pooled stream 1); in training the
slide logits are stream 2's, in evaluation the mean of both streams' logits (as the reference predicts). Tile scores = stream-2 attention of the positive (binary) or predicted class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wsikit.mil.base import MILModel, MILOutput


class DSMIL(MILModel):
    def __init__(self, in_dim: int, n_classes: int, q_dim: int = 128, dropout: float = 0.0):
        super().__init__()
        self.n_classes = n_classes
        self.bag_weight = 0.5
        self.instance = nn.Linear(in_dim, n_classes)
        self.q = nn.Sequential(nn.Linear(in_dim, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh())
        self.v = nn.Dropout(dropout)
        self.bag = nn.Conv1d(n_classes, n_classes, kernel_size=in_dim)
        self.q_dim = q_dim

    def forward(self, x: torch.Tensor, label: int | None = None, coords=None) -> MILOutput:
        feats = self.as_bag(x)
        inst = self.instance(feats)  # (N, C)
        critical = inst.argmax(dim=0)  # (C,) index of each class's most confident tile
        q = self.q(feats)  # (N, q)
        att = torch.softmax(q @ q[critical].T / math.sqrt(self.q_dim), dim=0)  # (N, C)
        pooled = att.T @ self.v(feats)  # (C, D)
        bag = self.bag(pooled.unsqueeze(0))[0, :, 0]  # (C,)
        top = inst.max(dim=0).values  # (C,) max-pooled instance stream
        aux = None
        if label is not None and self.training:
            target = torch.tensor([int(label)], device=feats.device)
            aux = 0.5 * F.cross_entropy(top.unsqueeze(0), target)
        logits = bag if self.training else 0.5 * (bag + top)
        return MILOutput(logits=logits, tile_scores=att[:, self.positive_class(logits)], aux_loss=aux)
