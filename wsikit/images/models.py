"""Image classifiers: an encoder from :mod:`wsikit.encoders` plus a linear head.

- Grey input: either replicate the channel to three (``in_chans=3``, the default) or adapt the first
  convolution to one channel by summing its pretrained weights over the RGB inputs (``in_chans=1``;
  timm's trick: a grey image x then gives the same response as the RGB image (x, x, x)).
- Small images (MedMNIST's 28 px): ``small_input=True`` sets the stem convolution's stride to 1 and
  drops the stem max-pool, as MedMNIST's own ResNets do, so a 28-px image is not reduced to 1×1.
- Checkpoints (:func:`save_classifier` / :func:`load_classifier`) hold the config, the weights and
  what evaluation needs later (temperature, validation threshold, class names).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsikit.encoders.build import get_encoder
from wsikit.images.settings import ModelConfig
from wsikit.runtime import read_config_checkpoint, save_checkpoint


class ModelError(ValueError):
    """A model that cannot be built or loaded; the message says what to change."""


class Classifier(nn.Module):
    """``backbone`` (B, C, H, W) → (B, dim) features, ``head`` → (B, n_classes) logits."""

    def __init__(self, backbone: nn.Module, dim: int, n_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _first(model: nn.Module, kind: type) -> tuple[nn.Module, str, nn.Module] | None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, kind):
                return parent, name, child
    return None


def adapt_first_conv(model: nn.Module, in_chans: int = 1) -> nn.Module:
    """Give the first 3-channel convolution ``in_chans`` inputs: weights summed over RGB (for 1) or
    RGB repeated and rescaled (for more)."""
    found = None
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3 and found is None:
                found = (parent, name, child)
    if found is None:
        raise ModelError(f"{type(model).__name__}: no 3-channel convolution to adapt; replicate grey to RGB")
    conv = found[2]
    w = conv.weight.detach()
    if in_chans == 1:
        new_w = w.sum(dim=1, keepdim=True)
    else:
        new_w = w.repeat(1, (in_chans + 2) // 3, 1, 1)[:, :in_chans] * (3.0 / in_chans)
    conv.in_channels = in_chans
    conv.weight = nn.Parameter(new_w.clone())
    return model


def adapt_small_input(model: nn.Module) -> nn.Module:
    """Stem convolution stride 1 and no stem max-pool (for ~28-64 px images)."""
    conv = _first(model, nn.Conv2d)
    if conv is None:
        raise ModelError(f"{type(model).__name__}: no convolutional stem; small_input needs a CNN")
    conv[2].stride = (1, 1)
    pool = _first(model, nn.MaxPool2d)
    if pool is not None:
        setattr(pool[0], pool[1], nn.Identity())
    return model


def build_classifier(
    cfg: ModelConfig, pretrained: bool = True, weights: str | os.PathLike | None = None, device: str = "cpu"
) -> Classifier:
    """Encoder ``cfg.encoder`` from the registry + head; fills ``cfg``'s preprocessing and weights id."""
    enc = get_encoder(cfg.encoder, weights=weights, pretrained=pretrained)
    backbone = enc.model
    backbone.requires_grad_(True)
    if cfg.in_chans != 3:
        adapt_first_conv(backbone, cfg.in_chans)
    if cfg.small_input:
        adapt_small_input(backbone)
    cfg.mean, cfg.std = tuple(enc.mean), tuple(enc.std)
    if pretrained or weights is not None:
        cfg.weights_id = enc.weights_id
    return Classifier(backbone, enc.dim, cfg.n_classes, cfg.dropout).to(device)


def save_classifier(model: Classifier, cfg: ModelConfig, path: str | os.PathLike, **meta: Any) -> Path:
    """Atomically write ``{config, state_dict, meta}``."""
    return save_checkpoint(path, {"config": asdict(cfg), "state_dict": model.state_dict(), "meta": meta})


def load_classifier(
    path: str | os.PathLike, device: str = "cpu"
) -> tuple[Classifier, ModelConfig, dict[str, Any]]:
    """(model in eval mode, config, meta) from :func:`save_classifier`; nothing is downloaded."""
    ckpt, cfg = read_config_checkpoint(
        path, ModelConfig, ModelError, "train one with wsikit patches train", device
    )
    weights_id = cfg.weights_id
    model = build_classifier(cfg, pretrained=False, device=device)
    cfg.weights_id = weights_id
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), cfg, ckpt.get("meta", {})
