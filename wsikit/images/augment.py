"""Batched augmentations by imaging domain, applied on the training device to (B, C, H, W) tensors.

Presets (:data:`PRESETS`):

- ``histology``: horizontal and vertical flips and 90° rotations (the dihedral group: tissue has no
  up or left). No colour jitter unless asked (``color=0.1`` …): stain variation is better handled by
  stain normalisation than by random hue shifts that create colours no scanner produces.
- ``xray``: small rotations (±10°), scale (0.9–1.1), shifts (±5 %) and crops; never a vertical flip
  (anatomy has an up) and no horizontal flip by default (the heart is on the left).
- ``none``: identity.

Augmentation runs on float images in [0, 1] *before* normalisation; normalisation always comes from
the encoder's config (:func:`normalize`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PRESETS = ("histology", "xray", "none")


@dataclass(frozen=True)
class Augment:
    """A domain preset with its knobs; call it on a float (B, C, H, W) batch in [0, 1]."""

    preset: str = "none"
    hflip: bool = False
    vflip: bool = False
    rot90: bool = False
    degrees: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    translate: float = 0.0
    color: float = 0.0  # brightness/contrast jitter amplitude (0 = off)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b = x.shape[0]
        g = generator

        def coin() -> torch.Tensor:
            return torch.rand(b, generator=g, device="cpu") < 0.5

        if self.hflip:
            m = coin().to(x.device)
            x = torch.where(m[:, None, None, None], x.flip(-1), x)
        if self.vflip:
            m = coin().to(x.device)
            x = torch.where(m[:, None, None, None], x.flip(-2), x)
        if self.rot90 and x.shape[-1] == x.shape[-2]:
            k = torch.randint(0, 4, (b,), generator=g)
            x = torch.stack([torch.rot90(img, int(ki), dims=(-2, -1)) for img, ki in zip(x, k, strict=True)])
        if self.degrees or self.scale != (1.0, 1.0) or self.translate:
            x = _affine(x, self.degrees, self.scale, self.translate, g)
        if self.color:
            c = self.color
            bright = (torch.rand(b, generator=g) * 2 - 1) * c
            contrast = 1 + (torch.rand(b, generator=g) * 2 - 1) * c
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * contrast.to(x)[:, None, None, None] + mean + bright.to(x)[:, None, None, None]
            x = x.clamp(0, 1)
        return x


def _affine(
    x: torch.Tensor, degrees: float, scale: tuple[float, float], translate: float, g: torch.Generator | None
) -> torch.Tensor:
    """Random rotation/scale/shift per image; borders filled by edge replication (no black corners)."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=g) * 2 - 1) * math.radians(degrees)
    s = torch.empty(b).uniform_(scale[0], scale[1], generator=g) if scale != (1.0, 1.0) else torch.ones(b)
    t = (torch.rand(b, 2, generator=g) * 2 - 1) * 2 * translate  # grid units span 2
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def get_augment(preset: str, color: float = 0.0, hflip: bool | None = None) -> Augment:
    """The named preset; ``color`` adds brightness/contrast jitter, ``hflip`` overrides the preset's."""
    if preset == "histology":
        aug = Augment("histology", hflip=True, vflip=True, rot90=True)
    elif preset == "xray":
        aug = Augment("xray", degrees=10.0, scale=(0.9, 1.1), translate=0.05)
    elif preset == "none":
        aug = Augment("none")
    else:
        raise ValueError(f"augmentation preset {preset!r}: use one of {', '.join(PRESETS)}")
    if hflip is not None:
        aug = Augment(**{**aug.__dict__, "hflip": hflip})
    return Augment(**{**aug.__dict__, "color": color}) if color else aug


def default_preset(channels: int) -> str:
    """``xray`` for grey sets (radiographs), ``histology`` for colour ones; a guess the user can override."""
    return "xray" if channels == 1 else "histology"


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean) / std per channel, with the encoder's mean/std (averaged for a 1-channel input)."""
    c = x.shape[1]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)
    s = torch.tensor(std, dtype=x.dtype, device=x.device)
    if c != len(mean):
        m, s = m.mean().expand(c), s.mean().expand(c)
    return (x - m[None, :, None, None]) / s[None, :, None, None]
