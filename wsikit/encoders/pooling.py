"""Embedding rules: how a model's output tokens become one feature vector per tile.

A transformer returns a token sequence ``(B, T, D)``: ``n_prefix`` leading tokens (the class token,
then any register tokens) followed by the patch tokens. Each rule is a named, documented function of
that sequence, recorded in every bag (``encoder_embedding``), so two bags are comparable only when
their rules match. ``pooled`` means the model's own pooling head (a CNN's global average, CONCH's
attention pooler, Swin's average) and is not a function of the tokens alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from wsikit.encoders.spec import EncoderError


@dataclass(frozen=True)
class EmbeddingRule:
    """A named token → vector rule; ``width`` is the output size as a multiple of the token size."""

    name: str
    description: str
    width: int
    fn: Callable[[torch.Tensor, int], torch.Tensor] | None  # (tokens, n_prefix) -> (B, width * D)


def _cls(tokens: torch.Tensor, n_prefix: int) -> torch.Tensor:
    return tokens[:, 0]


def _patch_mean(tokens: torch.Tensor, n_prefix: int) -> torch.Tensor:
    return tokens[:, n_prefix:].mean(dim=1)


def _cls_and_mean(tokens: torch.Tensor, n_prefix: int) -> torch.Tensor:
    return torch.cat([tokens[:, 0], tokens[:, n_prefix:].mean(dim=1)], dim=-1)


RULES: dict[str, EmbeddingRule] = {
    r.name: r
    for r in (
        EmbeddingRule("cls", "class token of the last layer (after the final norm)", 1, _cls),
        EmbeddingRule(
            "cls+mean",
            "class token ⊕ mean of the patch tokens (register tokens excluded), after the final norm",
            2,
            _cls_and_mean,
        ),
        EmbeddingRule(
            "mean", "mean of the patch tokens (class and register tokens excluded)", 1, _patch_mean
        ),
        EmbeddingRule("pooled", "the model's own pooling head", 1, None),
    )
}


def embedding_rule(name: str) -> EmbeddingRule:
    """The rule called ``name``; unknown names raise with the list."""
    if name not in RULES:
        raise EncoderError(f"embedding rule {name!r}: use one of {', '.join(RULES)}")
    return RULES[name]


class TokenPooling(nn.Module):
    """A backbone with ``forward_features`` (normed tokens) and ``num_prefix_tokens``, plus a rule.

    The backbone keeps its own parameter names (``backbone.`` is the only added prefix), so its
    checkpoint is loaded into ``self.backbone`` before wrapping.
    """

    def __init__(self, backbone: nn.Module, rule: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.rule = embedding_rule(rule)
        if self.rule.fn is None and not hasattr(backbone, "pool"):
            raise EncoderError(f"{type(backbone).__name__} has no pooling head; use a token rule")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(x)
        if self.rule.fn is None:
            return self.backbone.pool(tokens)
        return self.rule.fn(tokens, int(self.backbone.num_prefix_tokens))
