"""Training slide-level models: one fold (with early stopping, checkpoints, calibration) and k-fold runs.

Fold directory (in a run directory, see :mod:`wsikit.mil.cv`)::

    <run>/config.json            the TrainConfig, classes, data and bag provenance
    <run>/splits.csv             patient-level folds (reused when the run is resumed)
    <run>/fold_<k>/best.pt       best validation epoch, with temperature and threshold fitted on validation
    <run>/fold_<k>/last.pt       last epoch incl. optimizer state (resume point)
    <run>/fold_<k>/result.json   the fold is trained (calibrated, threshold chosen)
    <run>/fold_<k>/predictions_{val,test}.csv, report.md, roc/pr/reliability PNGs
    <run>/fold_<k>/report.json   written last: the fold is done
    <run>/predictions_oof.csv    out-of-fold validation predictions of every slide
    <run>/predictions_test.csv   held-out test: ensemble of the folds
    <run>/report.{json,md}       per-fold mean ± std, test ensemble with bootstrap CIs; PNGs for the test set

Per epoch the whole training fold is seen once, one bag per step (``accumulate`` bags per optimizer step),
in an order drawn from (seed, epoch), so a resumed fold continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from wsikit import __version__
from wsikit.io import jsonable, write_json
from wsikit.metrics import MetricError, auroc_metric, choose_threshold, fit_temperature
from wsikit.mil.data import BagDataset, first_item
from wsikit.mil.evaluate import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    predict_logits,
)
from wsikit.mil.registry import ModelSpec, build_model
from wsikit.runtime import resolve_device, save_checkpoint


class TrainError(ValueError):
    """Bad training options or a run directory that does not match them."""


@dataclass
class TrainConfig:
    """Every training choice; stored in the run and in each checkpoint."""

    model: str = "abmil-gated"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 50
    lr: float = 2e-4
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | plateau | none
    patience: int = 10  # epochs without validation improvement before stopping
    min_epochs: int = 5
    monitor: str = "loss"  # loss | auroc (validation)
    balance: str = "loss"  # loss (class-weighted CE) | sampler (balanced sampling) | none
    accumulate: int = 1  # bags per optimizer step
    max_tiles: int | None = None  # random subsample of larger training bags (None: all tiles)
    folds: int = 5
    test_fraction: float = 0.0
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    threshold: str = "youden"  # youden | sensitivity | specificity
    target: float = 0.9  # the sensitivity/specificity target
    calibrate: bool = True  # temperature scaling on the validation fold
    bootstrap: int = 1000

    def check(self) -> None:
        choices = {
            "schedule": ("cosine", "plateau", "none"),
            "monitor": ("loss", "auroc"),
            "balance": ("loss", "sampler", "none"),
            "threshold": ("youden", "sensitivity", "specificity"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise TrainError(f"{key}={getattr(self, key)!r}: choose one of {', '.join(allowed)}")
        if self.epochs < 1 or self.patience < 1 or self.accumulate < 1 or self.lr <= 0:
            raise TrainError("epochs, patience and accumulate must be >= 1 and lr > 0")


RUNTIME_KEYS = ("device", "num_workers", "bootstrap")  # may change when a run is resumed


def train_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The options that change the trained models (what a resumed run must share)."""
    return {k: v for k, v in config.items() if k not in RUNTIME_KEYS}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights n / (C · n_c), so every class carries the same total weight."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    if (counts == 0).any():
        raise TrainError(
            f"a training fold lacks class(es) {np.flatnonzero(counts == 0).tolist()}; use fewer folds"
        )
    return torch.tensor(len(y) / (n_classes * counts), dtype=torch.float32)


def _epoch_order(y: np.ndarray, cfg: TrainConfig, epoch: int) -> list[int]:
    rng = np.random.default_rng([cfg.seed, epoch])
    if cfg.balance == "sampler":
        w = 1.0 / np.bincount(y)[y]
        return rng.choice(len(y), size=len(y), replace=True, p=w / w.sum()).tolist()
    return rng.permutation(len(y)).tolist()


def _scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer) -> Any:
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.lr * 0.01)
    if cfg.schedule == "plateau":
        mode = "min" if cfg.monitor == "loss" else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode=mode, factor=0.5, patience=max(1, cfg.patience // 3)
        )
    return None


@dataclass
class _FoldRun:
    """One fold's model, optimiser and loop state while it trains."""

    cfg: TrainConfig
    model: Any
    opt: torch.optim.Optimizer
    sched: Any
    device: torch.device
    weight: torch.Tensor | None
    meta: dict[str, Any]
    state: dict[str, Any] = field(
        default_factory=lambda: {"epoch": 0, "best": None, "best_epoch": -1, "bad_epochs": 0, "history": []}
    )

    def resume(self, last: Path) -> None:
        """Continue from ``last.pt`` (made with the same options and slides, else refused)."""
        ckpt = torch.load(last, map_location=self.device, weights_only=True)
        if (
            train_fingerprint(ckpt.get("train_config", {})) != train_fingerprint(self.meta["train_config"])
            or ckpt.get("train_slides") != self.meta["train_slides"]
        ):
            raise TrainError(f"{last}: made with other options or slides; use a new --out or --overwrite")
        self.model.load_state_dict(ckpt["state_dict"])
        self.opt.load_state_dict(ckpt["optimizer"])
        if self.sched is not None:
            self.sched.load_state_dict(ckpt["scheduler"])
        self.state = ckpt["state"]

    def train_epoch(self, train_ds: BagDataset, y_train: np.ndarray, epoch: int) -> float:
        """One pass over the training fold (``accumulate`` bags per step); returns the mean loss."""
        cfg, model, opt = self.cfg, self.model, self.opt
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        train_ds.set_epoch(epoch)
        order = _epoch_order(y_train, cfg, epoch)
        loader = DataLoader(
            train_ds, batch_size=1, sampler=order, num_workers=cfg.num_workers, collate_fn=first_item
        )
        model.train()
        opt.zero_grad(set_to_none=True)
        bag_weight = float(getattr(model, "bag_weight", 1.0))
        total, steps = 0.0, 0
        for step, item in enumerate(loader):
            label = torch.tensor([item["label"]], device=self.device)
            out = model(item["features"].to(self.device), label=item["label"], coords=item["coords"])
            loss = bag_weight * F.cross_entropy(out.logits[None].float(), label, weight=self.weight)
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            (loss / cfg.accumulate).backward()
            if (step + 1) % cfg.accumulate == 0 or step + 1 == len(y_train):
                opt.step()
                opt.zero_grad(set_to_none=True)
            total += float(loss.detach())
            steps += 1
        return total / max(steps, 1)

    def validate(self, val_ds: BagDataset, y_val: np.ndarray) -> tuple[float, float, float]:
        """(validation loss, AUROC, the monitored value; the loss where AUROC is undefined)."""
        logits = predict_logits(self.model, val_ds, self.device, self.cfg.num_workers)
        weight = None if self.weight is None else self.weight.cpu()
        val_loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_val), weight=weight))
        val_auroc = auroc_metric(y_val, torch.softmax(torch.from_numpy(logits), 1).numpy())
        value = val_loss if self.cfg.monitor == "loss" else val_auroc
        if not math.isfinite(value):  # e.g. AUROC of a one-class validation fold: fall back to the loss
            value = val_loss if self.cfg.monitor == "loss" else -val_loss
        return val_loss, val_auroc, value

    def step(self, epoch: int, value: float, fold_dir: Path) -> bool:
        """Keep ``best.pt`` when ``value`` improved, step the schedule; returns whether it improved."""
        best, loss = self.state["best"], self.cfg.monitor == "loss"
        improved = best is None or (value < best - 1e-6 if loss else value > best + 1e-6)
        if improved:
            self.state.update(best=value, best_epoch=epoch, bad_epochs=0)
            save_checkpoint(
                fold_dir / "best.pt",
                {**self.meta, "state_dict": self.model.state_dict(), "epoch": epoch, "monitor": value},
            )
        else:
            self.state["bad_epochs"] += 1
        if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.sched.step(value)
        elif self.sched is not None:
            self.sched.step()
        return improved

    def save_last(self, last: Path) -> None:
        scheduler = self.sched.state_dict() if self.sched is not None else {}
        save_checkpoint(
            last,
            {**self.meta, "state_dict": self.model.state_dict(), "optimizer": self.opt.state_dict(),
             "scheduler": scheduler, "state": jsonable(self.state)},
        )  # fmt: skip


def _start_fold(
    cfg: TrainConfig,
    train_ds: BagDataset,
    val_ds: BagDataset,
    class_names: Sequence[str],
    in_dim: int,
    provenance: dict[str, Any] | None,
) -> _FoldRun:
    """A fold's model (seeded), optimiser, schedule, class weights and checkpoint metadata."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    spec = ModelSpec(cfg.model, in_dim, len(class_names), dict(cfg.model_kwargs))
    model = build_model(spec.name, in_dim, len(class_names), **spec.kwargs).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    y_train = np.asarray(train_ds.labels)
    weight = class_weights(y_train, len(class_names)).to(device) if cfg.balance == "loss" else None
    meta = {
        "format": CHECKPOINT_FORMAT,
        "model": spec.to_dict(),
        "class_names": list(class_names),
        "label_map": {c: i for i, c in enumerate(class_names)},
        "train_config": jsonable(asdict(cfg)),
        "provenance": jsonable(provenance or {}),
        "train_slides": list(train_ds.slide_ids),
        "val_slides": list(val_ds.slide_ids),
        "wsikit_version": __version__,
    }
    return _FoldRun(cfg, model, opt, _scheduler(cfg, opt), device, weight, meta)


def train_fold(
    cfg: TrainConfig,
    train_ds: BagDataset,
    val_ds: BagDataset,
    class_names: Sequence[str],
    in_dim: int,
    fold_dir: str | os.PathLike,
    provenance: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train one fold with early stopping; returns (and writes) its ``result.json``.

    Resumes from ``last.pt`` when present. The best epoch's weights go to ``best.pt`` together with the
    temperature fitted on the validation logits and the threshold chosen on the calibrated validation
    probabilities (binary problems).
    """
    cfg.check()
    fold_dir = Path(fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    y_train, y_val = np.asarray(train_ds.labels), np.asarray(val_ds.labels)
    run = _start_fold(cfg, train_ds, val_ds, class_names, in_dim, provenance)
    last = fold_dir / "last.pt"
    if last.is_file():
        run.resume(last)
    for epoch in range(run.state["epoch"], cfg.epochs):
        if run.state["bad_epochs"] >= cfg.patience and epoch >= cfg.min_epochs:
            break
        train_loss = run.train_epoch(train_ds, y_train, epoch)
        val_loss, val_auroc, value = run.validate(val_ds, y_val)
        improved = run.step(epoch, value, fold_dir)
        record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_auroc": val_auroc,
                  "lr": run.opt.param_groups[0]["lr"], "improved": improved}  # fmt: skip
        run.state["history"].append(record)
        run.state["epoch"] = epoch + 1
        run.save_last(last)
        if on_epoch is not None:
            on_epoch(record)
    return _finish_fold(fold_dir, cfg, val_ds, y_val, class_names, run.state, run.device)


def _finish_fold(
    fold_dir: Path,
    cfg: TrainConfig,
    val_ds: BagDataset,
    y_val: np.ndarray,
    class_names: Sequence[str],
    state: dict[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    """Calibrate the best model on validation, choose the threshold, store both in ``best.pt``."""
    best_path = fold_dir / "best.pt"
    ckpt = torch.load(best_path, map_location="cpu", weights_only=True)
    fold_model = load_checkpoint(best_path, device)
    logits = predict_logits(fold_model.model, val_ds, device, cfg.num_workers)
    temperature = fit_temperature(logits, y_val) if cfg.calibrate else 1.0
    probs = torch.softmax(torch.from_numpy(logits) / temperature, 1).numpy()
    warnings = []
    threshold = None
    if len(class_names) == 2:
        try:
            threshold = choose_threshold(y_val, probs[:, 1], cfg.threshold, cfg.target)
        except MetricError:
            threshold = 0.5
            warnings.append("validation fold has one class only: threshold 0.5")
    ckpt.update(temperature=temperature, threshold=threshold, threshold_method=cfg.threshold)
    save_checkpoint(best_path, ckpt)
    result = {
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"],
        "monitor": cfg.monitor,
        "best_value": state["best"],
        "temperature": temperature,
        "threshold": threshold,
        "warnings": warnings,
        "history": state["history"],
    }
    write_json(fold_dir / "result.json", jsonable(result))
    return result
