"""Metrics agree with scikit-learn; thresholds, temperature scaling, bootstrap, reports behave."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from wsikit.metrics import (
    MetricError,
    average_precision,
    binary_auroc,
    bootstrap_ci,
    choose_threshold,
    evaluate_predictions,
    expected_calibration_error,
    fit_temperature,
    nll,
    softmax_t,
    summarize_folds,
)
from wsikit.reports import plot_roc_pr_reliability, write_report


def _random_case(rng, n, c, ties=False):
    y = rng.integers(0, c, n)
    y[:c] = np.arange(c)  # every class present
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]
    if ties:
        logits = np.round(logits, 1)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("c", [2, 3, 5])
def test_metrics_equal_sklearn(seed, c):
    rng = np.random.default_rng(seed)
    y, p = _random_case(rng, int(rng.integers(20, 300)), c, ties=seed % 2 == 0)
    names = [f"c{k}" for k in range(c)]
    thr = 0.37 if c == 2 else None
    m = evaluate_predictions(y, p, names, threshold=thr)
    pred = (p[:, 1] >= thr).astype(int) if c == 2 else p.argmax(1)
    for k in range(c):
        assert m["auroc_per_class"][names[k]] == pytest.approx(skm.roc_auc_score(y == k, p[:, k]), abs=1e-12)
        assert m["ap_per_class"][names[k]] == pytest.approx(
            skm.average_precision_score(y == k, p[:, k]), abs=1e-12
        )
    assert m["auroc_macro"] == pytest.approx(
        skm.roc_auc_score(y, p[:, 1]) if c == 2 else skm.roc_auc_score(y, p, multi_class="ovr"), abs=1e-12
    )
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    f1s = skm.f1_score(y, pred, average=None, labels=range(c), zero_division=np.nan)
    for k in range(c):
        assert m["f1_per_class"][names[k]] == pytest.approx(f1s[k], nan_ok=True)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=range(c)).tolist()
    assert m["nll"] == pytest.approx(skm.log_loss(y, p, labels=range(c)))
    if c == 2:
        assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p[:, 1]))
        assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
        assert m["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
        assert m["ppv"] == pytest.approx(skm.precision_score(y, pred, zero_division=np.nan), nan_ok=True)
        assert m["auroc"] == m["auroc_macro"]


def test_ece_by_hand():
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    # bins (n=10): 0.9 → bin 8 (acc 1, conf .9); 0.8 → bin 7 (acc 0, conf .8); 0.7 → bin 6; 0.6 → bin 5
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(1 - 0.6)) / 4
    assert expected_calibration_error(p, y, n_bins=10) == pytest.approx(expected)
    assert expected_calibration_error(np.eye(2)[[0, 1]], np.array([0, 1])) == pytest.approx(0.0)


def test_undefined_auroc_is_nan_and_report_null(tmp_path):
    y = np.zeros(10, dtype=int)
    p = np.linspace(0.1, 0.9, 10)
    m = evaluate_predictions(y, p, ["neg", "pos"])
    assert np.isnan(m["auroc"])
    j, md = write_report({"test": m}, tmp_path)
    assert json.loads(j.read_text())["test"]["auroc"] is None
    assert "n/a" in md.read_text()
    assert np.isnan(binary_auroc(y, p)) and np.isnan(average_precision(y, p))


@pytest.mark.parametrize("seed", range(5))
def test_temperature_scaling_lowers_nll(seed):
    rng = np.random.default_rng(seed)
    n, c = 400, 3
    y = rng.integers(0, c, n)
    logits = 4.0 * (rng.normal(size=(n, c)) + 1.0 * np.eye(c)[y])  # over-confident
    t = fit_temperature(logits, y)
    assert t > 1.0
    assert nll(softmax_t(logits, t), y) < nll(softmax_t(logits, 1.0), y)
    # the fitted T is the minimiser: nearby temperatures are no better
    for other in (t * 0.8, t * 1.25):
        assert nll(softmax_t(logits, t), y) <= nll(softmax_t(logits, other), y) + 1e-9
    # it also helps on fresh data from the same miscalibrated model
    y2 = rng.integers(0, c, n)
    logits2 = 4.0 * (rng.normal(size=(n, c)) + 1.0 * np.eye(c)[y2])
    assert nll(softmax_t(logits2, t), y2) < nll(softmax_t(logits2, 1.0), y2)


def test_temperature_binary_logits():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    z = 0.2 * (2 * y - 1 + rng.normal(size=300))  # under-confident
    t = fit_temperature(z, y)
    assert t < 1.0
    assert nll(softmax_t(z, t), y) < nll(softmax_t(z, 1.0), y)


def test_choose_threshold_youden_and_sensitivity():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + 1.2 * y
    t = choose_threshold(y, s, "youden")
    fpr, tpr, _ = skm.roc_curve(y, s)
    best = np.max(tpr - fpr)
    pred = s >= t
    assert pred[y == 1].mean() - pred[y == 0].mean() == pytest.approx(best)
    t90 = choose_threshold(y, s, "sensitivity", target=0.9)
    pred = s >= t90
    assert pred[y == 1].mean() >= 0.9
    # the highest threshold reaching the target: raising it past the next score would miss the target
    higher = np.unique(s[s > t90])
    assert (s[y == 1] >= higher[0]).mean() == pred[y == 1].mean()  # same decisions as on validation
    assert (s[y == 1] >= higher[1]).mean() < 0.9
    tspec = choose_threshold(y, s, "specificity", target=0.95)
    assert (s[y == 0] < tspec).mean() >= 0.95
    with pytest.raises(MetricError):
        choose_threshold(np.zeros(5), np.arange(5.0))
    with pytest.raises(MetricError):
        choose_threshold(y, s, "bogus")


def test_bootstrap_ci_brackets_point_estimate():
    rng = np.random.default_rng(2)
    y, p = _random_case(rng, 150, 2)
    lo, hi = bootstrap_ci(y, p, n=300, seed=0)
    point = skm.roc_auc_score(y, p[:, 1])
    assert lo < point < hi and hi - lo < 0.3
    assert bootstrap_ci(y, p, n=300, seed=0) == (lo, hi)  # deterministic


def test_summarize_folds_mean_std():
    folds = [
        {"auroc": 0.8, "per": {"a": 1.0}, "x": float("nan")},
        {"auroc": 0.9, "per": {"a": 3.0}, "x": 0.5},
    ]
    s = summarize_folds(folds)
    assert s["auroc"]["mean"] == pytest.approx(0.85)
    assert s["auroc"]["std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert s["per.a"]["mean"] == 2.0
    assert s["x"]["n"] == 1 and s["x"]["mean"] == 0.5


def test_plots_and_report(tmp_path):
    rng = np.random.default_rng(3)
    y, p = _random_case(rng, 80, 3)
    paths = plot_roc_pr_reliability(y, p, ["a", "b", "c"], tmp_path)
    assert [x.name for x in paths] == ["roc.png", "pr.png", "reliability.png"]
    for x in paths:
        assert x.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = evaluate_predictions(y, p, ["a", "b", "c"])
    summary = summarize_folds([m, m])
    j, md = write_report({"test": m, "folds_summary": summary}, tmp_path, title="demo")
    text = md.read_text()
    assert "# demo" in text and "confusion matrix" in text and "±" in text
    assert json.loads(j.read_text())["test"]["n"] == 80


def test_bad_inputs():
    with pytest.raises(MetricError):
        evaluate_predictions(np.array([0, 3]), np.full((2, 2), 0.5))
    with pytest.raises(MetricError):
        evaluate_predictions(np.array([0, 1]), np.full((2, 2), 0.5), ["only-one"])
