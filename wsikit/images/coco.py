"""COCO detection data and COCO's box metric: the json in (``bbox`` = [x, y, w, h] in pixels), a torch
dataset of its images and boxes, and :func:`coco_map` — COCO's box AP (greedy matching by score,
101-point interpolated precision, up to 100 detections per image, ``iscrowd`` boxes ignored as in COCO)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsikit.images.data import read_image

IOU_THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)


class DetectError(ValueError):
    """Unusable detection input; the message names the file and the fix."""


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


def collate(batch):
    return tuple(zip(*batch, strict=True))


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


def _match(ious: np.ndarray, crowd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO's greedy matching of score-ordered detections to one image's boxes at every IoU threshold:
    (true positives, ignored) as (thresholds, detections) booleans; real boxes come before crowd ones."""
    n_t, n_d, n_g = len(IOU_THRESHOLDS), ious.shape[0], ious.shape[1]
    tp = np.zeros((n_t, n_d), dtype=bool)
    ig = np.zeros((n_t, n_d), dtype=bool)
    for t, thr in enumerate(IOU_THRESHOLDS):
        taken = np.zeros(n_g, dtype=bool)
        for di in range(n_d):
            best, best_iou = -1, min(thr, 1 - 1e-10)
            for gi in range(n_g):
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
    return tp, ig


def _class_ap(gt: CocoSet, results: Sequence[dict[str, Any]], cid: int, max_dets: int) -> np.ndarray:
    """One category's AP at every IoU threshold (nan without ground truth)."""
    n_t = len(IOU_THRESHOLDS)
    dets_by: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        if int(r["category_id"]) == cid:
            dets_by.setdefault(int(r["image_id"]), []).append(r)
    scores, matched, ignored, n_gt = [], [], [], 0
    for img in (int(im["id"]) for im in gt.images):
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
        tp, ig = _match(ious, crowd)
        scores += [d["score"] for d in dets]
        matched.append(tp)
        ignored.append(ig)
    if n_gt == 0:
        return np.full(n_t, np.nan)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    tp_all = np.concatenate(matched, axis=1)[:, order] if matched else np.zeros((n_t, 0), bool)
    ig_all = np.concatenate(ignored, axis=1)[:, order] if ignored else np.zeros((n_t, 0), bool)
    aps = np.zeros(n_t)
    for t in range(n_t):
        keep = ~ig_all[t]
        tps = np.cumsum(tp_all[t][keep])
        fps = np.cumsum(~tp_all[t][keep])
        aps[t] = _ap101(tps / n_gt, tps / np.maximum(tps + fps, np.spacing(1)))
    return aps


def coco_map(gt: CocoSet, results: Sequence[dict[str, Any]], max_dets: int = 100) -> dict[str, Any]:
    """COCO box AP (area "all") of ``results`` against ``gt``: ``map_50``, ``map_75``, ``map_50_95``,
    ``ap_50_per_class``, ``ap_50_95_per_class`` (nan for a category without ground truth)."""
    table = np.array([_class_ap(gt, results, cid, max_dets) for cid in gt.category_ids])
    names = gt.category_names

    def mean(a: np.ndarray) -> float:
        return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")

    return {
        "map_50": mean(table[:, 0]),
        "map_75": mean(table[:, 5]),
        "map_50_95": mean(table),
        "ap_50_per_class": {n: float(v) for n, v in zip(names, table[:, 0], strict=True)},
        "ap_50_95_per_class": {n: mean(row) for n, row in zip(names, table, strict=True)},
        "n_images": len(gt.images),
        "n_detections": len(results),
    }


def _ap101(recall: np.ndarray, precision: np.ndarray) -> float:
    """COCO's 101-point interpolated AP (precision made monotone, sampled at recall 0, .01, …, 1)."""
    if recall.size == 0:
        return 0.0
    p = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
    return float(np.where(idx < p.size, p[np.minimum(idx, p.size - 1)], 0.0).mean())
