"""Classification metrics in one place, shared by slide-level MIL and the patch/X-ray core.

Everything takes ``y_true`` (N,) integer class indices and ``probs`` (N, C) class probabilities (a
binary problem may pass (N,) probabilities of class 1). Class 1 is the positive class of a binary
problem. Undefined values (AUROC with one class present, ...) are ``nan`` in Python and ``null`` in
the written JSON.

Conventions
- AUROC and average precision: one-vs-rest per class; ``*_macro`` = unweighted mean over the classes
  where it is defined (binary: the value of class 1, as scikit-learn reports it).
- A threshold applies to the positive-class probability of a binary problem (positive iff
  ``p >= threshold``); multi-class predictions are the arg-max.
- ECE: top-label confidence, ``n_bins`` equal-width bins (Guo et al. 2017).
- Brier: binary = mean (p1 - y)²; multi-class = mean over samples of sum over classes (p_k - 1[y=k])².
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from scipy.stats import rankdata

EPS = 1e-12


class MetricError(ValueError):
    """Inputs that cannot be scored (shapes, labels out of range); the message says what to fix."""


# -- inputs --------------------------------------------------------------------------------------------
def as_probs(probs: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """(N, C) float64 probabilities; a (N,) vector is taken as P(class 1) of a binary problem."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    if p.ndim != 2:
        raise MetricError(f"probabilities must be (N,) or (N, C), got shape {p.shape}")
    if n_classes is not None and p.shape[1] != n_classes:
        raise MetricError(f"probabilities have {p.shape[1]} columns but there are {n_classes} classes")
    return p


def as_labels(y_true: np.ndarray, n_classes: int) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1 or (not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0)):
        raise MetricError("labels must be a (N,) vector of integer class indices")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise MetricError(f"labels must lie in 0..{n_classes - 1}, got {y.min()}..{y.max()}")
    return y


# -- ranking metrics -----------------------------------------------------------------------------------
def binary_auroc(y: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of ``scores`` for ``y`` in {0, 1} (Mann-Whitney U with tied ranks averaged); nan if one class."""
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for ``positive iff score >= threshold``, thresholds descending, starting at +inf."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    return fpr, tpr, np.r_[np.inf, s[last]]


def average_precision(y: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: sum over thresholds of (recall step) × precision; nan without positives."""
    y = np.asarray(y).astype(bool)
    if not y.any():
        return float("nan")
    recall, precision = pr_curve(y, scores)
    return float(np.sum(np.diff(recall) * precision[1:]))


def pr_curve(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at each distinct threshold, recall ascending from 0."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    ys = y[order]
    last = np.r_[np.flatnonzero(np.diff(s[order])), s.size - 1]
    tps = np.cumsum(ys)[last]
    recall = tps / max(int(y.sum()), 1)
    precision = tps / (last + 1)
    return np.r_[0.0, recall], np.r_[1.0, precision]


# -- thresholds ----------------------------------------------------------------------------------------
def choose_threshold(
    y_true: np.ndarray, scores: np.ndarray, method: str = "youden", target: float = 0.9
) -> float:
    """A decision threshold on positive-class scores, chosen on validation data.

    ``youden`` maximises sensitivity + specificity - 1; ``sensitivity`` / ``specificity`` take the
    threshold with the best other rate among those reaching ``target``. The threshold is placed midway
    between the chosen score and the next lower one, so validation decisions are unchanged and new
    scores between the two are not decided by float noise. Positive iff ``score >= threshold``.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.all() or not y.any():
        raise MetricError("choose_threshold needs both classes in the validation labels")
    fpr, tpr, thr = roc_curve(y, s)
    if method == "youden":
        best = int(np.argmax(tpr - fpr))
    elif method == "sensitivity":
        ok = np.flatnonzero(tpr >= target - 1e-12)
        best = int(ok[np.argmin(fpr[ok])])  # first index reaching the target has the lowest fpr
    elif method == "specificity":
        ok = np.flatnonzero(1.0 - fpr >= target - 1e-12)
        best = int(ok[np.argmax(tpr[ok])])
    else:
        raise MetricError(f"threshold method {method!r}: use youden, sensitivity or specificity")
    if best == 0:  # nothing positive: above the highest score
        return float(np.nextafter(thr[1], np.inf))
    if best == len(thr) - 1:  # everything positive: at the lowest score
        return float(thr[best])
    return float((thr[best] + thr[best + 1]) / 2.0)


def predict_labels(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Arg-max labels; a binary problem with a threshold predicts 1 iff ``P(1) >= threshold``."""
    p = as_probs(probs)
    if threshold is not None and p.shape[1] == 2:
        return (p[:, 1] >= threshold).astype(np.int64)
    return p.argmax(axis=1).astype(np.int64)


# -- calibration ---------------------------------------------------------------------------------------
def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: sum over equal-width confidence bins of |accuracy - confidence| weighted by bin size."""
    p = as_probs(probs)
    y = as_labels(y, p.shape[1])
    if y.size == 0:
        return float("nan")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        m = bins == b
        total += m.sum() * abs(correct[m].mean() - conf[m].mean())
    return float(total / y.size)


def reliability_bins(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin mean confidence, accuracy and count (top-label), for reliability diagrams."""
    p = as_probs(probs)
    y = as_labels(y, p.shape[1])
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(bins, weights=correct, minlength=n_bins) / count
        mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / count
    return {"edges": np.linspace(0, 1, n_bins + 1), "confidence": mean_conf, "accuracy": acc, "count": count}


def _as_logits(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    return np.stack([np.zeros_like(z), z], axis=1) if z.ndim == 1 else z


def softmax_t(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of ``logits / temperature``; (N,) logits are binary log-odds."""
    return softmax(_as_logits(logits) / temperature, axis=1)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood (log loss) of the true class."""
    p = as_probs(probs)
    y = as_labels(y, p.shape[1])
    p = p / p.sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(np.clip(p[np.arange(y.size), y], EPS, 1.0))))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    Fit on validation logits, apply to test logits. (N,) logits are binary log-odds. T is searched in
    [0.05, 20] on a log scale.
    """
    z = _as_logits(logits)
    y = as_labels(y, z.shape[1])
    if y.size == 0:
        return 1.0

    def loss(log_t: float) -> float:
        return float(-np.mean(log_softmax(z / math.exp(log_t), axis=1)[np.arange(y.size), y]))

    res = minimize_scalar(loss, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    t = float(math.exp(res.x))
    return t if loss(res.x) <= loss(0.0) else 1.0


def brier(probs: np.ndarray, y: np.ndarray) -> float:
    """Brier score (see the module docstring for the binary / multi-class forms)."""
    p = as_probs(probs)
    y = as_labels(y, p.shape[1])
    if p.shape[1] == 2:
        return float(np.mean((p[:, 1] - y) ** 2))
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


# -- confusion-matrix metrics --------------------------------------------------------------------------
def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    idx = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _div(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def nanmean(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def evaluate_predictions(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str] | None = None,
    threshold: float | None = None,
    n_bins: int = 15,
) -> dict[str, Any]:
    """All metrics of one set of predictions as a flat JSON-able dict.

    Keys: ``n``, ``class_names``, ``class_counts``, ``threshold``; ``auroc_macro`` and
    ``auroc_per_class``; ``ap_macro`` / ``ap_per_class`` (average precision); ``accuracy``,
    ``balanced_accuracy``; per class ``sensitivity``/``specificity``/``ppv``/``f1`` (``*_per_class``) and
    their macro means; ``confusion_matrix`` (rows true); ``ece``, ``brier``, ``nll``. A binary problem
    also gets ``auroc``, ``sensitivity``, ``specificity``, ``ppv``, ``npv`` and ``f1`` of class 1 at
    ``threshold`` (0.5 when None).
    """
    p = as_probs(probs)
    n_classes = p.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    if len(names) != n_classes:
        raise MetricError(f"{len(names)} class names for {n_classes} probability columns")
    y = as_labels(y_true, n_classes)
    if y.shape[0] != p.shape[0]:
        raise MetricError(f"{y.shape[0]} labels but {p.shape[0]} rows of probabilities")
    binary = n_classes == 2
    thr = (0.5 if threshold is None else float(threshold)) if binary else None
    pred = predict_labels(p, thr)
    cm = confusion_matrix(y, pred, n_classes)
    total = cm.sum()
    tp = np.diag(cm).astype(np.float64)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = total - tp - fn - fp
    sens = [_div(tp[k], tp[k] + fn[k]) for k in range(n_classes)]
    spec = [_div(tn[k], tn[k] + fp[k]) for k in range(n_classes)]
    ppv = [_div(tp[k], tp[k] + fp[k]) for k in range(n_classes)]
    f1 = [_div(2 * tp[k], 2 * tp[k] + fp[k] + fn[k]) for k in range(n_classes)]
    auroc = [binary_auroc(y == k, p[:, k]) for k in range(n_classes)]
    ap = [average_precision(y == k, p[:, k]) for k in range(n_classes)]
    per = lambda values: dict(zip(names, values, strict=True))  # noqa: E731
    out: dict[str, Any] = {
        "n": int(y.size),
        "class_names": names,
        "class_counts": per([int(c) for c in np.bincount(y, minlength=n_classes)]),
        "threshold": thr,
        "auroc_macro": auroc[1] if binary else nanmean(auroc),
        "auroc_per_class": per(auroc),
        "ap_macro": ap[1] if binary else nanmean(ap),
        "ap_per_class": per(ap),
        "accuracy": _div(tp.sum(), total),
        "balanced_accuracy": nanmean(sens),
        "sensitivity_macro": nanmean(sens),
        "specificity_macro": nanmean(spec),
        "f1_macro": nanmean([0.0 if math.isnan(v) else v for v in f1]) if total else float("nan"),
        "sensitivity_per_class": per(sens),
        "specificity_per_class": per(spec),
        "ppv_per_class": per(ppv),
        "f1_per_class": per(f1),
        "confusion_matrix": cm.tolist(),
        "ece": expected_calibration_error(p, y, n_bins) if y.size else float("nan"),
        "brier": brier(p, y) if y.size else float("nan"),
        "nll": nll(p, y) if y.size else float("nan"),
    }
    if binary:
        out.update(
            auroc=auroc[1],
            sensitivity=sens[1],
            specificity=spec[1],
            ppv=ppv[1],
            npv=_div(tn[1], tn[1] + fn[1]),
            f1=f1[1],
        )
    return out


# -- uncertainty and folds -----------------------------------------------------------------------------
def auroc_metric(y: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest AUROC (binary: AUROC of class 1): the default ``metric_fn`` of :func:`bootstrap_ci`."""
    p = as_probs(probs)
    if p.shape[1] == 2:
        return binary_auroc(np.asarray(y) == 1, p[:, 1])
    return nanmean([binary_auroc(np.asarray(y) == k, p[:, k]) for k in range(p.shape[1])])


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    metric_fn: Callable[[np.ndarray, np.ndarray], float] = auroc_metric,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) CI of ``metric_fn(y, probs)`` over resampled cases.

    Resamples where the metric is undefined (e.g. one class only) are dropped; (nan, nan) if all are.
    """
    y = np.asarray(y_true)
    p = np.asarray(probs)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, y.size, size=(n, y.size))
    values = np.array([metric_fn(y[i], p[i]) for i in idx], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def summarize_folds(fold_metrics: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean ± std (sample std, ddof=1) of every numeric metric across folds.

    Nested dicts are flattened with dots (``auroc_per_class.tumor``); nan/None values are left out of
    that metric's mean and ``n`` says how many folds it had.
    """
    values: dict[str, list[float]] = {}
    for m in fold_metrics:
        for key, v in _flatten(m).items():
            values.setdefault(key, []).append(v)
    out = {}
    for key, vs in values.items():
        arr = np.asarray([v for v in vs if v is not None and math.isfinite(v)], dtype=np.float64)
        out[key] = {
            "mean": float(arr.mean()) if arr.size else float("nan"),
            "std": float(arr.std(ddof=1)) if arr.size > 1 else (0.0 if arr.size else float("nan")),
            "n": int(arr.size),
            "values": [None if v is None or not math.isfinite(v) else float(v) for v in vs],
        }
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float | None]:
    flat: dict[str, float | None] = {}
    for key, v in d.items():
        name = f"{prefix}{key}"
        if isinstance(v, dict):
            flat.update(_flatten(v, name + "."))
        elif isinstance(v, bool):
            continue
        elif isinstance(v, (int, float, np.integer, np.floating)) and key != "n":
            flat[name] = float(v)
        elif v is None and key not in ("threshold",):
            flat[name] = None
    return flat
