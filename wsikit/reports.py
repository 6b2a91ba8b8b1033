"""Pictures and documents of results: ROC, precision-recall and reliability plots, markdown reports,
and saving matplotlib figures. The numbers themselves come from :mod:`wsikit.metrics`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsikit.io import atomic_path, jsonable, write_json, write_text
from wsikit.metrics import (
    as_labels,
    as_probs,
    average_precision,
    binary_auroc,
    expected_calibration_error,
    pr_curve,
    reliability_bins,
    roc_curve,
)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110, tight: str = "layout") -> Path:
    """Save a matplotlib figure as PNG atomically and close it; ``tight``: ``layout`` (tight_layout) or
    ``bbox`` (crop to the drawn area)."""
    import matplotlib.pyplot as plt

    if tight == "layout":
        fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight" if tight == "bbox" else None)
    plt.close(fig)
    return Path(path)


def plot_roc_pr_reliability(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str] | None,
    out_dir: str | os.PathLike,
    prefix: str = "",
    n_bins: int = 15,
) -> list[Path]:
    """Write ``roc.png``, ``pr.png`` and ``reliability.png`` (one curve per class; binary: class 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = as_probs(probs)
    y = as_labels(y_true, p.shape[1])
    names = list(class_names) if class_names is not None else [str(i) for i in range(p.shape[1])]
    classes = [1] if p.shape[1] == 2 else list(range(p.shape[1]))
    out_dir = Path(out_dir)
    paths = []

    fig, ax = plt.subplots(figsize=(5, 5))
    for k in classes:
        if (y == k).all() or not (y == k).any():
            continue
        fpr, tpr, _ = roc_curve(y == k, p[:, k])
        ax.plot(fpr, tpr, label=f"{names[k]} (AUROC {binary_auroc(y == k, p[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    paths.append(save_figure(fig, out_dir / f"{prefix}roc.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    for k in classes:
        if not (y == k).any():
            continue
        recall, precision = pr_curve(y == k, p[:, k])
        ax.step(
            recall, precision, where="post", label=f"{names[k]} (AP {average_precision(y == k, p[:, k]):.3f})"
        )
        ax.axhline((y == k).mean(), color="grey", lw=0.6, ls=":")
    ax.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left", fontsize=8)
    paths.append(save_figure(fig, out_dir / f"{prefix}pr.png"))

    rb = reliability_bins(p, y, n_bins)
    fig, ax = plt.subplots(figsize=(5, 5))
    centers = (rb["edges"][:-1] + rb["edges"][1:]) / 2
    has = rb["count"] > 0
    ax.bar(centers[has], rb["accuracy"][has], width=1 / n_bins, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ece = expected_calibration_error(p, y, n_bins)
    ax.set(xlabel="confidence (top class)", ylabel="accuracy", title=f"reliability (ECE {ece:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    paths.append(save_figure(fig, out_dir / f"{prefix}reliability.png"))
    return paths


def fmt_value(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, dict) and "mean" in v and "std" in v:
        return f"{fmt_value(v['mean'])} ± {fmt_value(v['std'])}"
    if (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(isinstance(x, (float, int)) or x is None for x in v)
    ):
        return f"[{fmt_value(v[0])}, {fmt_value(v[1])}]"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def markdown_report(metrics: dict[str, Any], title: str = "Results") -> str:
    """A readable markdown rendering of a (possibly nested) metrics dict.

    Dicts from :func:`evaluate_predictions` become a headline table, a per-class table and a
    confusion matrix; :func:`summarize_folds` output becomes ``mean ± std`` rows; other scalars a
    key/value table.
    """
    lines = [f"# {title}", ""]
    _md_section(metrics, lines, level=2)
    return "\n".join(lines).rstrip() + "\n"


HEADLINE = (
    "auroc_macro", "auroc", "ap_macro", "balanced_accuracy", "accuracy", "sensitivity", "specificity",
    "ppv", "npv", "f1", "f1_macro", "ece", "brier", "nll", "threshold", "temperature",
)  # fmt: skip


def _md_section(d: dict[str, Any], lines: list[str], level: int) -> None:
    if "auroc_per_class" in d and "confusion_matrix" in d:
        _md_evaluation(d, lines)
        return
    scalars = {k: v for k, v in d.items() if not isinstance(v, dict) or {"mean", "std"} <= set(v)}
    if scalars:
        lines += ["| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {fmt_value(v)} |" for k, v in scalars.items() if not isinstance(v, list) or len(v) == 2
        ]
        lines.append("")
    for key, v in d.items():
        if isinstance(v, dict) and not {"mean", "std"} <= set(v):
            lines += [f"{'#' * level} {key}", ""]
            _md_section(v, lines, level + 1)


def _md_evaluation(d: dict[str, Any], lines: list[str]) -> None:
    names = d["class_names"]
    counts = ", ".join(f"{n}: {d['class_counts'][n]}" for n in names)
    lines += [f"{d['n']} cases ({counts})", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {fmt_value(d[k])} |" for k in HEADLINE if k in d]
    for key, v in d.items():
        if key.endswith("_ci"):
            lines.append(f"| {key} (95% bootstrap) | {fmt_value(v)} |")
    lines += [
        "",
        "| class | AUROC | AP | sensitivity | specificity | PPV | F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in names:
        row = [d[f"{m}_per_class"][n] for m in ("auroc", "ap", "sensitivity", "specificity", "ppv", "f1")]
        lines.append(f"| {n} | " + " | ".join(fmt_value(v) for v in row) + " |")
    lines += ["", "confusion matrix (rows: true, columns: predicted)", ""]
    lines += ["| true \\ pred | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for n, row in zip(names, d["confusion_matrix"], strict=True):
        lines.append(f"| {n} | " + " | ".join(str(c) for c in row) + " |")
    lines.append("")


def markdown_body(metrics: dict[str, Any]) -> str:
    """:func:`markdown_report` without its title line."""
    return markdown_report(metrics).split("\n", 2)[2]


def write_markdown(path: str | os.PathLike, body: str, title: str) -> Path:
    """Write ``# title`` and ``body`` as a markdown file, atomically."""
    return write_text(path, f"# {title}\n\n{body}")


def write_report(
    metrics: dict[str, Any], out_dir: str | os.PathLike, name: str = "report", title: str = "Results"
) -> tuple[Path, Path]:
    """Write ``<name>.json`` (standard JSON: nan → null) and ``<name>.md`` into ``out_dir``; atomic."""
    out_dir = Path(out_dir)
    clean = jsonable(metrics)
    json_path = write_json(out_dir / f"{name}.json", clean)
    md_path = write_text(out_dir / f"{name}.md", markdown_report(clean, title))
    json.loads(json_path.read_text())  # fail loudly if it is not standard JSON
    return json_path, md_path
