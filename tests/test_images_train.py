"""Training, evaluation, prediction and CV of the patch/X-ray core on real images (CPU, tiny runs)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wsikit import metrics as M
from wsikit.cli.main import app
from wsikit.images.data import ImageSet, load_images, load_medmnist
from wsikit.images.evaluate import ImageTensors, evaluate_classifier
from wsikit.images.gradcam import gradcam
from wsikit.images.models import load_classifier
from wsikit.images.settings import ModelConfig, TrainConfig
from wsikit.images.train import FocalLoss, _loader, class_weights, cross_validate, fit, train_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pneumonia_small(shared_data) -> ImageSet:
    """120 train / 60 val / 60 test real PneumoniaMNIST images, classes balanced within each split."""
    d = load_medmnist(shared_data / "xray" / "pneumoniamnist_28.npz")
    rng = np.random.default_rng(0)
    idx = []
    for split, n in (("train", 60), ("val", 30), ("test", 30)):
        for k in (0, 1):
            idx += rng.choice(np.flatnonzero((d.split == split) & (d.labels == k)), n, replace=False).tolist()
    return d.subset(np.array(idx))


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _quick(**kw) -> TrainConfig:
    return TrainConfig(
        **{"epochs": 2, "head_epochs": 1, "batch_size": 32, "device": "cpu", "patience": 5, **kw}
    )


def test_kermany_transfer_patient_split(shared_data, tmp_path):
    """Real ImageNet EfficientNet-Lite0, grey-adapted stem, patient-level split of the Kermany images."""
    data = load_images(shared_data / "xray" / "kermany_val", patient_regex="kermany")
    mcfg = ModelConfig(encoder="efficientnet-lite0", input_size=64, in_chans=1)
    res = fit(data, mcfg, _quick(batch_size=4), tmp_path, val_fraction=0.34, test_fraction=0.25, n_boot=50)
    rows = _rows(tmp_path / "split.csv")
    sides = {}
    for r in rows:
        sides.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in sides.values()) and len(rows) == 16
    _, cfg, meta = load_classifier(res["checkpoint"])
    assert cfg.weights_id.startswith("sha256:") and cfg.in_chans == 1  # real weights, never random
    assert meta["temperature"] > 0 and 0 <= meta["threshold"] <= 1
    for name in (
        "test_report.json",
        "test_report.md",
        "test_roc.png",
        "test_reliability.png",
        "test_gradcam.png",
    ):
        assert (tmp_path / name).is_file(), name


def test_report_metrics_are_the_shared_ones(pneumonia_small, tmp_path):
    """The evaluation report equals wsikit.metrics.evaluate_predictions on the written probabilities."""
    train, val, test = (
        pneumonia_small.subset(np.flatnonzero(pneumonia_small.split == s)) for s in ("train", "val", "test")
    )
    mcfg = ModelConfig(encoder="efficientnet-lite0", input_size=28, in_chans=1, small_input=True)
    res = train_classifier(train, val, mcfg, _quick(), tmp_path, log=lambda s: None)
    report = evaluate_classifier(res.checkpoint, test, tmp_path, "test", "cpu", n_boot=0, n_gradcam=4)
    rows = _rows(tmp_path / "test_predictions.csv")
    probs = np.array([[float(r["p_normal"]), float(r["p_pneumonia"])] for r in rows])
    y = np.array([0 if r["label"] == "normal" else 1 for r in rows])
    expected = M.evaluate_predictions(y, probs, ["normal", "pneumonia"], res.threshold)
    for key in ("auroc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ece", "brier"):
        assert report[key] == pytest.approx(expected[key], abs=1e-5), key
    assert report["confusion_matrix"] == expected["confusion_matrix"]
    saved = json.loads((tmp_path / "test_report.json").read_text())
    assert saved["auroc"] == pytest.approx(report["auroc"])
    assert report["auroc"] > 0.75  # 2 epochs on 120 images already separate the classes


def test_resume_continues_history(pneumonia_small, tmp_path):
    train, val = (
        pneumonia_small.subset(np.flatnonzero(pneumonia_small.split == s)) for s in ("train", "val")
    )
    mcfg = ModelConfig(encoder="efficientnet-lite0", input_size=28, in_chans=1, small_input=True)
    first = train_classifier(train, val, mcfg, _quick(epochs=1), tmp_path, log=lambda s: None)
    again = train_classifier(train, val, mcfg, _quick(epochs=2, resume=True), tmp_path, log=lambda s: None)
    assert len(again.history) == 2 and again.history[0] == first.history[0]


def test_cross_validation_scratch(pneumonia_small, tmp_path):
    pool = pneumonia_small.subset(np.flatnonzero(pneumonia_small.split != "test"))
    pool.split = None
    mcfg = ModelConfig(encoder="efficientnet-lite0", input_size=28, in_chans=3, small_input=True)
    summary = cross_validate(pool, mcfg, _quick(mode="scratch", epochs=1), tmp_path, k=2, log=lambda s: None)
    assert summary["heldout"]["auroc"]["n"] == 2 and np.isfinite(summary["heldout"]["auroc"]["mean"])
    assert (tmp_path / "cv_report.md").is_file() and (tmp_path / "fold1" / "best.pt").is_file()


def test_multilabel_path(pneumonia_small, tmp_path):
    d = pneumonia_small
    bright = (d.images.reshape(len(d), -1).mean(1) > np.median(d.images)).astype(np.int64)
    labels = np.stack([d.labels, bright, 1 - d.labels], axis=1)
    ml = ImageSet(d.images, labels, ["pneumonia", "bright", "normal"], split=d.split, source="ml")
    train, val, test = (ml.subset(np.flatnonzero(ml.split == s)) for s in ("train", "val", "test"))
    mcfg = ModelConfig(encoder="efficientnet-lite0", input_size=28, in_chans=1, small_input=True)
    res = train_classifier(
        train, val, mcfg, _quick(epochs=1, imbalance="focal"), tmp_path, log=lambda s: None
    )
    assert isinstance(res.threshold, list) and len(res.threshold) == 3
    rep = evaluate_classifier(res.checkpoint, test, tmp_path, "test", "cpu", n_boot=0, n_gradcam=0)
    assert set(rep["labels"]) == {"pneumonia", "bright", "normal"} and np.isfinite(rep["auroc_macro"])


def test_imbalance_tools():
    data = ImageSet(np.zeros((10, 4, 4), np.uint8), np.array([0] * 8 + [1] * 2), ["a", "b"])
    w = class_weights(data)
    assert torch.allclose(w, torch.tensor([10 / 16, 10 / 4]))
    logits, y = torch.randn(10, 2), torch.as_tensor(data.labels)
    assert torch.allclose(
        FocalLoss(0.0, w)(logits, y), torch.nn.CrossEntropyLoss(weight=w)(logits, y), atol=1e-6
    )
    assert FocalLoss(2.0)(logits, y) < torch.nn.functional.cross_entropy(logits, y)
    loader = _loader(ImageTensors(data, 4, 1), TrainConfig(imbalance="sampler", batch_size=1000), True, 0)
    loader.sampler.num_samples = 4000
    drawn = torch.cat([yb for _, yb in loader])
    assert abs(float(drawn.float().mean()) - 0.5) < 0.05  # the sampler balances the classes


def test_gradcam_maps():
    from wsikit.images.models import build_classifier

    model = build_classifier(ModelConfig(encoder="efficientnet-lite0", class_names=["a", "b"]))
    cams = gradcam(model, torch.randn(3, 3, 96, 96))
    assert cams.shape == (3, 96, 96) and cams.min() >= 0 and cams.max() <= 1 + 1e-6


def test_cli_kather_train_and_pathmnist_predict(shared_data, tmp_path):
    """Transfer on the real Kather-2016 tiles, then predict the real PathMNIST tiles, through the CLI."""
    runner = CliRunner()
    out = tmp_path / "kather"
    r = runner.invoke(app, ["patches", "train", str(shared_data / "patches" / "kather2016"), "--out", str(out),
                            "--input-size", "64", "--epochs", "2", "--head-epochs", "1", "--batch-size", "8",
                            "--val-fraction", "0.34", "--device", "cpu", "--augment", "histology"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["patches", "predict", str(out / "best.pt"), str(shared_data / "patches" / "pathmnist224"),
                            "--out", str(tmp_path / "pred.csv"), "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = _rows(tmp_path / "pred.csv")
    assert len(rows) == 9 and len([k for k in rows[0] if k.startswith("p_")]) == 8
    assert all(abs(sum(float(v) for k, v in row.items() if k.startswith("p_")) - 1) < 1e-4 for row in rows)
    r = runner.invoke(app, ["patches", "train", str(tmp_path / "nope.npz"), "--out", str(out)])
    assert r.exit_code == 2 and "zenodo" in r.output


def test_weights_are_the_ones_trained(shared_data, pneumonia_small, tmp_path):
    """`patches train --weights` builds the encoder from that checkpoint (it was accepted and ignored), in a
    single split (CLI) and in each fold of a cross-validation."""
    import timm

    from wsikit.encoders.weights import sha256_file

    torch.manual_seed(7)
    backbone = timm.create_model("resnet18.tv_in1k", pretrained=False, num_classes=0)
    ckpt = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), ckpt)
    args = ["patches", "train", str(shared_data / "patches" / "kather2016"), "--out", str(tmp_path / "one"),
            "--encoder", "resnet18", "--weights", str(ckpt), "--mode", "transfer", "--epochs", "1",
            "--head-epochs", "1", "--input-size", "32", "--batch-size", "8", "--val-fraction", "0.34",
            "--device", "cpu"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    cfg = _quick(epochs=1, head_epochs=1)
    cross_validate(pneumonia_small, ModelConfig(encoder="resnet18", input_size=28), cfg, tmp_path / "cv", 2,
                   log=lambda _: None, weights=ckpt)  # fmt: skip
    for best in (tmp_path / "one" / "best.pt", tmp_path / "cv" / "fold0" / "best.pt"):
        model, mcfg, _ = load_classifier(best)
        assert mcfg.weights_id == f"sha256:{sha256_file(ckpt)}"
        # the head alone trained: the backbone is exactly the checkpoint's
        assert torch.equal(model.backbone.conv1.weight, backbone.conv1.weight)
