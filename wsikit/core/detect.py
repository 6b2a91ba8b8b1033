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

import json
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

from wsikit.jobs import atomic_path, write_json
from wsikit.metrics import jsonable

ARCHS = ("fasterrcnn", "retinanet")
IOU_THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)


class DetectError(ValueError):
    """Unusable detection input; the message names the file and the fix."""


# -- COCO data -----------------------------------------------------------------------------------------
@dataclass
class CocoSet:
    """A COCO detection file: ``images``, ``annotations``, ``categories`` plus where the images are."""

    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    root: Path
    source: str = ""

    @property
    def category_ids(self) -> list[int]:
        return [int(c["id"]) for c in self.categories]

    @property
    def category_names(self) -> list[str]:
        return [str(c["name"]) for c in self.categories]

    def annotations_of(self, image_id: int) -> list[dict[str, Any]]:
        if not hasattr(self, "_by_image"):
            by: dict[int, list[dict[str, Any]]] = {}
            for a in self.annotations:
                by.setdefault(int(a["image_id"]), []).append(a)
            self._by_image = by
        return self._by_image.get(int(image_id), [])

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images, "annotations": self.annotations, "categories": self.categories}


def load_coco(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> CocoSet:
    """Read a COCO detection json; image ``file_name``s are relative to ``image_root`` (default: its folder)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DetectError(
            f"{path}: cannot read COCO json ({exc}); pass a file with images/annotations/categories"
        ) from exc
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise DetectError(
            f"{path}: not COCO detection json (no {', '.join(missing)}); export boxes in COCO format"
        )
    if not data["categories"]:
        raise DetectError(f"{path}: no categories; list at least one {{'id': 1, 'name': ...}}")
    ids = {int(c["id"]) for c in data["categories"]}
    for a in data["annotations"]:
        if int(a["category_id"]) not in ids:
            raise DetectError(
                f"{path}: annotation {a.get('id')} has category_id {a['category_id']} not in categories"
            )
        if len(a["bbox"]) != 4 or a["bbox"][2] <= 0 or a["bbox"][3] <= 0:
            raise DetectError(f"{path}: annotation {a.get('id')} bbox {a['bbox']} is not [x, y, w>0, h>0]")
    root = Path(image_root) if image_root else path.parent
    return CocoSet(data["images"], data["annotations"], data["categories"], root, str(path))


class CocoDataset(torch.utils.data.Dataset):
    """(image float [0,1] (3,H,W), target) pairs for torchvision detectors; crowd boxes are left out."""

    def __init__(self, coco: CocoSet, train: bool = False, vflip: bool = True) -> None:
        self.coco = coco
        self.train = train
        self.vflip = vflip
        self.label_of = {cid: i + 1 for i, cid in enumerate(coco.category_ids)}

    def __len__(self) -> int:
        return len(self.coco.images)

    def image(self, i: int) -> np.ndarray:
        from wsikit.core.data import read_image

        path = self.coco.root / self.coco.images[i]["file_name"]
        if not path.is_file():
            raise DetectError(f"{self.coco.source}: image {path} does not exist; pass --images <folder>")
        img = read_image(path)
        return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        info = self.coco.images[i]
        img = torch.from_numpy(np.array(self.image(i))).permute(2, 0, 1).float() / 255.0
        anns = [a for a in self.coco.annotations_of(info["id"]) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([_xyxy(a["bbox"]) for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.label_of[int(a["category_id"])] for a in anns], dtype=torch.int64)
        if self.train:  # flips keep boxes exact; valid for tiles and (horizontal only) for most X-ray tasks
            h, w = img.shape[1:]
            if torch.rand(1) < 0.5:
                img = img.flip(-1)
                boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
            if self.vflip and torch.rand(1) < 0.5:
                img = img.flip(-2)
                boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
        return img, {"boxes": boxes, "labels": labels, "image_id": torch.tensor(int(info["id"]))}


def _xyxy(b: Sequence[float]) -> list[float]:
    return [float(b[0]), float(b[1]), float(b[0] + b[2]), float(b[1] + b[3])]


def _collate(batch):
    return tuple(zip(*batch, strict=True))


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

    from wsikit.encoders import get_encoder

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
    cfg.category_ids, cfg.category_names, cfg.n_classes = (
        train.category_ids,
        train.category_names,
        len(train.categories),
    )
    model = build_detector(cfg, pretrained=pretrained, device=tcfg.device)
    loader = torch.utils.data.DataLoader(
        CocoDataset(train, train=True),
        batch_size=tcfg.batch_size,
        shuffle=True,
        collate_fn=_collate,
        num_workers=tcfg.num_workers,
        generator=torch.Generator().manual_seed(tcfg.seed),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    total = (
        tcfg.epochs * len(loader)
        if tcfg.max_iters is None
        else min(tcfg.max_iters, tcfg.epochs * len(loader))
    )
    warmup = min(50, max(1, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"map_50_95": -1.0}
    ckpt = out_dir / "detector.pt"
    step, stale = 0, 0
    for epoch in range(tcfg.epochs):
        model.train()
        t0, losses = time.perf_counter(), []
        for images, targets in loader:
            images = [im.to(tcfg.device) for im in images]
            targets = [{k: v.to(tcfg.device) for k, v in t.items()} for t in targets]
            loss = sum(model(images, targets).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
            if step >= total:
                break
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
            best = {"epoch": epoch + 1, "map_50_95": score, "map_50": row.get("map_50")}
            save_detector(model, cfg, ckpt)
            stale = 0
        else:
            stale += 1
            if stale >= tcfg.patience:
                log(f"early stop: no better validation mAP for {tcfg.patience} epochs")
                break
        if step >= total:
            break
    write_json(out_dir / "history.json", {"history": history, "best": best, "config": asdict(cfg)})
    return DetTrainResult(ckpt, history, best)


def save_detector(model: nn.Module, cfg: DetectorConfig, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        torch.save({"config": asdict(cfg), "state_dict": model.state_dict()}, tmp)
    return Path(path)


def load_detector(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, DetectorConfig]:
    """A detector saved by :func:`train_detector` (no weight download: the checkpoint holds them all)."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        cfg = DetectorConfig(**ckpt["config"])
    except (OSError, KeyError, TypeError, RuntimeError) as exc:
        raise DetectError(
            f"{path}: not a wsikit detector checkpoint ({exc}); train one with wsikit detect train"
        ) from exc
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


def _iou(dets: np.ndarray, gts: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """(D, G) IoU of xywh boxes; for crowd gts the union is the detection's area (COCO's rule)."""
    if not len(dets) or not len(gts):
        return np.zeros((len(dets), len(gts)))
    d, g = dets[:, None, :], gts[None, :, :]
    iw = np.clip(
        np.minimum(d[..., 0] + d[..., 2], g[..., 0] + g[..., 2]) - np.maximum(d[..., 0], g[..., 0]), 0, None
    )
    ih = np.clip(
        np.minimum(d[..., 1] + d[..., 3], g[..., 1] + g[..., 3]) - np.maximum(d[..., 1], g[..., 1]), 0, None
    )
    inter = iw * ih
    da, ga = d[..., 2] * d[..., 3], g[..., 2] * g[..., 3]
    union = np.where(crowd[None, :], da, da + ga - inter)
    return inter / np.maximum(union, 1e-12)


def coco_map(gt: CocoSet, results: Sequence[dict[str, Any]], max_dets: int = 100) -> dict[str, Any]:
    """COCO box AP (area "all") of ``results`` against ``gt``: ``map_50``, ``map_75``, ``map_50_95``,
    ``ap_50_per_class``, ``ap_50_95_per_class`` (nan for a category without ground truth)."""
    image_ids = [int(im["id"]) for im in gt.images]
    n_t = len(IOU_THRESHOLDS)
    per_class: dict[int, np.ndarray] = {}
    for cid in gt.category_ids:
        dets_by: dict[int, list[dict[str, Any]]] = {}
        for r in results:
            if int(r["category_id"]) == cid:
                dets_by.setdefault(int(r["image_id"]), []).append(r)
        scores, matched, ignored = [], [], []
        n_gt = 0
        for img in image_ids:
            anns = [a for a in gt.annotations_of(img) if int(a["category_id"]) == cid]
            anns.sort(key=lambda a: bool(a.get("iscrowd", 0)))  # real boxes first, crowd last
            crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
            n_gt += int((~crowd).sum())
            dets = sorted(dets_by.get(img, []), key=lambda r: -r["score"])[:max_dets]
            ious = _iou(
                np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4),
                np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
                crowd,
            )
            tp = np.zeros((n_t, len(dets)), dtype=bool)
            ig = np.zeros((n_t, len(dets)), dtype=bool)
            for t, thr in enumerate(IOU_THRESHOLDS):
                taken = np.zeros(len(anns), dtype=bool)
                for di in range(len(dets)):
                    best, best_iou = -1, min(thr, 1 - 1e-10)
                    for gi in range(len(anns)):
                        if taken[gi] and not crowd[gi]:
                            continue
                        if best > -1 and not crowd[best] and crowd[gi]:
                            break  # a real match beats any crowd region
                        if ious[di, gi] < best_iou:
                            continue
                        best, best_iou = gi, ious[di, gi]
                    if best > -1:
                        taken[best] = True
                        ig[t, di] = crowd[best]
                        tp[t, di] = not crowd[best]
            scores += [d["score"] for d in dets]
            matched.append(tp)
            ignored.append(ig)
        if n_gt == 0:
            per_class[cid] = np.full(n_t, np.nan)
            continue
        s = np.asarray(scores, dtype=np.float64)
        order = np.argsort(-s, kind="mergesort")
        tp_all = np.concatenate(matched, axis=1)[:, order] if matched else np.zeros((n_t, 0), bool)
        ig_all = np.concatenate(ignored, axis=1)[:, order] if ignored else np.zeros((n_t, 0), bool)
        aps = np.zeros(n_t)
        for t in range(n_t):
            keep = ~ig_all[t]
            tps = np.cumsum(tp_all[t][keep])
            fps = np.cumsum(~tp_all[t][keep])
            aps[t] = _ap101(tps / n_gt, tps / np.maximum(tps + fps, np.spacing(1)))
        per_class[cid] = aps
    table = np.array([per_class[c] for c in gt.category_ids])
    names = gt.category_names

    def mean(a: np.ndarray) -> float:
        return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")

    return {
        "map_50": mean(table[:, 0]),
        "map_75": mean(table[:, 5]),
        "map_50_95": mean(table),
        "ap_50_per_class": {n: float(v) for n, v in zip(names, table[:, 0], strict=True)},
        "ap_50_95_per_class": {n: mean(row) for n, row in zip(names, table, strict=True)},
        "n_images": len(image_ids),
        "n_detections": len(results),
    }


def _ap101(recall: np.ndarray, precision: np.ndarray) -> float:
    """COCO's 101-point interpolated AP (precision made monotone, sampled at recall 0, .01, …, 1)."""
    if recall.size == 0:
        return 0.0
    p = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
    return float(np.where(idx < p.size, p[np.minimum(idx, p.size - 1)], 0.0).mean())


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
    _, png = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    with atomic_path(out_path, suffix=".png") as tmp:
        tmp.write_bytes(png.tobytes())
    return Path(out_path)


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
    with atomic_path(out_dir / "detection_report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    ds = CocoDataset(coco)
    names = dict(zip(coco.category_ids, coco.category_names, strict=True))
    for i, info in enumerate(coco.images[:n_draw]):
        mine = [r for r in results if r["image_id"] == int(info["id"])]
        draw_detections(
            ds.image(i), mine, names, out_dir / "drawn" / f"{Path(info['file_name']).stem}.png",
            gt=coco.annotations_of(info["id"]), score_threshold=score_threshold,
        )  # fmt: skip
    return metrics
