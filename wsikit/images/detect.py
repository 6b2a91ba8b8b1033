"""Object detection on tiles and X-rays: torchvision Faster R-CNN / RetinaNet on registry backbones.

- Data: COCO json in (:func:`load_coco`; ``bbox`` = [x, y, w, h] in pixels), COCO results out
  (:func:`predict_coco`: ``image_id, category_id, bbox, score``).
- Models: :func:`build_detector` puts an FPN on any registry encoder whose network exposes timm's
  ``feature_info`` (ResNets, EfficientNets, …), so ImageNet weights such as ``efficientnet-lite0``
  initialise the backbone. Category ids map to contiguous labels 1..K (0 = background).
- Evaluation: :func:`coco_map` computes COCO's box AP (greedy matching by score, 101-point
  interpolated precision, up to 100 detections per image, ``iscrowd`` boxes ignored as in COCO):
  ``map_50``, ``map_75``, ``map_50_95`` (IoU 0.50:0.05:0.95) and per-category AP.
- :func:`draw_detections` writes predictions (and ground truth) onto the images.
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsikit.encoders.build import get_encoder
from wsikit.images.coco import CocoDataset, CocoSet, DetectError, coco_map, collate
from wsikit.io import jsonable, write_json, write_png, write_text
from wsikit.runtime import read_config_checkpoint, save_checkpoint

ARCHS = ("fasterrcnn", "retinanet")


# -- models --------------------------------------------------------------------------------------------
def _feature_net(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if hasattr(m, "feature_info") and hasattr(m, "forward_features"):
            return m
    raise DetectError(
        f"{type(model).__name__}: this encoder exposes no feature pyramid (timm feature_info); "
        "use a CNN backbone such as efficientnet-lite0, resnet18 or resnet50"
    )


class RegistryBackbone(nn.Module):
    """A registry encoder's feature maps at strides 8/16/32 (hooks on timm's ``feature_info``) + an FPN."""

    def __init__(self, model: nn.Module, out_channels: int = 128, n_levels: int = 3) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.body = _feature_net(model)
        info = list(self.body.feature_info)
        info = [f for f in info if f["reduction"] >= 8][:n_levels] or info[-n_levels:]
        self.level_modules = [f["module"] for f in info]
        modules = dict(self.body.named_modules())
        self._feats: dict[str, torch.Tensor] = {}
        for name in self.level_modules:
            modules[name].register_forward_hook(self._hook(name))
        self.fpn = FeaturePyramidNetwork([f["num_chs"] for f in info], out_channels, LastLevelMaxPool())
        self.out_channels = out_channels
        self.strides = [int(f["reduction"]) for f in info] + [int(info[-1]["reduction"]) * 2]

    def train(self, mode: bool = True) -> RegistryBackbone:
        """Batch-norm statistics of the backbone stay frozen (detection batches are small)."""
        super().train(mode)
        for m in self.body.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def _hook(self, name: str) -> Callable:
        def hook(_module, _inp, output):
            self._feats[name] = output

        return hook

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        self._feats = {}
        self.body.forward_features(x)
        feats = OrderedDict((str(i), self._feats[name]) for i, name in enumerate(self.level_modules))
        self._feats = {}
        return self.fpn(feats)


@dataclass
class DetectorConfig:
    """Everything needed to rebuild a detector from a checkpoint."""

    arch: str = "fasterrcnn"
    backbone: str = "efficientnet-lite0"
    n_classes: int = 1  # foreground categories
    category_ids: list[int] = field(default_factory=lambda: [1])
    category_names: list[str] = field(default_factory=lambda: ["object"])
    min_size: int = 512  # shorter image side the detector resizes to
    max_size: int = 1024
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128)
    fpn_channels: int = 128
    trainable_layers: int = 3  # backbone stages left trainable (from the top); 0 freezes it
    box_head_dim: int = (
        1024  # Faster R-CNN box-head width (torchvision's default; 256 is plenty for small sets)
    )
    rois_per_image: int = 512  # Faster R-CNN proposals sampled per training image for the box head
    proposals: int = 1000  # RPN proposals kept after NMS (train and test)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)


def build_detector(cfg: DetectorConfig, pretrained: bool = True, device: str = "cpu") -> nn.Module:
    """A torchvision Faster R-CNN or RetinaNet on ``cfg.backbone`` from the encoder registry."""
    from torchvision.models.detection import FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    if cfg.arch not in ARCHS:
        raise DetectError(f"architecture {cfg.arch!r}: use one of {', '.join(ARCHS)}")
    enc = get_encoder(cfg.backbone, pretrained=pretrained)
    cfg.mean, cfg.std = tuple(enc.mean), tuple(enc.std)
    backbone = RegistryBackbone(enc.model, cfg.fpn_channels)
    _freeze_lower(backbone.body, cfg.trainable_layers)
    n_maps = len(backbone.strides)
    sizes = tuple(cfg.anchor_sizes)[:n_maps]
    sizes = sizes + tuple(sizes[-1] * 2 ** (i + 1) for i in range(n_maps - len(sizes)))
    common = dict(
        min_size=cfg.min_size, max_size=cfg.max_size, image_mean=list(cfg.mean), image_std=list(cfg.std)
    )
    if cfg.arch == "fasterrcnn":
        anchors = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * n_maps)
        names = [str(i) for i in range(n_maps - 1)]
        model = FasterRCNN(
            backbone,
            rpn_anchor_generator=anchors,
            box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
            box_head=TwoMLPHead(cfg.fpn_channels * 49, cfg.box_head_dim),
            box_predictor=FastRCNNPredictor(cfg.box_head_dim, cfg.n_classes + 1),
            box_batch_size_per_image=cfg.rois_per_image,
            rpn_pre_nms_top_n_train=2 * cfg.proposals,
            rpn_pre_nms_top_n_test=cfg.proposals,
            rpn_post_nms_top_n_train=cfg.proposals,
            rpn_post_nms_top_n_test=cfg.proposals,
            **common,
        )
    else:
        octaves = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes)
        anchors = AnchorGenerator(octaves, ((0.5, 1.0, 2.0),) * n_maps)
        model = RetinaNet(backbone, num_classes=cfg.n_classes + 1, anchor_generator=anchors, **common)
    return model.to(device)


def _freeze_lower(body: nn.Module, trainable: int) -> None:
    """Freeze every parameter before the top ``trainable`` stages of timm's ``feature_info``."""
    stages = [f["module"] for f in body.feature_info]
    names = [n for n, _ in body.named_parameters()]
    first = len(names)
    if trainable >= len(stages):
        first = 0
    elif trainable > 0:
        prefix = stages[len(stages) - trainable] + "."
        first = next((i for i, n in enumerate(names) if n.startswith(prefix)), len(names))
    for i, (_, p) in enumerate(body.named_parameters()):
        p.requires_grad = i >= first


# -- training ------------------------------------------------------------------------------------------
@dataclass
class DetTrainConfig:
    epochs: int = 20
    batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 1e-4
    patience: int = 5  # epochs without a better validation mAP@[.5:.95] before stopping
    seed: int = 0
    num_workers: int = 0
    device: str = "cpu"
    max_iters: int | None = None  # stop after this many optimiser steps in total (quick runs)


@dataclass
class DetTrainResult:
    checkpoint: Path
    history: list[dict[str, float]]
    best: dict[str, Any]


def _cosine_warmup(opt: torch.optim.Optimizer, total: int) -> Any:
    """Linear warm-up over the first tenth (≤ 50 steps), then cosine decay to 0 at step ``total``."""
    warmup = min(50, max(1, total // 10))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )


def _train_epoch(
    model: nn.Module, loader: Any, opt: Any, sched: Any, device: str, steps_left: int
) -> list[float]:
    """One pass (or ``steps_left`` steps) over the training images; returns the step losses."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    for images, targets in loader:
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if len(losses) >= steps_left:
            break
    return losses


def train_detector(
    train: CocoSet,
    val: CocoSet | None,
    cfg: DetectorConfig,
    tcfg: DetTrainConfig,
    out_dir: str | os.PathLike,
    pretrained: bool = True,
    log: Callable[[str], None] = print,
) -> DetTrainResult:
    """Train with AdamW + cosine decay; keep the epoch with the best validation mAP@[.5:.95] (or the last)."""
    torch.manual_seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    out_dir = Path(out_dir)
    cfg.category_ids, cfg.category_names = train.category_ids, train.category_names
    cfg.n_classes = len(train.categories)
    model = build_detector(cfg, pretrained=pretrained, device=tcfg.device)
    loader = torch.utils.data.DataLoader(
        CocoDataset(train, train=True), batch_size=tcfg.batch_size, shuffle=True, collate_fn=collate,
        num_workers=tcfg.num_workers, generator=torch.Generator().manual_seed(tcfg.seed),
    )  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    total = min(tcfg.max_iters or tcfg.epochs * len(loader), tcfg.epochs * len(loader))
    sched = _cosine_warmup(opt, total)
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"map_50_95": -1.0}
    ckpt = out_dir / "detector.pt"
    step, stale = 0, 0
    for epoch in range(tcfg.epochs):
        t0 = time.perf_counter()
        losses = _train_epoch(model, loader, opt, sched, tcfg.device, total - step)
        step += len(losses)
        row: dict[str, float] = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "seconds": time.perf_counter() - t0,
        }
        if val is not None:
            m = coco_map(val, predict_coco(model, val, device=tcfg.device))
            row.update(map_50=m["map_50"], map_50_95=m["map_50_95"])
        history.append(row)
        log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        score = row.get("map_50_95", float(epoch))
        if score > best["map_50_95"] or val is None:
            best, stale = {"epoch": epoch + 1, "map_50_95": score, "map_50": row.get("map_50")}, 0
            save_detector(model, cfg, ckpt)
        elif (stale := stale + 1) >= tcfg.patience:
            log(f"early stop: no better validation mAP for {tcfg.patience} epochs")
            break
        if step >= total:
            break
    write_json(out_dir / "history.json", {"history": history, "best": best, "config": asdict(cfg)})
    return DetTrainResult(ckpt, history, best)


def save_detector(model: nn.Module, cfg: DetectorConfig, path: str | os.PathLike) -> Path:
    """Write the detector's config and weights (atomically)."""
    return save_checkpoint(path, {"config": asdict(cfg), "state_dict": model.state_dict()})


def load_detector(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, DetectorConfig]:
    """A detector saved by :func:`train_detector` (no weight download: the checkpoint holds them all)."""
    ckpt, cfg = read_config_checkpoint(
        path, DetectorConfig, DetectError, "train one with wsikit detect train", device
    )
    model = build_detector(cfg, pretrained=False, device=device)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), cfg


# -- prediction and evaluation -------------------------------------------------------------------------
@torch.inference_mode()
def predict_coco(
    model: nn.Module, coco: CocoSet, device: str = "cpu", batch_size: int = 4, score_threshold: float = 0.0
) -> list[dict[str, Any]]:
    """COCO results (``image_id, category_id, bbox [x,y,w,h], score``) for every image of ``coco``."""
    was_training = model.training
    model.eval()
    ds = CocoDataset(coco)
    cat_of = dict(enumerate(coco.category_ids, start=1))
    results = []
    for start in range(0, len(ds), batch_size):
        idx = range(start, min(start + batch_size, len(ds)))
        outs = model([ds[i][0].to(device) for i in idx])
        for i, o in zip(idx, outs, strict=True):
            image_id = int(coco.images[i]["id"])
            for box, label, score in zip(
                o["boxes"].cpu().tolist(), o["labels"].tolist(), o["scores"].tolist(), strict=True
            ):
                if score < score_threshold or label not in cat_of:
                    continue
                x0, y0, x1, y1 = box
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": cat_of[label],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": score,
                    }
                )
    model.train(was_training)
    return results


# -- pictures ------------------------------------------------------------------------------------------
def draw_detections(
    image: np.ndarray,
    results: Sequence[dict[str, Any]],
    names: dict[int, str],
    out_path: str | os.PathLike,
    gt: Sequence[dict[str, Any]] = (),
    score_threshold: float = 0.3,
) -> Path:
    """Write ``image`` with ground truth (green, thin) and predictions above ``score_threshold``
    (red, with category and score) to a PNG."""
    import cv2

    img = np.ascontiguousarray(image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)).copy()
    for a in gt:
        x, y, w, h = (round(v) for v in a["bbox"])
        cv2.rectangle(img, (x, y), (x + w, y + h), (0, 200, 0), 1)
    scale = max(0.3, min(img.shape[:2]) / 800)
    for r in results:
        if r["score"] < score_threshold:
            continue
        x, y, w, h = (round(v) for v in r["bbox"])
        cv2.rectangle(img, (x, y), (x + w, y + h), (230, 0, 0), 1 + int(scale > 0.6))
        text = f"{names.get(int(r['category_id']), r['category_id'])} {r['score']:.2f}"
        cv2.putText(
            img, text, (x, max(8, y - 2)), cv2.FONT_HERSHEY_SIMPLEX, scale, (230, 0, 0), 1, cv2.LINE_AA
        )
    return write_png(out_path, img)


def evaluate_detector(
    checkpoint: str | os.PathLike,
    coco: CocoSet,
    out_dir: str | os.PathLike,
    device: str = "cpu",
    n_draw: int = 16,
    score_threshold: float = 0.3,
) -> dict[str, Any]:
    """Predict ``coco``'s images, score them (:func:`coco_map`) and write ``predictions.json`` (COCO
    results), ``detection_report.json``/``.md`` and ``drawn/<image>.png`` for the first ``n_draw`` images."""
    model, cfg = load_detector(checkpoint, device)
    results = predict_coco(model, coco, device=device)
    metrics = coco_map(coco, results)
    metrics.update(arch=cfg.arch, backbone=cfg.backbone, checkpoint=str(checkpoint))
    out_dir = Path(out_dir)
    write_json(out_dir / "predictions.json", results)
    write_json(out_dir / "detection_report.json", jsonable(metrics))
    lines = ["# Detection results", "", f"{metrics['n_images']} images, {cfg.arch} on {cfg.backbone}", ""]
    lines += ["| category | AP@0.5 | AP@[.5:.95] |", "|---|---|---|"]
    for n in coco.category_names:
        lines.append(
            f"| {n} | {metrics['ap_50_per_class'][n]:.4f} | {metrics['ap_50_95_per_class'][n]:.4f} |"
        )
    lines.append(f"| **mean** | {metrics['map_50']:.4f} | {metrics['map_50_95']:.4f} |")
    write_text(out_dir / "detection_report.md", "\n".join(lines) + "\n")
    ds = CocoDataset(coco)
    names = dict(zip(coco.category_ids, coco.category_names, strict=True))
    for i, info in enumerate(coco.images[:n_draw]):
        mine = [r for r in results if r["image_id"] == int(info["id"])]
        draw_detections(
            ds.image(i), mine, names, out_dir / "drawn" / f"{Path(info['file_name']).stem}.png",
            gt=coco.annotations_of(info["id"]), score_threshold=score_threshold,
        )  # fmt: skip
    return metrics
