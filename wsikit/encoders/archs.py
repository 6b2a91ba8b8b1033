"""Architectures that are not one plain timm call: CONCH's vision towers, CTransPath, ``transformers`` ViTs.

Each builder returns a backbone with ``forward_features`` (normed tokens), ``num_prefix_tokens`` and,
where the model has its own pooling head, ``pool``; parameter names follow the published checkpoints
so they load strictly. Facts (sizes, key names, pooling) come from the model cards and the peers'
loaders (TRIDENT, slide2vec); the code is wsikit's own.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsikit.encoders.spec import EncoderError, EncoderSpec


def timm_kwargs(spec: EncoderSpec) -> dict[str, Any]:
    """``spec.kwargs`` with layer names resolved to timm classes (the catalog stays torch-free)."""
    import timm.layers

    kwargs = dict(spec.kwargs)
    if isinstance(kwargs.get("mlp_layer"), str):
        kwargs["mlp_layer"] = getattr(timm.layers, kwargs["mlp_layer"])
    return kwargs


def build_timm(spec: EncoderSpec) -> nn.Module:
    import timm

    return timm.create_model(spec.arch, pretrained=False, num_classes=0, **timm_kwargs(spec))


# -- CONCH v1: timm ViT-B/16 trunk, torch MultiheadAttention poolers (CoCa) ----------------------------
class MHAPooler(nn.Module):
    """Learned queries attending over the tokens (CoCa's attentional pooler, torch attention)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(
            d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True
        )
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, need_weights=False)[0]


class ConchVisual(nn.Module):
    """CONCH v1's vision tower; its embedding is ``ln_contrast(attn_pool_contrast(tokens))`` (512-d),
    i.e. ``encode_image(proj_contrast=False, normalize=False)``. The caption pooler and the
    contrastive projection are kept so that the checkpoint's ``visual.*`` loads strictly."""

    num_prefix_tokens = 1

    def __init__(self, width: int = 768, depth: int = 12, heads: int = 12, image_size: int = 448) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(
            img_size=image_size, patch_size=16, embed_dim=width, depth=depth, num_heads=heads,
            mlp_ratio=4, num_classes=0, dynamic_img_size=True,
        )  # fmt: skip
        self.attn_pool_contrast = MHAPooler(512, width, 8, 1)
        self.ln_contrast = nn.LayerNorm(512)
        self.proj_contrast = nn.Parameter(width**-0.5 * torch.randn(512, 512))
        self.attn_pool_caption = MHAPooler(width, width, 8, 256)
        self.ln_caption = nn.LayerNorm(width)
        self.head = nn.Sequential()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


# -- CONCH v1.5: timm ViT-L/16 trunk at 448 px, linear-projection pooler (TITAN's patch encoder) -------
class LinearPooler(nn.Module):
    """Learned queries over the tokens with separate ``to_q``/``to_kv``/``to_out`` projections."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.heads = n_head
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h = x.shape[0], self.heads
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


def dino_resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """DINO/iBOT's run-time position-embedding resize (bicubic with the +0.1 scale offset, no
    antialias), done once at load: (1, 1 + M², D) → (1, 1 + grid², D)."""
    n = pos_embed.shape[1] - 1
    side = int(math.sqrt(n))
    if side * side != n or side == grid:
        return pos_embed
    patch = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    scale = (grid + 0.1) / math.sqrt(n)
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], patch], dim=1)


class ConchV15Visual(nn.Module):
    """CONCH v1.5's vision tower: ``ln_contrast(attn_pool_contrast(tokens))`` (768-d).

    Its reference loader builds the trunk with a 224-px (14×14) position table and resizes it to
    the 448-px input at every forward; here that resize happens once when the weights load
    (:meth:`convert_state`), which gives the same numbers.
    """

    num_prefix_tokens = 1

    def __init__(self, image_size: int = 448) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(
            img_size=image_size, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4,
            qkv_bias=True, init_values=1.0, num_classes=0,
        )  # fmt: skip
        self.attn_pool_contrast = LinearPooler(768, 1024, 8, 1)
        self.ln_contrast = nn.LayerNorm(768)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])

    def convert_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bring the checkpoint's position table to this trunk's grid as the reference loader does
        (bilinear to the 14×14 table it builds, then the DINO resize to the input grid)."""
        from timm.layers import resample_abs_pos_embed

        pos = state.get("trunk.pos_embed")
        if pos is None or pos.shape == self.trunk.pos_embed.shape:
            return state
        if pos.shape[1] != 1 + 14 * 14:
            pos = resample_abs_pos_embed(
                pos, new_size=(14, 14), num_prefix_tokens=1, interpolation="bilinear", antialias=False
            )
        grid = self.trunk.patch_embed.grid_size[0]
        return {**state, "trunk.pos_embed": dino_resize_pos_embed(pos, grid)}


# -- CTransPath: timm Swin-T with a convolutional stem ---------------------------------------------------
class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3×3 conv-BN-ReLU, a 1×1 conv, then the norm."""

    def __init__(self, img_size: Any = 224, patch_size: Any = 4, in_chans: int = 3, embed_dim: int = 96,
                 norm_layer: Any = None, output_fmt: str = "NHWC", **_: Any) -> None:  # fmt: skip
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size, self.patch_size = size, (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        c = embed_dim // 8
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
            nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(inplace=True),
            nn.Conv2d(2 * c, embed_dim, 1),
        )  # fmt: skip
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # NHWC, as timm's Swin expects


def build_ctranspath(spec: EncoderSpec) -> nn.Module:
    import timm

    return timm.create_model(spec.arch, pretrained=False, num_classes=0, embed_layer=ConvStem, **spec.kwargs)


def ctranspath_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """CTransPath's timm-0.5 Swin layout (downsample at the end of a stage, mask buffers) → timm's."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(state, model)


# -- transformers ViTs: Phikon (ViT), Phikon-v2 and Midnight (DINOv2), Hibou (DINOv2 + registers) -------
class HFTokens(nn.Module):
    """A ``transformers`` vision model seen as normed tokens (``last_hidden_state``)."""

    def __init__(self, model: nn.Module, n_prefix: int) -> None:
        super().__init__()
        self.model = model
        self.num_prefix_tokens = n_prefix

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state


_HF_CLASSES = {
    "vit": ("ViTConfig", "ViTModel"),
    "dinov2": ("Dinov2Config", "Dinov2Model"),
    "dinov2_with_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel"),
}
_STRUCTURE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "num_register_tokens")


_NOT_CONFIG = {
    "model_type",
    "architectures",
    "transformers_version",
    "auto_map",
    "_name_or_path",
    "torch_dtype",
    "dtype",
}


def _transformers(spec: EncoderSpec) -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise EncoderError(
            f'{spec.name}: needs the transformers library; run `pip install "wsikit[transformers]"`'
        ) from exc
    return transformers


def _hf_config(spec: EncoderSpec, repo_config: dict[str, Any] | None) -> Any:
    """The model config: the repository's own numbers (norm eps, image size) when it ships a
    ``config.json``, after checking its structure against the entry; else the entry's."""
    config_cls = getattr(_transformers(spec), _HF_CLASSES[spec.arch][0])
    values = dict(spec.kwargs)
    if repo_config:
        for key in _STRUCTURE:
            if key in values and key in repo_config and repo_config[key] != values[key]:
                raise EncoderError(
                    f"{spec.name}: the repository's config.json has {key}={repo_config[key]}, the registry "
                    f"{values[key]}; these weights belong to another model (check --weights / the revision)"
                )
        known = set(config_cls().to_dict()) - _NOT_CONFIG
        values = {**values, **{k: v for k, v in repo_config.items() if k in known}}
    return config_cls(**values)


def build_transformers(spec: EncoderSpec, repo_config: dict[str, Any] | None = None) -> HFTokens:
    config = _hf_config(spec, repo_config)
    model_cls = getattr(_transformers(spec), _HF_CLASSES[spec.arch][1])
    extra = {"add_pooling_layer": False} if spec.arch == "vit" else {}
    model = model_cls(config, **extra)
    return HFTokens(model, 1 + int(getattr(config, "num_register_tokens", 0) or 0))
