"""k-fold runs of slide-level models: patient-level folds, every fold trained and evaluated, and the run's
report (per-fold mean ± std, out-of-fold predictions, a held-out test set scored by the fold ensemble).

Run directory::

    <run>/config.json            the TrainConfig, classes, data and bag provenance
    <run>/splits.csv             patient-level folds (reused when the run is resumed)
    <run>/fold_<k>/              one fold (see :mod:`wsikit.mil.train`); its report.json is written last
    <run>/predictions_oof.csv    out-of-fold validation predictions of every slide
    <run>/predictions_test.csv   held-out test: ensemble of the folds
    <run>/report.{json,md}       per-fold mean ± std, test ensemble with bootstrap CIs; PNGs for the test set
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from wsikit.io import jsonable, write_json
from wsikit.metrics import summarize_folds
from wsikit.mil.data import BagDataset, LabelsTable, check_training_data
from wsikit.mil.evaluate import (
    headline_keys,
    load_checkpoint,
    predict_logits,
    score_predictions,
    write_predictions_csv,
)
from wsikit.mil.train import TrainConfig, TrainError, train_fingerprint, train_fold
from wsikit.reports import fmt_value, markdown_body, plot_roc_pr_reliability, write_markdown
from wsikit.runtime import resolve_device
from wsikit.splits import Fold, assert_no_leak, load_splits, patient_kfold, save_splits


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
        old = json.loads(config_path.read_text())
        same = train_fingerprint(old.get("train", {})) == train_fingerprint(jsonable(asdict(cfg)))
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
    write_markdown(fold_dir / "report.md", markdown_body(jsonable(report)), title=f"{fold_dir.name}")
    write_json(fold_dir / "report.json", jsonable(report))  # last: the fold is done


def _run_report(cfg, run_dir: Path, folds: list[Fold], dataset, y, ids, table) -> dict[str, Any]:
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
    if folds[0].test.size:
        report.update(
            _test_report(cfg, run_dir, folds[0].test, fold_dirs, fold_reports, dataset, y, ids, table)
        )
    write_json(run_dir / "report.json", jsonable(report))
    write_markdown(
        run_dir / "report.md",
        run_markdown(jsonable(report), names),
        title=f"{cfg.model} on {len(ids)} slides",
    )
    report["complete"] = True
    return report


def _test_report(cfg, run_dir, test, fold_dirs, fold_reports, dataset, y, ids, table) -> dict[str, Any]:
    """The held-out test set scored by the fold ensemble (mean of calibrated probabilities, median
    threshold): its CSV and PNGs, and the report entries."""
    names = table.class_names
    keys = headline_keys(len(names))
    per_fold = [_fold_probs(d, dataset(test), cfg) for d in fold_dirs]
    probs = np.mean([p for p, _ in per_fold], axis=0)
    thresholds = [t for _, t in per_fold if t is not None]
    thr = float(np.median(thresholds)) if thresholds else None
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
    summary = summarize_folds([r["test"] for r in fold_reports])
    return {
        "test_mean_std": {k: v for k, v in summary.items() if k in keys},
        "test_ensemble": score_predictions(y[test], probs, names, thr, cfg.bootstrap, cfg.seed),
    }


def run_markdown(report: dict[str, Any], names: Sequence[str]) -> str:
    """The body of a run's ``report.md``."""
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
        lines.append(markdown_body(report["test_ensemble"]))
    return "\n".join(lines) + "\n"


RUN_FILES = ("config.json", "splits.csv", "report.json", "report.md", "roc.png", "pr.png", "reliability.png")


def clear_run(run_dir: str | os.PathLike) -> None:
    """Delete what :func:`run_cv` writes in ``run_dir`` (and nothing else) before a fresh run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if p.is_dir() and p.name.startswith("fold_") and p.name[5:].isdigit():
            shutil.rmtree(p)
        elif p.name in RUN_FILES or (p.name.startswith("predictions_") and p.suffix == ".csv"):
            p.unlink()
