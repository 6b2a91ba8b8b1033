"""MIL models, labels/bags, training (determinism, resume), evaluation, and an end-to-end run on the bundled slide.

The end-to-end test's bags are made here from real tile pixels of the bundled slide (CMU-1-Small-Region)
with a fixed, simple colour feature (no learned encoder), and the slide labels are made up for the test:
24 pseudo-slides each hold 40 tissue tiles of the real slide; "positive" ones hold 5 of the darkest
(most nucleus-dense) tiles, "negative" ones none.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wsikit.bags import Bag, write_bag
from wsikit.mil import ModelError, build_model, list_models
from wsikit.mil.cv import run_cv
from wsikit.mil.data import (
    ArrayBagDataset,
    BagDataset,
    DataError,
    bag_dims,
    find_bags,
    match_bags,
    read_labels,
)
from wsikit.mil.evaluate import evaluate_run, load_checkpoint, predict_logits
from wsikit.mil.train import TrainConfig, TrainError, train_fold
from wsikit.slide import open_slide

TILE = 128  # level-0 px (the bundled slide has one level, 0.499 µm/px)


# -- models --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(list_models()))
@pytest.mark.parametrize("n_classes", [2, 3])
def test_models_any_bag_size(name, n_classes):
    torch.manual_seed(0)
    model = build_model(name, 24, n_classes)
    for n in (1, 2, 7, 300):
        x = torch.randn(n, 24)
        model.train()
        out = model(x, label=n_classes - 1, coords=torch.zeros(n, 2, dtype=torch.long))
        assert out.logits.shape == (n_classes,) and out.tile_scores.shape == (n,)
        loss = torch.nn.functional.cross_entropy(out.logits[None], torch.tensor([n_classes - 1]))
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        loss.backward()
        model.eval()
        with torch.no_grad():
            out = model(x[None])  # (1, N, D) is accepted too
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.tile_scores).all()


@pytest.mark.parametrize(
    "name", ["abmil", "abmil-gated", "clam-sb", "clam-mb", "dsmil", "mean-pool", "instance-topk"]
)
def test_permutation_invariant(name):
    torch.manual_seed(1)
    model = build_model(name, 16, 2).eval()
    x = torch.randn(50, 16)
    perm = torch.randperm(50)
    with torch.no_grad():
        a, b = model(x), model(x[perm])
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert torch.allclose(a.tile_scores[perm], b.tile_scores, atol=1e-5)


def test_attention_sums_to_one_and_transmil_long_bags():
    torch.manual_seed(0)
    x = torch.randn(40, 16)
    for name in ("abmil", "clam-sb", "dsmil"):
        with torch.no_grad():
            assert float(build_model(name, 16, 2).eval()(x).tile_scores.sum()) == pytest.approx(1.0, abs=1e-5)
    exact = build_model("transmil", 16, 2, landmarks=4096).eval()
    nystrom = build_model("transmil", 16, 2, landmarks=64).eval()
    nystrom.load_state_dict(exact.state_dict())
    x = torch.randn(1500, 16)  # 1,501 tokens + padding: Nyström with 64 landmarks vs exact attention
    with torch.no_grad():
        e, n = exact(x), nystrom(x)
    # the class token's attention over the tiles (its attention to itself is not a tile score)
    assert 0.95 < float(e.tile_scores.sum()) <= 1.0 + 1e-5
    assert float(n.tile_scores.sum()) == pytest.approx(float(e.tile_scores.sum()), abs=0.05)
    assert torch.allclose(torch.softmax(e.logits, 0), torch.softmax(n.logits, 0), atol=0.05)


def test_unknown_model():
    with pytest.raises(ModelError, match="unknown model"):
        build_model("nope", 8, 2)
    with pytest.raises(ModelError, match="bad option"):
        build_model("abmil", 8, 2, wings=3)


# -- labels and bags -----------------------------------------------------------------------------------
def _write_bags(folder, n_slides=12, dim=8, seed=0, signal=3.0):
    rng = np.random.default_rng(seed)
    rows = ["slide_id,patient_id,label,site"]
    for i in range(n_slides):
        y = i % 2
        n = int(rng.integers(10, 30))
        f = rng.normal(size=(n, dim)).astype(np.float32)
        if y:
            f[:2, 0] += signal
        coords = np.stack([np.arange(n) * 256, np.zeros(n)], axis=1).astype(np.int64)
        write_bag(folder / f"s{i:02d}.h5", Bag(f, coords, {"encoder": "toy"}, {"patch_size_level0": 256}))
        rows.append(f"s{i:02d},p{i // 2},{'tumor' if y else 'normal'},A")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def test_labels_and_matching(tmp_path):
    labels = _write_bags(tmp_path)
    table = read_labels(labels)
    assert table.class_names == ["normal", "tumor"] and table.extra["site"][0] == "A"
    bags = find_bags(tmp_path)
    _, paths, warnings = match_bags(table, bags)
    assert len(paths) == 12 and warnings == table.warnings and bag_dims(paths) == 8  # mixed-label patients
    (tmp_path / "more.csv").write_text(labels.read_text() + "ghost1,p9,tumor,A\nghost2,p9,tumor,A\n")
    with pytest.raises(DataError, match="2 of 14 labelled slides have no bag"):
        match_bags(read_labels(tmp_path / "more.csv"), bags)
    _, paths, warnings = match_bags(read_labels(tmp_path / "more.csv"), bags, skip_missing=True)
    assert len(paths) == 12 and "ghost1" in warnings[0]
    _, paths, warnings = match_bags(table.subset(range(10)), bags)
    assert "2 bags have no label" in warnings[0]
    with pytest.raises(DataError, match=r"'tumor' \(6\)"):
        read_labels(labels, classes=["normal", "benign"])
    (tmp_path / "bad.csv").write_text("slide_id,label\ns00,tumor\n")
    with pytest.raises(DataError, match=r"missing column.*patient_id"):
        read_labels(tmp_path / "bad.csv")
    (tmp_path / "dup.csv").write_text("slide_id,patient_id,label\ns00,p0,tumor\ns00,p0,normal\n")
    with pytest.raises(DataError, match="listed twice"):
        read_labels(tmp_path / "dup.csv")
    write_bag(tmp_path / "odd" / "x.h5", Bag(np.zeros((3, 5), np.float32), np.zeros((3, 2), np.int64)))
    with pytest.raises(DataError, match="different feature sizes"):
        bag_dims([*paths[:2], tmp_path / "odd" / "x.h5"])


def test_bag_dataset_streams_and_subsamples(tmp_path):
    _write_bags(tmp_path)
    paths = sorted(tmp_path.glob("*.h5"))
    ds = BagDataset(paths, np.zeros(len(paths), int), max_tiles=5, seed=3)
    assert not hasattr(ds, "features")  # nothing cached: each item is read from disk when asked
    a = ds[0]["features"]
    assert a.shape == (5, 8) and a.dtype == torch.float32
    assert torch.equal(a, ds[0]["features"])  # same epoch, same draw
    ds.set_epoch(1)
    assert not torch.equal(a, ds[0]["features"])


# -- training ------------------------------------------------------------------------------------------
def _toy_sets(seed=0, n=24):
    rng = np.random.default_rng(seed)
    feats, ys = [], []
    for i in range(n):
        f = rng.normal(size=(int(rng.integers(10, 30)), 8)).astype(np.float32)
        if i % 2:
            f[:2, 0] += 4.0
        feats.append(f)
        ys.append(i % 2)
    return ArrayBagDataset(feats[: n // 2 + 4], ys[: n // 2 + 4]), ArrayBagDataset(
        feats[n // 2 + 4 :], ys[n // 2 + 4 :]
    )


def test_train_fold_learns_deterministic_and_resumes(tmp_path):
    cfg = TrainConfig(model="abmil", epochs=6, lr=2e-3, patience=10, seed=7, device="cpu")
    train, val = _toy_sets()
    a = train_fold(cfg, train, val, ["neg", "pos"], 8, tmp_path / "a")
    b = train_fold(cfg, train, val, ["neg", "pos"], 8, tmp_path / "b")
    ma, mb = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    for k, v in ma.model.state_dict().items():
        assert torch.equal(v, mb.model.state_dict()[k]), k
    assert a["history"] == b["history"]
    assert a["history"][-1]["val_auroc"] >= 0.9  # a planted 2-tile signal is learnt
    assert ma.meta["class_names"] == ["neg", "pos"] and ma.meta["train_config"]["seed"] == 7
    assert ma.temperature > 0 and 0 < ma.threshold < 1

    class Stop(Exception):
        pass

    def stop_at_3(rec):
        if rec["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        train_fold(cfg, train, val, ["neg", "pos"], 8, tmp_path / "c", on_epoch=stop_at_3)
    c = train_fold(cfg, train, val, ["neg", "pos"], 8, tmp_path / "c")  # resumes from last.pt
    assert c["history"] == a["history"]
    mc = load_checkpoint(tmp_path / "c")
    for k, v in ma.model.state_dict().items():
        assert torch.equal(v, mc.model.state_dict()[k]), k
    with pytest.raises(TrainError, match="other options"):
        train_fold(
            TrainConfig(model="abmil", epochs=7, seed=7, device="cpu"),
            train,
            val,
            ["neg", "pos"],
            8,
            tmp_path / "c",
        )


@pytest.mark.parametrize("balance", ["sampler", "none"])
def test_balance_and_schedules(tmp_path, balance):
    train, val = _toy_sets(1)
    cfg = TrainConfig(
        model="instance-topk", epochs=3, balance=balance, schedule="plateau", monitor="auroc", device="cpu"
    )
    res = train_fold(cfg, train, val, ["neg", "pos"], 8, tmp_path)
    assert res["epochs_run"] == 3 and (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()


# -- end to end on the bundled slide -------------------------------------------------------------------
def _tile_features(rgb: np.ndarray) -> np.ndarray:
    """A fixed 8-d colour feature: mean and std of R, G, B; mean saturation; fraction of dark pixels."""
    x = rgb.reshape(-1, 3).astype(np.float32) / 255.0
    mx, mn = x.max(1), x.min(1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0)
    return np.r_[x.mean(0), x.std(0), sat.mean(), (x.mean(1) < 0.45).mean()].astype(np.float32)


def slide_tiles(sample_slide):
    """Tissue tiles of the bundled slide: level-0 coords (N, 2), features (N, 8), tissue fraction."""
    with open_slide(sample_slide) as slide:
        w, h = slide.dimensions
        rgb = slide.read_region((0, 0), 0, (w, h))
    coords, feats = [], []
    for y in range(0, h - TILE + 1, TILE):
        for x in range(0, w - TILE + 1, TILE):
            tile = rgb[y : y + TILE, x : x + TILE]
            f = tile.astype(np.float32) / 255.0
            sat = (f.max(2) - f.min(2)) / np.maximum(f.max(2), 1e-6)
            if (sat > 0.08).mean() >= 0.5:
                coords.append((x, y))
                feats.append(_tile_features(tile))
    return np.asarray(coords, np.int64), np.stack(feats), (w, h)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def slide_job(tmp_path_factory, sample_slide):
    """Bags of 24 pseudo-slides (made-up labels, see the module docstring) + the whole-slide bag."""
    root = tmp_path_factory.mktemp("mil_e2e")
    coords, feats, _ = slide_tiles(sample_slide)
    dark = np.argsort(feats[:, 7])[::-1][: max(10, len(feats) // 7)]
    rest = np.setdiff1d(np.arange(len(feats)), dark)
    rng = np.random.default_rng(0)
    attrs = {"encoder": "colour-stats-8", "mpp": 0.499}
    cattrs = {"patch_size_level0": TILE, "patch_size": TILE}
    rows = ["slide_id,patient_id,label"]
    for i in range(24):
        positive = i % 2 == 1
        pick = np.r_[
            rng.choice(dark, 5, replace=False) if positive else [],
            rng.choice(rest, 40 - 5 * positive, replace=False),
        ]
        pick = rng.permutation(pick.astype(int))
        write_bag(root / "bags" / f"cmu_{i:02d}.h5", Bag(feats[pick], coords[pick], attrs, cattrs))
        rows.append(f"cmu_{i:02d},case{i // 2},{'tumor' if positive else 'normal'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    write_bag(root / "whole" / "CMU-1-Small-Region.h5", Bag(feats, coords, attrs, cattrs))
    return root


def test_end_to_end_train_evaluate_heatmap(slide_job, sample_slide, tmp_path):
    from wsikit.cli.main import app

    run = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["train", str(slide_job / "bags"), "--labels", str(slide_job / "labels.csv"), "--model", "abmil-gated",
         "--folds", "2", "--test-fraction", "0.25", "--epochs", "6", "--lr", "1e-3", "--bootstrap", "100",
         "--device", "cpu", "--threads", "1", "--out", str(run)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    for f in ("config.json", "splits.csv", "report.json", "report.md", "roc.png", "pr.png", "reliability.png",
              "predictions_oof.csv", "predictions_test.csv", "fold_0/best.pt", "fold_0/last.pt", "fold_1/result.json",
              "fold_1/predictions_val.csv", "fold_1/predictions_test.csv", "fold_0/report.md"):  # fmt: skip
        assert (run / f).is_file(), f
    report = json.loads((run / "report.json").read_text())
    assert {"val_mean_std", "test_mean_std", "test_ensemble", "per_fold"} <= set(report)
    assert len(report["test_ensemble"]["auroc_ci"]) == 2
    assert "±" in (run / "report.md").read_text()
    ckpt = torch.load(run / "fold_0" / "best.pt", weights_only=True)
    assert ckpt["provenance"]["attrs"]["encoder"] == "colour-stats-8"
    assert ckpt["label_map"] == {"normal": 0, "tumor": 1}
    splits = (run / "splits.csv").read_text().splitlines()
    assert splits[0] == "slide_id,patient_id,label,fold,split"

    # a second call finds every fold done and only rebuilds the report
    res = runner.invoke(app, ["train", str(slide_job / "bags"), "--labels", str(slide_job / "labels.csv"), "--model",
                              "abmil-gated", "--folds", "2", "--test-fraction", "0.25", "--epochs", "6", "--lr", "1e-3",
                              "--bootstrap", "100", "--device", "cpu", "--threads", "1", "--out", str(run)])  # fmt: skip
    assert res.exit_code == 0, res.output

    ev = runner.invoke(app, ["evaluate", str(run), "--bags", str(slide_job / "bags"), "--labels",
                             str(slide_job / "labels.csv"), "--out", str(tmp_path / "ev"), "--device", "cpu", "--threads", "1"])  # fmt: skip
    assert ev.exit_code == 0, ev.output
    pred = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()
    assert pred[0] == "slide_id,patient_id,fold_0_p_tumor,fold_1_p_tumor,label,p_normal,p_tumor,pred"
    assert len(pred) == 25
    assert (tmp_path / "ev" / "report.md").is_file() and (tmp_path / "ev" / "roc.png").is_file()

    out_png = tmp_path / "hm" / "heatmap.png"
    hm = runner.invoke(app, ["heatmap", "--model", str(run / "fold_0"), "--slide", str(sample_slide), "--bag",
                             str(slide_job / "whole" / "CMU-1-Small-Region.h5"), "--out", str(out_png),
                             "--max-side", "1024", "--device", "cpu", "--threads", "1"])  # fmt: skip
    assert hm.exit_code == 0, hm.output
    for suffix in (".png", "_overlay.png", "_rgba.png", "_montage.png", "_scores.csv", ".geojson"):
        assert (tmp_path / "hm" / f"heatmap{suffix}").is_file(), suffix
    _assert_heatmap_on_tissue(tmp_path / "hm" / "heatmap_rgba.png", sample_slide)


def _assert_heatmap_on_tissue(rgba_png, sample_slide):
    """The opaque heatmap pixels are the tissue tiles: compare with a tissue mask of the thumbnail."""
    from PIL import Image

    rgba = np.asarray(Image.open(rgba_png))
    coords, _, (w, h) = slide_tiles(sample_slide)
    th, tw = rgba.shape[:2]
    expected = np.zeros((th, tw), bool)
    for x, y in coords:
        expected[
            round(y * th / h) : round((y + TILE) * th / h), round(x * tw / w) : round((x + TILE) * tw / w)
        ] = True
    opaque = rgba[..., 3] > 0
    assert (opaque == expected).mean() > 0.995
    with open_slide(sample_slide) as slide:
        thumb = slide.thumbnail(max_side=max(th, tw)).astype(np.float32) / 255
    sat = (thumb.max(2) - thumb.min(2)) / np.maximum(thumb.max(2), 1e-6)
    tissue = sat > 0.08
    assert tissue[opaque].mean() > 0.6  # heatmap lies on tissue ...
    assert tissue[~opaque].mean() < tissue[opaque].mean() / 2  # ... and far less of it off the tiles


def test_evaluate_refuses_other_feature_size(slide_job, tmp_path):
    cfg = TrainConfig(model="mean-pool", epochs=2, device="cpu", folds=2, bootstrap=0)
    table = read_labels(slide_job / "labels.csv")
    table, paths, _ = match_bags(table, find_bags(slide_job / "bags"))
    run_cv(cfg, table, paths, 8, tmp_path / "run")
    _write_bags(tmp_path / "other", dim=5)
    with pytest.raises(DataError, match="5-d features"):
        evaluate_run(
            tmp_path / "run",
            sorted((tmp_path / "other").glob("*.h5")),
            [f"s{i:02d}" for i in range(12)],
            tmp_path / "ev",
        )
    fm = load_checkpoint(tmp_path / "run" / "fold_1")
    assert predict_logits(fm.model, BagDataset(paths[:3])).shape == (3, 2)


def test_find_bags_in_job_layout(tmp_path):
    from wsikit.bags import bag_path

    bag = Bag(np.zeros((3, 4), np.float32), np.zeros((3, 2), np.int64))
    for enc in ("resnet50-trunc", "timm:vit_small"):
        for sid in ("a", "b"):
            write_bag(bag_path(tmp_path, "mpp0.50_256px_0ov", enc, sid), bag)
    with pytest.raises(DataError, match="several bag sets"):
        find_bags(tmp_path)
    found = find_bags(tmp_path, encoder="resnet50-trunc")
    assert sorted(found) == ["a", "b"] and found["a"] == bag_path(
        tmp_path, "mpp0.50_256px_0ov", "resnet50-trunc", "a"
    )
    with pytest.raises(DataError, match=r"found: mpp0\.50_256px_0ov/resnet50-trunc"):
        find_bags(tmp_path, spec="mpp1.00_256px_0ov")


def test_one_class_validation_fold(tmp_path):
    train, _ = _toy_sets(2)
    val = ArrayBagDataset([np.ones((5, 8), np.float32)] * 3, [1, 1, 1])
    cfg = TrainConfig(model="abmil", epochs=2, monitor="auroc", device="cpu")
    res = train_fold(cfg, train, val, ["neg", "pos"], 8, tmp_path)
    assert res["threshold"] == 0.5 and "one class" in res["warnings"][0]
