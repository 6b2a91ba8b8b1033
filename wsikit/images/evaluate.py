"""Apply and score patch/X-ray classifiers: inference, shared metrics, reports, predictions, Grad-CAM.

Probabilities are calibrated with the temperature stored in the checkpoint; binary decisions use the
validation-chosen threshold stored there too. Metrics, reports and curves come from
:mod:`wsikit.metrics`, the same functions the slide-level models use.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsikit import metrics as M
from wsikit.images.augment import Augment, normalize
from wsikit.images.data import ImageSet
from wsikit.images.gradcam import gradcam, save_gradcam_grid
from wsikit.images.models import Classifier, load_classifier
from wsikit.images.settings import ModelConfig
from wsikit.io import write_text
from wsikit.reports import plot_roc_pr_reliability, write_report
from wsikit.runtime import resolve_device


class EvaluateError(ValueError):
    """Data that a checkpoint cannot score; the message says what to change."""


# -- images to tensors -----------------------------------------------------------------------------------
def _to_channels(img: np.ndarray, chans: int) -> np.ndarray:
    if img.ndim == 2:
        return img[None] if chans == 1 else np.repeat(img[None], 3, axis=0)
    img = img.transpose(2, 0, 1)
    if chans == 3:
        return img
    w = np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None, None]  # ITU-R 601 luma
    return (img * w).sum(0, keepdims=True).round().astype(np.uint8)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    if img.shape[0] == size and img.shape[1] == size:
        return img
    interp = cv2.INTER_AREA if min(img.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


class ImageTensors(torch.utils.data.Dataset):
    """uint8 (C, S, S) images of an :class:`ImageSet` resized to the model's input (square resize)."""

    def __init__(self, data: ImageSet, size: int, chans: int, cache_bytes: int = 2 << 30) -> None:
        self.data, self.size, self.chans = data, size, chans
        self.cache: torch.Tensor | None = None
        self.file_cache: dict[int, torch.Tensor] | None = None
        if isinstance(data.images, np.ndarray):  # in-memory sets are converted once
            self.cache = torch.from_numpy(np.stack([self._convert(i) for i in range(len(data))]))
        elif len(data) * chans * size * size <= cache_bytes:
            self.file_cache = {}  # files are decoded once per process and kept resized

    def _convert(self, i: int) -> np.ndarray:
        return np.ascontiguousarray(_to_channels(_resize(self.data.load(i), self.size), self.chans))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None:
            x = self.cache[i]
        elif self.file_cache is not None:
            if i not in self.file_cache:
                self.file_cache[i] = torch.from_numpy(self._convert(i))
            x = self.file_cache[i]
        else:
            x = torch.from_numpy(self._convert(i))
        return x, torch.as_tensor(self.data.labels[i])


# -- inference -----------------------------------------------------------------------------------------
def prepare_batch(
    x: torch.Tensor, mcfg: ModelConfig, device: torch.device, aug: Augment | None = None
) -> torch.Tensor:
    x = x.to(device, non_blocking=True).float().div_(255.0)
    if aug is not None:
        x = aug(x)
    return normalize(x, mcfg.norm_mean, mcfg.norm_std)


@torch.inference_mode()
def predict_logits(
    model: Classifier,
    data: ImageSet,
    mcfg: ModelConfig,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
) -> np.ndarray:
    """(N, C) logits of every image of ``data`` (preprocessing from the checkpoint's config)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    ds = ImageTensors(data, mcfg.input_size, mcfg.in_chans)
    out = []
    for x, _ in torch.utils.data.DataLoader(ds, batch_size=batch_size):
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            out.append(model(prepare_batch(x, mcfg, device)).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, mcfg.n_classes), np.float32)


def probabilities(logits: np.ndarray, multilabel: bool, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    return 1.0 / (1.0 + np.exp(-z)) if multilabel else M.softmax_t(z)


# -- which images to score -----------------------------------------------------------------------------
def scoring_split(
    data: ImageSet, split: str | None = None, include_training: bool = False, where: str = "the data"
) -> tuple[ImageSet, str, list[str]]:
    """The images to score, their name and notes to show. Data with splits: ``test`` by default (said in a
    note); ``all`` or ``train`` score training images only with ``include_training`` (and a warning note:
    if they trained the model, the scores are optimistic). Data without splits: every image."""
    if data.split is None:
        if split not in (None, "all"):
            raise EvaluateError(f"{where}: has no split column/folders; drop --split")
        return data, "eval", []
    names = list(dict.fromkeys(str(s) for s in data.split))
    if split is None:
        if "test" not in names:
            raise EvaluateError(f"{where}: has splits {', '.join(names)} but no test split; pass --split")
        split, note = (
            "test",
            f"scoring split 'test' ({int((data.split == 'test').sum())} of {len(data)} images); --split all scores every split",
        )
    else:
        note = ""
    if split != "all" and split not in names:
        raise EvaluateError(f"{where}: no split {split!r}; it has {', '.join(names)} (or --split all)")
    chosen = data if split == "all" else data.subset(np.flatnonzero(data.split == split))
    training = int((chosen.split == "train").sum())
    if training and not include_training:
        raise EvaluateError(
            f"{where}: --split {split} scores {training} images of the 'train' split; if they trained this model "
            "the scores are optimistic. Score --split test, or pass --include-training-images to do it anyway"
        )
    notes = [note] if note else []
    if training:
        notes.append(
            f"{training} of these {len(chosen)} images are the data's training split: if they trained this model, the scores are optimistic"
        )
    return chosen, "eval" if split == "all" else split, notes


# -- evaluation ----------------------------------------------------------------------------------------
def evaluate_logits(
    logits: np.ndarray, data: ImageSet, temperature: float = 1.0, threshold: Any = None, n_boot: int = 0
) -> dict[str, Any]:
    """Shared metrics (:func:`wsikit.metrics.evaluate_predictions`) of calibrated probabilities, plus
    the uncalibrated ECE/NLL, the temperature and (``n_boot`` > 0) bootstrap CIs of AUROC and
    balanced accuracy. Multi-label sets get one binary evaluation per label under ``labels``."""
    if data.multilabel:
        p = probabilities(logits, True)
        per = {}
        for k, name in enumerate(data.class_names):
            thr = threshold[k] if threshold is not None else None
            per[name] = M.evaluate_predictions(data.labels[:, k], p[:, k], ["absent", name], thr)
        aurocs = [per[n]["auroc"] for n in data.class_names]
        return {"n": len(data), "auroc_macro": M.nanmean(aurocs), "labels": per}
    probs = probabilities(logits, False, temperature)
    out = M.evaluate_predictions(data.labels, probs, data.class_names, threshold)
    if data.n_classes == 2 and threshold is not None:
        out["accuracy_at_0.5"] = float((M.predict_labels(probs, 0.5) == data.labels).mean())
    raw = probabilities(logits, False, 1.0)
    out.update(temperature=temperature, ece_uncalibrated=M.expected_calibration_error(raw, data.labels),
               nll_uncalibrated=M.nll(raw, data.labels))  # fmt: skip
    if n_boot:
        _warn_small_sample(data)
        out["auroc_ci"] = M.bootstrap_ci(data.labels, probs, n=n_boot)
        bal = lambda y, p: M.evaluate_predictions(y, p, threshold=threshold)["balanced_accuracy"]  # noqa: E731
        out["balanced_accuracy_ci"] = M.bootstrap_ci(data.labels, probs, bal, n=min(n_boot, 300))
    return out


#: Fewer images than this in the smaller class: bootstrap CIs of AUROC say little (and can read [1, 1]).
MIN_CI_CASES = 10


def _warn_small_sample(data: ImageSet) -> None:
    counts = np.bincount(np.asarray(data.labels, np.int64), minlength=data.n_classes)
    if len(data) and counts.min() < MIN_CI_CASES:
        per = ", ".join(f"{n} {c}" for n, c in zip(counts.tolist(), data.class_names, strict=True))
        warnings.warn(
            f"confidence intervals from {len(data)} images ({per}) say little: fewer than {MIN_CI_CASES} in a "
            "class; score more images",
            UserWarning,
            stacklevel=3,
        )


def evaluate_classifier(
    checkpoint: str | os.PathLike,
    data: ImageSet,
    out_dir: str | os.PathLike,
    name: str = "test",
    device: str = "auto",
    n_boot: int = 1000,
    n_gradcam: int = 16,
) -> dict[str, Any]:
    """Score ``data`` with a checkpoint's calibration and threshold; write ``<name>_report.json/.md``,
    ROC/PR/reliability PNGs, ``<name>_predictions.csv`` and ``<name>_gradcam.png``."""
    dev = resolve_device(device)
    model, mcfg, meta = load_classifier(checkpoint, str(dev))
    if list(data.class_names) != list(mcfg.class_names):
        data = _align_classes(data, mcfg.class_names)
    logits = predict_logits(model, data, mcfg, dev)
    result = evaluate_logits(logits, data, meta.get("temperature", 1.0), meta.get("threshold"), n_boot)
    result.update(checkpoint=str(checkpoint), encoder=mcfg.encoder, weights_id=mcfg.weights_id, split=name)
    out_dir = Path(out_dir)
    write_report(result, out_dir, name=f"{name}_report", title=f"{name}: {Path(checkpoint).name}")
    probs = probabilities(logits, mcfg.multilabel, meta.get("temperature", 1.0))
    if not mcfg.multilabel:
        plot_roc_pr_reliability(data.labels, probs, mcfg.class_names, out_dir, prefix=f"{name}_")
    write_predictions(
        out_dir / f"{name}_predictions.csv", data.names, probs, mcfg, meta.get("threshold"), data.labels
    )
    if n_gradcam:
        gradcam_sample(model, mcfg, data, out_dir / f"{name}_gradcam.png", n_gradcam, dev, probs)
    return result


def _align_classes(data: ImageSet, names: list[str]) -> ImageSet:
    missing = sorted(set(data.class_names) - set(names))
    if missing:
        raise EvaluateError(f"{data.source}: classes {missing} are unknown to the model (trained on {names})")
    remap = np.array([names.index(n) for n in data.class_names])
    return replace(data, labels=remap[data.labels], class_names=list(names))


def write_predictions(
    path: Path,
    names: list[str],
    probs: np.ndarray,
    mcfg: ModelConfig,
    threshold: Any,
    labels: np.ndarray | None = None,
) -> Path:
    """CSV: ``image, [label,] predicted, p_<class>…`` (binary: predicted at the validation threshold)."""
    if mcfg.multilabel:
        thr = np.asarray(threshold if threshold is not None else [0.5] * mcfg.n_classes)
        pred = [
            ";".join(n for n, on in zip(mcfg.class_names, row >= thr, strict=True) if on) for row in probs
        ]
    else:
        pred = [mcfg.class_names[i] for i in M.predict_labels(probs, threshold)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "image",
            *(["label"] if labels is not None else []),
            "predicted",
            *(f"p_{n}" for n in mcfg.class_names),
        ]
    )
    for i, name in enumerate(names):
        lab = []
        if labels is not None:
            lab = (
                [";".join(n for n, v in zip(mcfg.class_names, labels[i], strict=True) if v)]
                if mcfg.multilabel
                else [mcfg.class_names[labels[i]]]
            )
        w.writerow([name, *lab, pred[i], *(f"{v:.6f}" for v in probs[i])])
    return write_text(path, buf.getvalue())


def gradcam_sample(
    model: Classifier,
    mcfg: ModelConfig,
    data: ImageSet,
    path: Path,
    n: int,
    device: torch.device,
    probs: np.ndarray,
) -> Path:
    """Grad-CAM for ``n`` images spread over the classes (predicted class), one PNG grid."""
    rng = np.random.default_rng(0)
    labels = data.labels if not data.multilabel else data.labels.argmax(1)
    per_class = [rng.permutation(np.flatnonzero(labels == k)).tolist() for k in range(mcfg.n_classes)]
    idx: list[int] = []
    while len(idx) < min(n, len(data)) and any(per_class):
        for lst in per_class:
            if lst and len(idx) < n:
                idx.append(lst.pop())
    ds = ImageTensors(data.subset(idx), mcfg.input_size, mcfg.in_chans)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    cams = gradcam(model, prepare_batch(x, mcfg, device))
    images = [img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0) for img in x.numpy()]
    titles = []
    for i in idx:
        k = int(probs[i].argmax())
        titles.append(f"{mcfg.class_names[labels[i]][:12]} → {mcfg.class_names[k][:12]} {probs[i][k]:.2f}")
    return save_gradcam_grid(images, cams, titles, path)


def predict_images(
    checkpoint: str | os.PathLike, data: ImageSet, out_csv: str | os.PathLike, device: str = "auto"
) -> np.ndarray:
    """Calibrated probabilities for unlabelled or labelled images, written to ``out_csv``."""
    dev = resolve_device(device)
    model, mcfg, meta = load_classifier(checkpoint, str(dev))
    probs = probabilities(
        predict_logits(model, data, mcfg, dev), mcfg.multilabel, meta.get("temperature", 1.0)
    )
    write_predictions(Path(out_csv), data.names, probs, mcfg, meta.get("threshold"))
    return probs
