"""Training slide-level models: one fold (with early stopping, checkpoints, calibration) and k-fold runs.

Run directory::

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
from wsikit.jobs import atomic_path, write_json
from wsikit.metrics import (
    MetricError,
    auroc_metric,
    choose_threshold,
    fit_temperature,
    jsonable,
    summarize_folds,
)
from wsikit.mil.data import BagDataset, LabelsTable, check_training_data, first_item
from wsikit.mil.evaluate import (
    CHECKPOINT_FORMAT,
    headline_keys,
    load_checkpoint,
    plot_roc_pr_reliability,
    predict_logits,
    resolve_device,
    score_predictions,
    write_markdown,
    write_predictions_csv,
)
from wsikit.mil.registry import ModelSpec, build_model
from wsikit.splits import Fold, assert_no_leak, load_splits, patient_kfold, save_splits


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


def _fingerprint(config: dict[str, Any]) -> dict[str, Any]:
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


def _save(path: Path, obj: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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
    device = resolve_device(cfg.device)
    n_classes = len(class_names)
    y_train, y_val = np.asarray(train_ds.labels), np.asarray(val_ds.labels)
    seed_everything(cfg.seed)
    spec = ModelSpec(cfg.model, in_dim, n_classes, dict(cfg.model_kwargs))
    model = build_model(spec.name, in_dim, n_classes, **spec.kwargs).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "cosine":
        sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.lr * 0.01)
    elif cfg.schedule == "plateau":
        mode = "min" if cfg.monitor == "loss" else "max"
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode=mode, factor=0.5, patience=max(1, cfg.patience // 3)
        )
    else:
        sched = None
    weight = class_weights(y_train, n_classes).to(device) if cfg.balance == "loss" else None
    bag_weight = float(getattr(model, "bag_weight", 1.0))
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
    state = {"epoch": 0, "best": None, "best_epoch": -1, "bad_epochs": 0, "history": []}
    last = fold_dir / "last.pt"
    if last.is_file():
        ckpt = torch.load(last, map_location=device, weights_only=True)
        if (
            _fingerprint(ckpt.get("train_config", {})) != _fingerprint(meta["train_config"])
            or ckpt.get("train_slides") != meta["train_slides"]
        ):
            raise TrainError(f"{last}: made with other options or slides; use a new --out or --overwrite")
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None:
            sched.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]

    for epoch in range(state["epoch"], cfg.epochs):
        if state["bad_epochs"] >= cfg.patience and epoch >= cfg.min_epochs:
            break
        torch.manual_seed(cfg.seed * 100_003 + epoch)
        train_ds.set_epoch(epoch)
        loader = DataLoader(
            train_ds,
            batch_size=1,
            sampler=_epoch_order(y_train, cfg, epoch),
            num_workers=cfg.num_workers,
            collate_fn=first_item,
        )
        model.train()
        opt.zero_grad(set_to_none=True)
        total, steps = 0.0, 0
        for step, item in enumerate(loader):
            label = torch.tensor([item["label"]], device=device)
            out = model(item["features"].to(device), label=item["label"], coords=item["coords"])
            loss = bag_weight * F.cross_entropy(out.logits[None].float(), label, weight=weight)
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            (loss / cfg.accumulate).backward()
            if (step + 1) % cfg.accumulate == 0 or step + 1 == len(y_train):
                opt.step()
                opt.zero_grad(set_to_none=True)
            total += float(loss.detach())
            steps += 1
        val_logits = predict_logits(model, val_ds, device, cfg.num_workers)
        val_loss = float(
            F.cross_entropy(
                torch.from_numpy(val_logits),
                torch.from_numpy(y_val),
                weight=None if weight is None else weight.cpu(),
            )
        )
        val_auroc = auroc_metric(y_val, torch.softmax(torch.from_numpy(val_logits), 1).numpy())
        value = val_loss if cfg.monitor == "loss" else val_auroc
        best = state["best"]
        if not math.isfinite(value):  # e.g. AUROC of a one-class validation fold: fall back to the loss
            value = val_loss if cfg.monitor == "loss" else -val_loss
        if best is None:
            improved = True
        else:
            improved = value < best - 1e-6 if cfg.monitor == "loss" else value > best + 1e-6
        if improved:
            state.update(best=value, best_epoch=epoch, bad_epochs=0)
            _save(
                fold_dir / "best.pt",
                {**meta, "state_dict": model.state_dict(), "epoch": epoch, "monitor": value},
            )
        else:
            state["bad_epochs"] += 1
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(value if math.isfinite(value) else val_loss)
        elif sched is not None:
            sched.step()
        record = {
            "epoch": epoch,
            "train_loss": total / max(steps, 1),
            "val_loss": val_loss,
            "val_auroc": val_auroc,
            "lr": opt.param_groups[0]["lr"],
            "improved": improved,
        }
        state["history"].append(record)
        state["epoch"] = epoch + 1
        _save(
            last,
            {
                **meta,
                "state_dict": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else {},
                "state": jsonable(state),
            },
        )
        if on_epoch is not None:
            on_epoch(record)

    return _finish_fold(fold_dir, cfg, val_ds, y_val, class_names, state, device)


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
    _save(best_path, ckpt)
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


# -- k-fold runs ---------------------------------------------------------------------------------------
def make_folds(
    cfg: TrainConfig,
    table: LabelsTable,
    run_dir: Path,
    splits_file: str | os.PathLike | None = None,
    test_ids: Sequence[str] | None = None,
) -> list[Fold]:
    """Folds for the run: the run's own ``splits.csv`` when resuming, else a given file, else new ones."""
    own = run_dir / "splits.csv"
    if own.is_file():
        folds = load_splits(own, table.slide_ids)
    elif splits_file is not None:
        folds = load_splits(splits_file, table.slide_ids)
    else:
        test_idx = None
        if test_ids is not None:
            index = {s: i for i, s in enumerate(table.slide_ids)}
            unknown = [s for s in test_ids if s not in index]
            if unknown:
                raise TrainError(f"{len(unknown)} test slide(s) have no bag or label (e.g. {unknown[0]})")
            test_idx = [index[s] for s in test_ids]
        folds = patient_kfold(table.labels, table.patients, cfg.folds, cfg.seed, cfg.test_fraction, test_idx)
    assert_no_leak(table.patients, folds)
    save_splits(folds, table.slide_ids, own, table.patients, table.labels)
    return folds


def run_cv(
    cfg: TrainConfig,
    table: LabelsTable,
    bag_paths: Sequence[Path],
    in_dim: int,
    run_dir: str | os.PathLike,
    provenance: dict[str, Any] | None = None,
    splits_file: str | os.PathLike | None = None,
    test_ids: Sequence[str] | None = None,
    only_folds: Sequence[int] | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train and evaluate every fold (or ``only_folds``: one job per fold on a cluster, then a final call
    without it gathers the report); finished folds are skipped, interrupted ones resume."""
    cfg.check()
    check_training_data(table, bag_paths)  # every unusable bag named before any fold starts
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "train": asdict(cfg),
        "class_names": table.class_names,
        "labels": str(table.path),
        "provenance": provenance or {},
    }
    config_path = run_dir / "config.json"
    if config_path.is_file():
        import json

        old = json.loads(config_path.read_text())
        same = _fingerprint(old.get("train", {})) == _fingerprint(jsonable(asdict(cfg)))
        if not same or old.get("class_names") != table.class_names:
            raise TrainError(
                f"{run_dir}: holds a run with other options or classes; use a new --out or --overwrite"
            )
    write_json(config_path, jsonable(config))
    folds = make_folds(cfg, table, run_dir, splits_file, test_ids)
    y = table.y
    names = table.class_names
    ids = np.asarray(table.slide_ids, dtype=object)

    def dataset(idx: np.ndarray, train: bool = False) -> BagDataset:
        return BagDataset(
            [bag_paths[i] for i in idx], y[idx], ids[idx].tolist(), cfg.max_tiles if train else None, cfg.seed
        )

    todo = range(len(folds)) if only_folds is None else only_folds
    for k in todo:
        fold_dir = run_dir / f"fold_{k}"
        if (fold_dir / "report.json").is_file():  # written last: the fold is trained and evaluated
            continue
        fold = folds[k]
        if not (fold_dir / "result.json").is_file():  # else killed after training, before its report
            train_fold(
                cfg,
                dataset(fold.train, train=True),
                dataset(fold.val),
                names,
                in_dim,
                fold_dir,
                provenance,
                on_epoch=(lambda rec, k=k: on_epoch(k, rec)) if on_epoch else None,
            )
        _evaluate_fold(cfg, fold_dir, fold, dataset, y, ids, table)
    done = [k for k in range(len(folds)) if (run_dir / f"fold_{k}" / "report.json").is_file()]
    if len(done) < len(folds):
        return {"complete": False, "folds_done": done, "n_folds": len(folds)}
    return _run_report(cfg, run_dir, folds, dataset, y, ids, table)


def _fold_probs(fold_dir: Path, ds: BagDataset, cfg: TrainConfig) -> tuple[np.ndarray, float | None]:
    fm = load_checkpoint(fold_dir, resolve_device(cfg.device))
    return fm.probs(predict_logits(fm.model, ds, resolve_device(cfg.device), cfg.num_workers)), fm.threshold


def _evaluate_fold(cfg, fold_dir, fold, dataset, y, ids, table) -> None:
    names = table.class_names
    report = {}
    for split in ("val", "test"):
        idx = getattr(fold, split)
        if idx.size == 0:
            continue
        probs, thr = _fold_probs(fold_dir, dataset(idx), cfg)
        write_predictions_csv(
            fold_dir / f"predictions_{split}.csv",
            ids[idx].tolist(),
            probs,
            names,
            thr,
            [table.labels[i] for i in idx],
            {"patient_id": [table.patients[i] for i in idx]},
        )
        report[split] = score_predictions(
            y[idx], probs, names, thr, cfg.bootstrap if split == "test" else 0, cfg.seed
        )
        if split == "test" or fold.test.size == 0:
            plot_roc_pr_reliability(y[idx], probs, names, fold_dir)
    from wsikit.metrics import markdown_report

    write_markdown(
        fold_dir / "report.md", markdown_report(jsonable(report)).split("\n", 2)[2], title=f"{fold_dir.name}"
    )
    write_json(fold_dir / "report.json", jsonable(report))  # last: the fold is done


def _run_report(cfg, run_dir: Path, folds: list[Fold], dataset, y, ids, table) -> dict[str, Any]:
    import json

    names = table.class_names
    fold_dirs = [run_dir / f"fold_{k}" for k in range(len(folds))]
    fold_reports = [json.loads((d / "report.json").read_text()) for d in fold_dirs]
    fold_results = [json.loads((d / "result.json").read_text()) for d in fold_dirs]
    keys = headline_keys(len(names))
    pick = lambda s: {k: v for k, v in s.items() if k in keys}  # noqa: E731
    report: dict[str, Any] = {
        "model": cfg.model,
        "n_slides": len(ids),
        "n_patients": len(set(table.patients)),
        "class_counts": {c: int((y == i).sum()) for i, c in enumerate(names)},
        "folds": len(folds),
        "val_mean_std": pick(summarize_folds([r["val"] for r in fold_reports])),
        "per_fold": [
            {
                "fold": k,
                "best_epoch": res["best_epoch"],
                "temperature": res["temperature"],
                "threshold": res["threshold"],
                **{f"val_{m}": rep["val"].get(m) for m in keys},
                **{f"test_{m}": rep.get("test", {}).get(m) for m in keys},
            }
            for k, (res, rep) in enumerate(zip(fold_results, fold_reports, strict=True))
        ],
    }
    oof_idx = np.concatenate([f.val for f in folds])
    oof = [_fold_probs(d, dataset(f.val), cfg)[0] for d, f in zip(fold_dirs, folds, strict=True)]
    write_predictions_csv(
        run_dir / "predictions_oof.csv",
        ids[oof_idx].tolist(),
        np.concatenate(oof),
        names,
        None,
        [table.labels[i] for i in oof_idx],
        {"fold": [k for k, f in enumerate(folds) for _ in f.val]},
    )
    test = folds[0].test
    if test.size:
        report["test_mean_std"] = pick(summarize_folds([r["test"] for r in fold_reports]))
        per_fold = [_fold_probs(d, dataset(test), cfg) for d in fold_dirs]
        probs = np.mean([p for p, _ in per_fold], axis=0)
        thresholds = [t for _, t in per_fold if t is not None]
        thr = float(np.median(thresholds)) if thresholds else None
        report["test_ensemble"] = score_predictions(y[test], probs, names, thr, cfg.bootstrap, cfg.seed)
        write_predictions_csv(
            run_dir / "predictions_test.csv",
            ids[test].tolist(),
            probs,
            names,
            thr,
            [table.labels[i] for i in test],
            {"patient_id": [table.patients[i] for i in test]},
        )
        plot_roc_pr_reliability(y[test], probs, names, run_dir)
    write_json(run_dir / "report.json", jsonable(report))
    write_markdown(
        run_dir / "report.md",
        run_markdown(jsonable(report), names),
        title=f"{cfg.model} on {len(ids)} slides",
    )
    report["complete"] = True
    return report


def run_markdown(report: dict[str, Any], names: Sequence[str]) -> str:
    from wsikit.metrics import fmt_value, markdown_report

    keys = headline_keys(len(names))
    lines = [
        f"{report['n_slides']} slides of {report['n_patients']} patients ({', '.join(f'{c}: {n}' for c, n in report['class_counts'].items())}), "
        f"{report['folds']}-fold patient-level cross-validation.",
        "",
        "| metric | validation (mean ± std over folds) | "
        + (
            "test (mean ± std over fold models) | test ensemble [95% CI] |"
            if "test_ensemble" in report
            else ""
        ),
        "|---|---|" + ("---|---|" if "test_ensemble" in report else ""),
    ]
    for k in keys:
        row = f"| {k} | {fmt_value(report['val_mean_std'].get(k))} |"
        if "test_ensemble" in report:
            ens = report["test_ensemble"]
            ci = ens.get(f"{'auroc' if k == 'auroc_macro' else k}_ci")
            row += f" {fmt_value(report['test_mean_std'].get(k))} | {fmt_value(ens.get(k))}{' ' + fmt_value(ci) if ci else ''} |"
        lines.append(row)
    lines += [
        "",
        "## per fold",
        "",
        "| fold | best epoch | T | threshold | " + " | ".join(f"val {k}" for k in keys[:3]) + " |",
    ]
    lines.append("|---" * (4 + 3) + "|")
    for f in report["per_fold"]:
        lines.append(
            f"| {f['fold']} | {f['best_epoch']} | {fmt_value(f['temperature'])} | {fmt_value(f['threshold'])} | "
            + " | ".join(fmt_value(f[f"val_{k}"]) for k in keys[:3])
            + " |"
        )
    if "test_ensemble" in report:
        lines += ["", "## held-out test, ensemble of the fold models", ""]
        lines.append(markdown_report(report["test_ensemble"]).split("\n", 2)[2])
    return "\n".join(lines) + "\n"


RUN_FILES = ("config.json", "splits.csv", "report.json", "report.md", "roc.png", "pr.png", "reliability.png")


def clear_run(run_dir: str | os.PathLike) -> None:
    """Delete what :func:`run_cv` writes in ``run_dir`` (and nothing else) before a fresh run."""
    import shutil

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if p.is_dir() and p.name.startswith("fold_") and p.name[5:].isdigit():
            shutil.rmtree(p)
        elif p.name in RUN_FILES or (p.name.startswith("predictions_") and p.suffix == ".csv"):
            p.unlink()
