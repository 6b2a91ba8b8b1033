"""Learnable MIL benchmark with known ground truth (Ilse et al. 2018 style), on real images.

Instances are scikit-learn's bundled handwritten digits (8×8, 1,797 images), featurised once by a fixed
encoder: EfficientNet-Lite0 with its real ImageNet weights (wsikit's ``efficientnet-lite0``, 1280-d, digits
upscaled to 64 px). A bag holds 20-40 digits; it is positive iff it holds a 9, and a positive bag holds
exactly one (2.5-5 % of its tiles are witnesses, as in a slide with a small tumour focus). Train, validation and test bags draw from
disjoint image pools. Every model of the registry is trained with wsikit's own training loop
(``wsikit.mil.train.train_fold``: class-weighted loss, AdamW, cosine schedule, early stopping on the
validation loss) for several seeds.

Printed per model (mean ± std over seeds):
- test bag AUROC;
- instance localisation AUROC: for each positive test bag, the AUROC of the model's per-tile scores
  against "this tile is a 9", averaged over the positive bags;
- seconds per training run (this machine is shared: timings are noisy).

Models run with their registry defaults except TransMIL (width 128, 4 heads instead of 512/8; see SMALLER).

Run: ``.venv/bin/python benchmarks/bench_mil.py [--seeds 3] [--models abmil,mean-pool] [--out r.json]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsikit.metrics import binary_auroc
from wsikit.mil.data import ArrayBagDataset
from wsikit.mil.evaluate import load_checkpoint, predict_logits
from wsikit.mil.registry import list_models
from wsikit.mil.train import TrainConfig, train_fold

TARGET = 9
# TransMIL's default width (512, 8 heads) costs ~15x ABMIL per bag on one CPU thread; the benchmark uses a
# narrower one so the whole run stays at a few minutes. Every other model runs with its registry defaults.
SMALLER = {"transmil": {"dim": 128, "heads": 4}}


def digit_features(cache_dir: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(1797, 1280) EfficientNet-Lite0 features of the digits, their labels, the weights id (cached)."""
    from sklearn.datasets import load_digits

    from wsikit.encoders.build import get_encoder

    digits = load_digits()
    enc = get_encoder("efficientnet-lite0")
    cache = cache_dir / f"wsikit-bench-digits-{enc.weights_id.split(':')[-1][:16]}.npy"
    if cache.is_file():
        return np.load(cache), digits.target, enc.weights_id
    imgs = torch.from_numpy((digits.images / 16.0 * 255).round().astype(np.uint8))[:, None].repeat(1, 3, 1, 1)
    imgs = (
        torch.nn.functional.interpolate(imgs.float(), size=(64, 64), mode="bilinear").round().to(torch.uint8)
    )
    enc.input_size = 64  # digits are 8×8: 64 px keeps the encoder fast and the strokes several px wide
    feats = []
    with torch.inference_mode():
        for i in range(0, len(imgs), 128):
            feats.append(enc.model(enc.preprocess(imgs[i : i + 128])).float().numpy())
    out = np.concatenate(feats).astype(np.float32)
    np.save(cache, out)
    return out, digits.target, enc.weights_id


def make_bags(
    pool: np.ndarray,
    digits: np.ndarray,
    n_bags: int,
    rng: np.random.Generator,
    sizes: tuple[int, int] = (20, 40),
    witnesses: tuple[int, int] = (1, 1),
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """Half positive bags (``witnesses`` nines), half negative; returns (tile index arrays, y, tile labels)."""
    nines = pool[digits[pool] == TARGET]
    others = pool[digits[pool] != TARGET]
    bags, ys, inst = [], [], []
    for b in range(n_bags):
        positive = b % 2 == 1
        size = int(rng.integers(sizes[0], sizes[1] + 1))
        k = int(rng.integers(witnesses[0], witnesses[1] + 1)) if positive else 0
        idx = np.r_[rng.choice(nines, k, replace=False), rng.choice(others, size - k, replace=False)]
        idx = rng.permutation(idx)
        bags.append(idx)
        ys.append(int(positive))
        inst.append((digits[idx] == TARGET).astype(int))
    return bags, np.asarray(ys), inst


def localisation_auroc(model, feats: list[np.ndarray], inst: list[np.ndarray], y: np.ndarray) -> float:
    """Mean over positive bags of the AUROC of the tile scores against the true tile labels."""
    values = []
    with torch.no_grad():
        for f, lab, yy in zip(feats, inst, y, strict=True):
            if yy == 1:
                scores = model(torch.from_numpy(f)).tile_scores.numpy()
                values.append(binary_auroc(lab, scores))
    return float(np.mean(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--models", default=",".join(list_models()))
    ap.add_argument("--train-bags", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--bag-size", default="20,40", help="min,max tiles per bag")
    ap.add_argument("--witnesses", default="1,1", help="min,max nines in a positive bag")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="Also write the results as JSON.")
    args = ap.parse_args()
    torch.set_num_threads(1)  # small models: one thread each is fastest, and robust on a shared machine

    t0 = time.perf_counter()
    X, digits, weights_id = digit_features(Path(tempfile.gettempdir()))
    print(
        f"features: {X.shape} from efficientnet-lite0 ({weights_id[:23]}…) in {time.perf_counter() - t0:.1f} s"
    )
    results: dict[str, dict] = {}
    names = ["negative", "positive"]
    for model_name in args.models.split(","):
        rows = []
        for seed in range(args.seeds):
            rng = np.random.default_rng(1000 + seed)
            perm = rng.permutation(len(X))
            pools = np.split(perm, [int(0.5 * len(X)), int(0.65 * len(X))])  # train / val / test images
            sizes = tuple(int(v) for v in args.bag_size.split(","))
            wit = tuple(int(v) for v in args.witnesses.split(","))
            counts = (args.train_bags, 60, 200)
            data = [make_bags(p, digits, n, rng, sizes, wit) for p, n in zip(pools, counts, strict=True)]  # type: ignore[arg-type]
            sets = [(([X[i] for i in bags]), y, inst) for bags, y, inst in data]
            train_ds, val_ds, test_ds = (ArrayBagDataset(f, y, seed=seed) for f, y, _ in sets)
            cfg = TrainConfig(
                model=model_name,
                model_kwargs=SMALLER.get(model_name, {}),
                epochs=args.epochs,
                lr=args.lr,
                patience=args.patience,
                min_epochs=5,
                seed=seed,
                device="cpu",
                bootstrap=0,
            )
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                res = train_fold(cfg, train_ds, val_ds, names, X.shape[1], tmp)
                seconds = time.perf_counter() - t
                fm = load_checkpoint(tmp)
            probs = fm.probs(predict_logits(fm.model, test_ds))
            test_f, test_y, test_inst = sets[2]
            rows.append(
                {
                    "seed": seed,
                    "bag_auroc": binary_auroc(test_y, probs[:, 1]),
                    "instance_auroc": localisation_auroc(fm.model, test_f, test_inst, test_y),
                    "best_epoch": res["best_epoch"],
                    "seconds": seconds,
                }
            )
        bag = np.array([r["bag_auroc"] for r in rows])
        ins = np.array([r["instance_auroc"] for r in rows])
        results[model_name] = {
            "bag_auroc_mean": bag.mean(), "bag_auroc_std": bag.std(ddof=1) if len(bag) > 1 else 0.0,
            "instance_auroc_mean": ins.mean(), "instance_auroc_std": ins.std(ddof=1) if len(ins) > 1 else 0.0,
            "seconds_per_run": float(np.mean([r["seconds"] for r in rows])), "runs": rows,
        }  # fmt: skip
        r = results[model_name]
        print(
            f"{model_name:<14} bag AUROC {r['bag_auroc_mean']:.3f} ± {r['bag_auroc_std']:.3f}   "
            f"instance AUROC {r['instance_auroc_mean']:.3f} ± {r['instance_auroc_std']:.3f}   "
            f"{r['seconds_per_run']:.1f} s/run",
            flush=True,
        )
    print(
        f"\n| model | test bag AUROC (mean ± std, {args.seeds} seeds) | instance localisation AUROC | s/run |"
    )
    print("|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['bag_auroc_mean']:.3f} ± {r['bag_auroc_std']:.3f} | "
            f"{r['instance_auroc_mean']:.3f} ± {r['instance_auroc_std']:.3f} | {r['seconds_per_run']:.1f} |"
        )
    if "mean-pool" in results:
        base = results["mean-pool"]["bag_auroc_mean"]
        for name in ("abmil", "abmil-gated", "clam-sb", "clam-mb", "transmil", "dsmil"):
            if name in results:
                print(f"{name}: {results[name]['bag_auroc_mean'] - base:+.3f} bag AUROC over mean pooling")
    print(f"total {time.perf_counter() - t0:.0f} s (2 shared CPU cores: timings are noisy)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
