"""Apply trained fold models: load checkpoints, predict bags, score predictions, write CSVs and reports.

A fold checkpoint (``<run>/fold_<k>/best.pt``) holds the model spec and weights, the class names, the
temperature fitted on that fold's validation slides and the decision threshold chosen there. New slides
get each fold's calibrated probabilities and decision; the ensemble averages the folds' calibrated
probabilities and applies the median of their thresholds.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from wsikit.io import jsonable, write_json, write_text
from wsikit.metrics import (
    auroc_metric,
    bootstrap_ci,
    evaluate_predictions,
    predict_labels,
    softmax_t,
    summarize_folds,
)
from wsikit.mil.base import MILModel
from wsikit.mil.data import BagDataset, DataError, LabelsTable, bag_dims, first_item
from wsikit.mil.registry import ModelSpec
from wsikit.reports import fmt_value, markdown_body, plot_roc_pr_reliability, write_markdown
from wsikit.runtime import resolve_device

CHECKPOINT_FORMAT = "wsikit-mil/1"


class CheckpointError(ValueError):
    """A run or checkpoint that cannot be used; the message names the file and the fix."""


@dataclass
class FoldModel:
    """A trained fold model with what is needed to turn its logits into calibrated decisions."""

    path: Path
    model: MILModel
    spec: ModelSpec
    class_names: list[str]
    temperature: float = 1.0
    threshold: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def probs(self, logits: np.ndarray) -> np.ndarray:
        return softmax_t(logits, self.temperature)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> FoldModel:
    """Load ``best.pt`` / ``last.pt`` (or a fold folder, which means its ``best.pt``) in eval mode."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no checkpoint; train first (wsikit train) or point at fold_<k>/best.pt"
        )
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable wsikit checkpoint ({exc})") from exc
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a wsikit MIL checkpoint (format {ckpt.get('format')!r})")
    spec = ModelSpec(**ckpt["model"])
    model = spec.build()
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "scheduler")}
    return FoldModel(
        path,
        model,
        spec,
        list(ckpt["class_names"]),
        float(ckpt.get("temperature", 1.0)),
        ckpt.get("threshold"),
        meta,
    )


def fold_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The fold folders of a run that hold a trained model (a fold folder itself is a run of one)."""
    run_dir = Path(run_dir)
    if (run_dir / "best.pt").is_file():
        return [run_dir]
    found = sorted(
        (p for p in run_dir.glob("fold_*") if (p / "best.pt").is_file()), key=lambda p: int(p.name[5:])
    )
    if not found:
        raise CheckpointError(f"{run_dir}: no fold_<k>/best.pt; train a model there first (wsikit train)")
    return found


@torch.no_grad()
def predict_logits(
    model: MILModel, dataset: BagDataset, device: str | torch.device = "cpu", num_workers: int = 0
) -> np.ndarray:
    """(N, C) slide logits of every bag of ``dataset``, in order, with the model in eval mode."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=first_item)
    out = [model(item["features"].to(device)).logits.float().cpu().numpy() for item in loader]
    model.train(was_training)
    return np.stack(out) if out else np.zeros((0, getattr(model, "n_classes", 2)), np.float32)


def score_predictions(
    y: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    threshold: float | None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`evaluate_predictions` plus 95% bootstrap CIs (``*_ci``) of AUROC, balanced accuracy and,
    for binary problems, sensitivity and specificity at ``threshold``."""
    m = evaluate_predictions(y, probs, class_names, threshold)
    if n_boot <= 0 or len(y) < 2:
        return m

    def at_threshold(key: str):
        return lambda yy, pp: evaluate_predictions(yy, pp, class_names, threshold)[key]

    m["auroc_ci"] = bootstrap_ci(y, probs, auroc_metric, n=n_boot, seed=seed)
    keys = ["balanced_accuracy"] + (["sensitivity", "specificity"] if len(class_names) == 2 else [])
    for key in keys:
        m[f"{key}_ci"] = bootstrap_ci(y, probs, at_threshold(key), n=min(n_boot, 500), seed=seed)
    return m


def write_predictions_csv(
    path: str | os.PathLike,
    slide_ids: Sequence[str],
    probs: np.ndarray,
    class_names: Sequence[str],
    threshold: float | None,
    labels: Sequence[str] | None = None,
    extra: dict[str, Sequence[Any]] | None = None,
) -> Path:
    """One row per slide: id, extra columns, true label (if known), class probabilities, prediction."""
    pred = predict_labels(probs, threshold)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    extra = extra or {}
    w.writerow(
        [
            "slide_id",
            *extra,
            *(["label"] if labels is not None else []),
            *[f"p_{c}" for c in class_names],
            "pred",
        ]
    )
    for i, sid in enumerate(slide_ids):
        row = [sid, *[v[i] for v in extra.values()]]
        if labels is not None:
            row.append(labels[i])
        row += [f"{p:.6f}" for p in probs[i]] + [class_names[pred[i]]]
        w.writerow(row)
    return write_text(path, buf.getvalue())


def headline_keys(n_classes: int) -> list[str]:
    if n_classes == 2:
        return [
            "auroc",
            "ap_macro",
            "balanced_accuracy",
            "sensitivity",
            "specificity",
            "f1",
            "ece",
            "brier",
            "nll",
        ]
    return ["auroc_macro", "ap_macro", "balanced_accuracy", "accuracy", "f1_macro", "ece", "brier", "nll"]


def evaluate_run(
    run_dir: str | os.PathLike,
    bag_paths: Sequence[Path],
    slide_ids: Sequence[str],
    out_dir: str | os.PathLike,
    table: LabelsTable | None = None,
    device: str = "auto",
    num_workers: int = 0,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Apply every fold model of ``run_dir`` to the bags; write ``predictions.csv`` and, when labels are
    given, ``report.json`` / ``report.md`` and ROC / PR / reliability PNGs into ``out_dir``."""
    dev = resolve_device(device)
    folds = [load_checkpoint(d, dev) for d in fold_dirs(run_dir)]
    names = folds[0].class_names
    dim = bag_dims(bag_paths)
    if dim != folds[0].spec.in_dim:
        raise DataError(
            f"the bags have {dim}-d features but {folds[0].path} was trained on {folds[0].spec.in_dim}-d; "
            "use bags from the same encoder"
        )
    y = None
    if table is not None:
        unknown = sorted(set(table.labels) - set(names))
        if unknown:
            raise DataError(f"{table.path}: labels {unknown} are not classes of the model ({names})")
        y = np.asarray([names.index(lab) for lab in table.labels], dtype=np.int64)
    ds = BagDataset(bag_paths, y, slide_ids)
    fold_probs = [f.probs(predict_logits(f.model, ds, dev, num_workers)) for f in folds]
    probs = np.mean(fold_probs, axis=0)
    thresholds = [f.threshold for f in folds if f.threshold is not None]
    threshold = float(np.median(thresholds)) if thresholds and len(names) == 2 else None
    out_dir = Path(out_dir)
    extra: dict[str, Sequence[Any]] = {}
    if len(names) == 2:
        for f, p in zip(folds, fold_probs, strict=True):
            extra[f"{f.path.parent.name}_p_{names[1]}"] = [f"{v:.6f}" for v in p[:, 1]]
    if table is not None:
        extra = {"patient_id": table.patients, **extra}
    csv_path = write_predictions_csv(
        out_dir / "predictions.csv",
        slide_ids,
        probs,
        names,
        threshold,
        table.labels if table else None,
        extra,
    )
    result: dict[str, Any] = {
        "run": str(run_dir),
        "folds": [str(f.path) for f in folds],
        "n_slides": len(slide_ids),
        "class_names": names,
        "threshold": threshold,
        "predictions": str(csv_path),
    }
    if y is not None:
        per_fold = [
            evaluate_predictions(y, p, names, f.threshold) for f, p in zip(folds, fold_probs, strict=True)
        ]
        result["ensemble"] = score_predictions(y, probs, names, threshold, n_boot)
        result["per_fold_summary"] = {
            k: v for k, v in summarize_folds(per_fold).items() if k in headline_keys(len(names))
        }
        result["per_fold"] = per_fold
        result["plots"] = [str(p) for p in plot_roc_pr_reliability(y, probs, names, out_dir)]
        write_json(out_dir / "report.json", jsonable(result))
        write_markdown(out_dir / "report.md", evaluation_markdown(result), title=f"Evaluation of {run_dir}")
    return result


def evaluation_markdown(result: dict[str, Any]) -> str:
    """The body of an evaluation's ``report.md``."""
    lines = [
        f"{result['n_slides']} slides, {len(result['folds'])} fold model(s); ensemble = mean of calibrated "
        f"probabilities, threshold {fmt_value(result['threshold'])} (median of the folds' validation thresholds).",
        "",
    ]
    body = markdown_body(
        jsonable({"ensemble": result["ensemble"], "per-fold mean ± std": result["per_fold_summary"]})
    )
    return "\n".join(lines) + "\n" + body
