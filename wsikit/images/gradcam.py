"""Grad-CAM (Selvaraju et al. 2017): where a classifier looked, as a heat map over each image.

The target layer defaults to the last convolutional feature map with a side of at least 4 cells
(for a 224-px EfficientNet/ResNet that is the final 7×7 map; for a 28-px MedMNIST model an earlier
stage, since the last one is 2×2). Maps are ReLU(Σ_k mean(∂y_c/∂A_k) · A_k), upsampled to the image
and scaled to [0, 1] per image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsikit.io import atomic_path


def find_target_layer(model: nn.Module, example: torch.Tensor, min_side: int = 4) -> nn.Module:
    """The last module (in execution order) whose output is a (B, C, H, W) map with min(H, W) ≥ min_side."""
    seen: list[tuple[nn.Module, tuple[int, ...]]] = []
    hooks = [
        m.register_forward_hook(
            lambda mod, _i, o: seen.append((mod, tuple(o.shape))) if torch.is_tensor(o) else None
        )
        for m in model.modules()
        if not list(m.children())
    ]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    maps = [(m, s) for m, s in seen if len(s) == 4]
    if not maps:
        raise ValueError(f"{type(model).__name__}: no convolutional feature map for Grad-CAM")
    big = [m for m, s in maps if min(s[2:]) >= min_side]
    return big[-1] if big else maps[-1][0]


def gradcam(
    model: nn.Module, x: torch.Tensor, target: Sequence[int] | None = None, layer: nn.Module | None = None
) -> np.ndarray:
    """(B, H, W) Grad-CAM maps in [0, 1] for classes ``target`` (default: each image's predicted class)."""
    was_training = model.training
    model.eval()
    layer = layer or find_target_layer(model, x)
    store: dict[str, torch.Tensor] = {}

    def hook(_m, _i, out):
        out.retain_grad()
        store["act"] = out

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)  # gradients must flow even through a frozen stem
            logits = model(x)
            cls = logits.argmax(1) if target is None else torch.as_tensor(target, device=logits.device)
            model.zero_grad(set_to_none=True)
            logits.gather(1, cls.view(-1, 1)).sum().backward()
    finally:
        handle.remove()
        model.train(was_training)
    act, grad = store["act"].detach(), store["act"].grad.detach()
    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = cam.flatten(1).min(1).values[:, None, None]
    hi = cam.flatten(1).max(1).values[:, None, None]
    return ((cam - lo) / (hi - lo).clamp_min(1e-8)).cpu().numpy()


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``image`` (H, W[, 3]) uint8 with the map in the jet colour map blended on top (RGB uint8)."""
    import cv2

    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    cam = cv2.resize(cam.astype(np.float32), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat = cv2.cvtColor(cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return (rgb * (1 - alpha) + heat * alpha).clip(0, 255).astype(np.uint8)


def save_gradcam_grid(
    images: Sequence[np.ndarray], cams: Sequence[np.ndarray], titles: Sequence[str], path: str | os.PathLike
) -> Path:
    """A PNG with each image above its Grad-CAM overlay, titled (e.g. ``true → predicted p``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(n, 8)
    rows = 2 * int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.1 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (img, cam, title) in enumerate(zip(images, cams, titles, strict=True)):
        r, c = 2 * (i // cols), i % cols
        axes[r, c].imshow(img, cmap="gray" if img.ndim == 2 else None)
        axes[r, c].set_title(title, fontsize=7)
        axes[r + 1, c].imshow(overlay(img, cam))
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)
