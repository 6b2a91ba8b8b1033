"""Train, evaluate and apply patch/X-ray classifiers; k-fold cross-validation.

Modes (``TrainConfig.mode``):

- ``transfer``: two phases: the backbone frozen (batch-norm statistics too) while the head learns at
  ``head_lr`` for ``head_epochs``, then the whole network at ``lr`` with cosine decay.
- ``finetune``: the whole pretrained network at ``lr`` from the start.
- ``scratch``: random initialisation (``pretrained=False``), whole network at ``lr``.

Imbalance (``TrainConfig.imbalance``): ``weights`` (loss weighted by N / (K·n_k); multi-label: BCE
``pos_weight`` = negatives / positives), ``sampler`` (``WeightedRandomSampler``, class-balanced
batches), ``focal`` (focal loss, γ = ``focal_gamma``, class-weighted α) or ``none``.

Selection uses only the validation split: the epoch with the best validation AUROC (or loss) is kept,
training stops after ``patience`` epochs without improvement, and the temperature (calibration) and
decision threshold are fitted on validation logits and stored in the checkpoint; scoring is in
:mod:`wsikit.images.evaluate`.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsikit import metrics as M
from wsikit.images.augment import default_preset, get_augment
from wsikit.images.data import ImageSet, kfold_set, split_set
from wsikit.images.evaluate import (
    ImageTensors,
    evaluate_classifier,
    evaluate_logits,
    predict_logits,
    prepare_batch,
    probabilities,
)
from wsikit.images.models import Classifier, build_classifier, save_classifier
from wsikit.images.settings import ModelConfig, TrainConfig
from wsikit.io import write_json, write_text
from wsikit.reports import write_report
from wsikit.runtime import resolve_device, save_checkpoint

MODES = ("transfer", "finetune", "scratch")
IMBALANCE = ("weights", "sampler", "focal", "none")


class TrainError(ValueError):
    """A training setting that cannot work; the message says what to change."""


@dataclass
class TrainResult:
    checkpoint: Path
    history: list[dict[str, Any]]
    best_epoch: int
    val_metrics: dict[str, Any]
    temperature: float
    threshold: float | list[float] | None
    seconds: float = 0.0
    class_counts: dict[str, int] = field(default_factory=dict)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


# -- losses --------------------------------------------------------------------------------------------
class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): soft-max for single-label, sigmoid for multi-label; α = class weights."""

    def __init__(
        self, gamma: float = 2.0, alpha: torch.Tensor | None = None, multilabel: bool = False
    ) -> None:
        super().__init__()
        self.gamma, self.multilabel = gamma, multilabel
        self.register_buffer("alpha", alpha if alpha is not None else torch.empty(0))

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            y = y.float()
            ce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
            p_t = torch.exp(-ce)
            a = (
                1.0
                if not self.alpha.numel()
                else torch.where(y > 0, self.alpha / (1 + self.alpha), 1 / (1 + self.alpha))
            )
            return (a * (1 - p_t) ** self.gamma * ce).mean()
        logp = F.log_softmax(logits.float(), dim=1).gather(1, y.view(-1, 1))[:, 0]
        loss = -((1 - logp.exp()) ** self.gamma) * logp
        if self.alpha.numel():
            w = self.alpha[y]
            return (w * loss).sum() / w.sum()
        return loss.mean()


def class_weights(data: ImageSet) -> torch.Tensor:
    """N / (K · n_k) per class (multi-label: negatives / positives per label, the BCE ``pos_weight``)."""
    if data.multilabel:
        pos = data.labels.sum(0).astype(np.float64)
        return torch.tensor((len(data) - pos) / np.maximum(pos, 1), dtype=torch.float32)
    counts = np.bincount(data.labels, minlength=data.n_classes).astype(np.float64)
    if (counts == 0).any():
        missing = [n for n, c in zip(data.class_names, counts, strict=True) if c == 0]
        raise TrainError(
            f"{data.source}: no training images of class(es) {missing}; fix the split or the labels"
        )
    return torch.tensor(len(data) / (len(counts) * counts), dtype=torch.float32)


def make_loss(data: ImageSet, cfg: TrainConfig) -> nn.Module:
    if cfg.imbalance not in IMBALANCE:
        raise TrainError(f"imbalance {cfg.imbalance!r}: use one of {', '.join(IMBALANCE)}")
    w = class_weights(data) if cfg.imbalance in ("weights", "focal") else None
    if cfg.imbalance == "focal":
        return FocalLoss(cfg.focal_gamma, w, data.multilabel)
    if data.multilabel:
        return nn.BCEWithLogitsLoss(pos_weight=w)
    return nn.CrossEntropyLoss(weight=w)


def _loader(ds: ImageTensors, cfg: TrainConfig, train: bool, seed: int) -> torch.utils.data.DataLoader:
    sampler = None
    if train and cfg.imbalance == "sampler":
        if ds.data.multilabel:
            raise TrainError(
                "--imbalance sampler needs single-label data; use weights or focal for multi-label"
            )
        counts = np.bincount(ds.data.labels, minlength=ds.data.n_classes)
        weights = 1.0 / counts[ds.data.labels]
        sampler = torch.utils.data.WeightedRandomSampler(
            torch.as_tensor(weights, dtype=torch.double), len(ds), replacement=True,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
    return torch.utils.data.DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train and len(ds) > cfg.batch_size,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=cfg.num_workers > 0,
    )


def _val_score(data: ImageSet, logits: np.ndarray, loss_fn: nn.Module) -> tuple[float, float]:
    y = torch.as_tensor(data.labels)
    loss = float(loss_fn(torch.as_tensor(logits), y.float() if data.multilabel else y))
    if data.multilabel:
        p = probabilities(logits, True)
        auroc = M.nanmean([M.binary_auroc(data.labels[:, k], p[:, k]) for k in range(p.shape[1])])
    else:
        auroc = M.auroc_metric(data.labels, probabilities(logits, False))
    return auroc, loss


# -- training ------------------------------------------------------------------------------------------
def _set_backbone_frozen(model: Classifier, frozen: bool) -> None:
    model.backbone.requires_grad_(not frozen)
    if frozen:
        model.backbone.eval()  # batch-norm running statistics stay the pretrained ones


@dataclass
class _Run:
    """A classifier's training loop state: model, loss, augmentation, loader, optimiser and history."""

    cfg: TrainConfig
    mcfg: ModelConfig
    model: Classifier
    loss_fn: nn.Module
    aug: Any
    loader: torch.utils.data.DataLoader
    device: torch.device
    head_epochs: int
    log: Callable[[str], None]
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"score": -math.inf, "epoch": 0})
    best_state: Any = None
    epoch: int = 0
    stale: int = 0
    phase: str = "full"

    def __post_init__(self) -> None:
        self.phase = "head" if self.head_epochs else "full"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cfg.amp and self.device.type == "cuda")
        self.opt, self.sched = self.make_opt(self.phase)

    def make_opt(self, phase: str) -> tuple[torch.optim.Optimizer, Any]:
        """AdamW with cosine decay over the phase: the head alone (``head``) or the whole network."""
        cfg = self.cfg
        if phase == "head":
            params, lr, n = self.model.head.parameters(), cfg.head_lr, self.head_epochs
        else:
            params, lr, n = self.model.parameters(), cfg.lr, cfg.epochs - self.head_epochs
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        steps = max(1, n * len(self.loader))
        return opt, torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        )

    def resume(self, last: Path) -> None:
        """Continue from ``last.pt``: weights, optimiser, schedule, history and the random state."""
        ck = torch.load(last, map_location=self.device, weights_only=False)
        self.model.load_state_dict(ck["state_dict"])
        self.epoch, self.history, self.best, self.stale, self.phase = (
            ck["epoch"], ck["history"], ck["best"], ck["stale"], ck["phase"],
        )  # fmt: skip
        self.opt, self.sched = self.make_opt(self.phase)
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.best_state = ck.get("best_state")
        torch.set_rng_state(ck["rng"])
        self.log(f"resumed from {last} after epoch {self.epoch}")

    def train_epoch(self, multilabel: bool) -> list[float]:
        """One pass over the training images (the head alone while the backbone is frozen)."""
        model, cfg, device, scaler = self.model, self.cfg, self.device, self.scaler
        model.train()
        _set_backbone_frozen(model, self.phase == "head")
        losses = []
        for x, y in self.loader:
            x = prepare_batch(x, self.mcfg, device, self.aug)
            y = y.to(device)
            with torch.autocast(device.type, enabled=cfg.amp and device.type == "cuda"):
                logits = model(x)
            loss = self.loss_fn(logits.float(), y.float() if multilabel else y)
            self.opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            scaler.step(self.opt)
            scaler.update()
            if not scaler.is_enabled() or scaler.get_scale() >= scale:  # AMP skips steps with inf gradients
                self.sched.step()
            losses.append(float(loss.detach()))
        return losses

    def record(self, row: dict[str, Any], score: float) -> bool:
        """Add an epoch's row; keep its weights when ``score`` is the best so far."""
        self.history.append(row)
        improved = math.isfinite(score) and score > self.best["score"]
        if improved:
            self.best, self.stale = {"score": score, "epoch": row["epoch"]}, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
        elif self.phase == "full":
            self.stale += 1
        return improved

    def save_last(self, path: Path) -> None:
        save_checkpoint(
            path,
            {
                "state_dict": self.model.state_dict(), "epoch": self.epoch, "history": self.history,
                "best": self.best, "stale": self.stale, "phase": self.phase, "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "best_state": self.best_state, "rng": torch.get_rng_state(),
            },
        )  # fmt: skip


def _start(
    train: ImageSet,
    mcfg: ModelConfig,
    cfg: TrainConfig,
    weights: str | os.PathLike | None,
    log: Callable[[str], None],
) -> _Run:
    """Seed, build the model (registry or ``weights``), the loss, augmentation and loader."""
    if cfg.mode not in MODES:
        raise TrainError(f"mode {cfg.mode!r}: use one of {', '.join(MODES)}")
    if cfg.monitor not in ("auroc", "loss"):
        raise TrainError(f"monitor {cfg.monitor!r}: use auroc or loss")
    _seed_all(cfg.seed)
    device = resolve_device(cfg.device)
    mcfg.class_names = list(train.class_names)
    mcfg.multilabel = train.multilabel
    model = build_classifier(mcfg, pretrained=cfg.mode != "scratch", weights=weights, device=str(device))
    log("training images per class: " + ", ".join(f"{k} {v}" for k, v in train.class_counts().items()))
    loss_fn = make_loss(train, cfg).to(device)
    preset = default_preset(train.channels) if cfg.augment == "auto" else cfg.augment
    aug = get_augment(preset, color=cfg.color_jitter) if preset != "none" else None
    loader = _loader(ImageTensors(train, mcfg.input_size, mcfg.in_chans), cfg, True, cfg.seed)
    head_epochs = min(cfg.head_epochs, cfg.epochs) if cfg.mode == "transfer" else 0
    return _Run(cfg, mcfg, model, loss_fn, aug, loader, device, head_epochs, log)


def train_classifier(
    train: ImageSet,
    val: ImageSet,
    mcfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train on ``train``, select on ``val``; writes ``best.pt``, ``last.pt`` and ``history.json``.

    ``weights``: a local checkpoint for the encoder, used instead of its registry weights."""
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    run = _start(train, mcfg, cfg, weights, log)
    last_path = out_dir / "last.pt"
    if cfg.resume and last_path.is_file():
        run.resume(last_path)
    for epoch in range(run.epoch, cfg.epochs):
        if epoch == run.head_epochs and run.phase == "head":
            run.phase = "full"
            run.opt, run.sched = run.make_opt("full")
        t0 = time.perf_counter()
        losses = run.train_epoch(train.multilabel)
        val_logits = predict_logits(run.model, val, mcfg, run.device)
        auroc, vloss = _val_score(val, val_logits, run.loss_fn.cpu())
        run.loss_fn.to(run.device)
        row = {
            "epoch": epoch + 1, "phase": run.phase, "train_loss": float(np.mean(losses)), "val_loss": vloss,
            "val_auroc": auroc, "seconds": round(time.perf_counter() - t0, 2),
        }  # fmt: skip
        improved = run.record(row, auroc if cfg.monitor == "auroc" else -vloss)
        log(
            f"epoch {epoch + 1}/{cfg.epochs} [{run.phase}] train loss {row['train_loss']:.4f} val loss {vloss:.4f} "
            f"val AUROC {auroc:.4f} ({row['seconds']:.0f}s){' *' if improved else ''}"
        )
        run.epoch = epoch + 1
        run.save_last(last_path)
        if run.stale >= cfg.patience:
            log(f"early stop: validation {cfg.monitor} did not improve for {cfg.patience} epochs")
            break
        if cfg.max_minutes is not None and time.perf_counter() - t_start > 60 * cfg.max_minutes:
            log(f"time budget: stopping after epoch {epoch + 1} ({cfg.max_minutes:g} min)")
            break
    return _finish(run, val, out_dir, train.class_counts(), time.perf_counter() - t_start)


def _finish(run: _Run, val: ImageSet, out_dir: Path, counts: dict[str, int], seconds: float) -> TrainResult:
    """The best epoch's model calibrated on validation, saved as ``best.pt`` with ``history.json``."""
    model, mcfg, cfg = run.model, run.mcfg, run.cfg
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    val_logits = predict_logits(model, val, mcfg, run.device)
    temperature, threshold = calibrate(val_logits, val, cfg.threshold_method)
    val_metrics = evaluate_logits(val_logits, val, temperature, threshold)
    ckpt = save_classifier(
        model, mcfg, out_dir / "best.pt", temperature=temperature, threshold=threshold,
        best_epoch=run.best["epoch"], train_config=asdict(cfg), class_counts=counts,
    )  # fmt: skip
    write_json(
        out_dir / "history.json",
        {"history": run.history, "best_epoch": run.best["epoch"], "temperature": temperature,
         "threshold": threshold, "seconds": seconds, "train_config": asdict(cfg), "model_config": asdict(mcfg)},
    )  # fmt: skip
    return TrainResult(
        ckpt, run.history, run.best["epoch"], val_metrics, temperature, threshold, seconds, counts
    )


def calibrate(
    logits: np.ndarray, val: ImageSet, method: str = "youden"
) -> tuple[float, float | list[float] | None]:
    """Temperature (single-label) and decision threshold(s) fitted on validation logits.

    Binary: one threshold on the calibrated P(class 1). Multi-label: one threshold per label (no
    temperature). Multi-class: no threshold (arg-max).
    """
    if val.multilabel:
        p = probabilities(logits, True)
        thr = []
        for k in range(p.shape[1]):
            y = val.labels[:, k]
            thr.append(M.choose_threshold(y, p[:, k], method) if 0 < y.sum() < len(y) else 0.5)
        return 1.0, thr
    t = M.fit_temperature(logits, val.labels)
    if val.n_classes != 2:
        return t, None
    p1 = probabilities(logits, False, t)[:, 1]
    if len(np.unique(val.labels)) < 2:
        return t, 0.5
    return t, M.choose_threshold(val.labels, p1, method)


# -- splits and cross-validation -----------------------------------------------------------------------
def fit(
    data: ImageSet,
    mcfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    image_level: bool = False,
    log: Callable[[str], None] = print,
    n_boot: int = 1000,
    weights: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Split (patient-level when possible), train, and evaluate on the test split if there is one.

    ``weights``: a local checkpoint for the encoder, used instead of its registry weights."""
    parts = split_set(data, val_fraction, test_fraction, cfg.seed, image_level)
    out_dir = Path(out_dir)
    _write_split(out_dir / "split.csv", data, parts)
    log(f"split: {len(parts['train'])} train / {len(parts['val'])} val / {len(parts['test'])} test images")
    res = train_classifier(
        data.subset(parts["train"]), data.subset(parts["val"]), mcfg, cfg, out_dir, weights, log=log
    )
    out: dict[str, Any] = {"checkpoint": str(res.checkpoint), "best_epoch": res.best_epoch, "seconds": res.seconds,
                           "val": res.val_metrics}  # fmt: skip
    if len(parts["test"]):
        out["test"] = evaluate_classifier(
            res.checkpoint, data.subset(parts["test"]), out_dir, "test", cfg.device, n_boot
        )
    return out


def _write_split(path: Path, data: ImageSet, parts: dict[str, np.ndarray]) -> None:
    rows = ["image,patient_id,split"]
    for split, idx in parts.items():
        for i in idx:
            pat = "" if data.patients is None else str(data.patients[i])
            rows.append(f"{data.names[i]},{pat},{split}")
    write_text(path, "\n".join(rows) + "\n")


def cross_validate(
    data: ImageSet,
    mcfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    k: int = 5,
    test_fraction: float = 0.0,
    image_level: bool = False,
    log: Callable[[str], None] = print,
    weights: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """k patient-level folds: each fold trains on k-1 parts (an inner patient-level split picks the
    epoch, temperature and threshold) and is scored on its held-out part; ``summary`` is mean ± std.
    ``weights``: a local checkpoint for the encoder, used instead of its registry weights."""
    folds = kfold_set(data, k, cfg.seed, test_fraction, image_level)
    out_dir = Path(out_dir)
    fold_metrics, test_metrics = [], []
    for i, f in enumerate(folds):
        log(f"fold {i + 1}/{k}: {len(f.train)} train / {len(f.val)} held-out / {len(f.test)} test")
        sub = data.subset(f.train)
        sub.split = None
        inner = split_set(sub, 1.0 / max(2, k - 1), 0.0, cfg.seed + i, image_level)
        fold_dir = out_dir / f"fold{i}"
        res = train_classifier(
            sub.subset(inner["train"]),
            sub.subset(inner["val"]),
            copy.deepcopy(mcfg),
            cfg,
            fold_dir,
            weights,
            log=log,
        )
        fold_metrics.append(
            evaluate_classifier(res.checkpoint, data.subset(f.val), fold_dir, "heldout", cfg.device, 0, 0)
        )
        if len(f.test):
            test_metrics.append(
                evaluate_classifier(res.checkpoint, data.subset(f.test), fold_dir, "test", cfg.device, 0, 0)
            )
    summary: dict[str, Any] = {"k": k, "heldout": M.summarize_folds(fold_metrics)}
    if test_metrics:
        summary["test"] = M.summarize_folds(test_metrics)
    write_report(summary, out_dir, name="cv_report", title=f"{k}-fold cross-validation")
    return summary
