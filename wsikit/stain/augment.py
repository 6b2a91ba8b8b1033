"""HED stain jitter for training (opt-in; nothing in wsikit applies it unless you construct it).

Tellez et al., "Whole-slide mitosis detection in H&E breast histology using PHH3 as a reference to train
distilled stain-invariant convolutional networks", IEEE TMI 2018: convert RGB to haematoxylin–eosin–DAB
optical densities with Ruifrok & Johnston's matrix, scale and shift each channel per image by
α ~ U(1−σ, 1+σ) and β ~ U(−b, b), convert back. Colour carries diagnostic signal in H&E, so keep σ and b
small (the "HED-light" setting, 0.05, is the default) and use it for training only, never at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wsikit.stain.base import StainError, as_batch, lookup, to_output

RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))  # rows: H, E, DAB


def _od(v: torch.Tensor) -> torch.Tensor:
    return -torch.log((v / 255.0).clamp(min=1e-6))


@dataclass
class HEDJitter:
    """Random per-image HED scaling/shifting of a (B,3,H,W) or (3,H,W) uint8 / float-in-[0,1] tensor.

    ``generator`` makes it reproducible; ``p`` is the probability that an image is jittered at all.
    """

    sigma: float = 0.05
    bias: float = 0.05
    p: float = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.sigma < 1 and 0 <= self.bias < 1 and 0 <= self.p <= 1):
            raise StainError("HEDJitter: use 0 ≤ sigma < 1, 0 ≤ bias < 1 and 0 ≤ p ≤ 1")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x, single = as_batch(batch)
        b, _, h, w = x.shape
        dev = x.device
        rgb_from_hed = torch.tensor(RGB_FROM_HED, dtype=torch.float32, device=dev)
        hed_from_rgb = torch.linalg.inv(rgb_from_hed)
        od = lookup(x.reshape(b, 3, h * w), _od, ("hed_od", 0.0))
        hed = hed_from_rgb.T @ od  # (B,3,N)
        rand = torch.rand((3, b, 3, 1), generator=self.generator).to(dev)
        alpha = 1.0 + self.sigma * (2.0 * rand[0] - 1.0)
        beta = self.bias * (2.0 * rand[1] - 1.0)
        skip = rand[2, :, 0, 0] >= self.p
        alpha = torch.where(skip.view(-1, 1, 1), 1.0, alpha)
        beta = torch.where(skip.view(-1, 1, 1), 0.0, beta)
        y = torch.exp(-(rgb_from_hed.T @ (hed * alpha + beta))).mul_(255.0)
        out = to_output(y, batch.dtype == torch.uint8).view(b, 3, h, w).to(batch.dtype)
        return out[0] if single else out
