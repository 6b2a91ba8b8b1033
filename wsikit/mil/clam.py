"""CLAM (Lu et al., Nature BME 2021): gated attention pooling plus an instance-clustering loss.

``CLAM-SB`` has one attention branch; ``CLAM-MB`` one branch (and one slide classifier) per class. During
training the ``k`` most and least attended tiles of the true class's branch are pseudo-labelled positive and
negative for that class's instance classifier; with ``subtyping`` (the classes are mutually exclusive
subtypes) the other classes' classifiers also learn that their branches' top tiles are negative.
Loss = ``bag_weight`` × slide CE + (1 - ``bag_weight``) × instance CE. Tile scores = attention of the
positive (binary) or predicted class's branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsikit.mil.abmil import Attention
from wsikit.mil.base import MILModel, MILOutput, mlp_embed


class CLAM(MILModel):
    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        multi_branch: bool = False,
        hidden: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        bag_weight: float = 0.7,
        subtyping: bool = False,
    ):
        super().__init__()
        self.n_classes = n_classes
        self.multi_branch = multi_branch
        self.k_sample = k_sample
        self.bag_weight = bag_weight
        self.subtyping = subtyping
        self.embed = mlp_embed(in_dim, hidden, dropout)
        self.attention = Attention(
            hidden, attn_dim, n_classes if multi_branch else 1, gated=True, dropout=dropout
        )
        if multi_branch:
            self.classifiers = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(n_classes))
        else:
            self.classifier = nn.Linear(hidden, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_classes))

    def _branch(self, c: int) -> int:
        return c if self.multi_branch else 0

    def forward(self, x: torch.Tensor, label: int | None = None, coords=None) -> MILOutput:
        h = self.embed(self.as_bag(x))
        a = torch.softmax(self.attention(h), dim=1)  # (branches, N)
        pooled = a @ h  # (branches, hidden)
        if self.multi_branch:
            logits = torch.cat([clf(pooled[c]) for c, clf in enumerate(self.classifiers)])
        else:
            logits = self.classifier(pooled[0])
        aux = None
        if label is not None and self.training:
            aux = (1.0 - self.bag_weight) * self._instance_loss(h, a, int(label))
        scores = a[self._branch(self.positive_class(logits))]
        return MILOutput(logits=logits, tile_scores=scores, aux_loss=aux)

    def _instance_loss(self, h: torch.Tensor, a: torch.Tensor, label: int) -> torch.Tensor:
        n = h.shape[0]
        k = min(self.k_sample, n // 2)
        if k < 1:
            return h.new_zeros(())
        losses = []
        for c, clf in enumerate(self.instance_classifiers):
            att = a[self._branch(c)]
            top = att.topk(k).indices
            if c == label:
                bottom = (-att).topk(k).indices
                idx = torch.cat([top, bottom])
                target = torch.cat([h.new_ones(k), h.new_zeros(k)]).long()
            elif self.subtyping:
                idx, target = top, h.new_zeros(k).long()
            else:
                continue
            losses.append(F.cross_entropy(clf(h[idx]), target))
        return torch.stack(losses).mean()
