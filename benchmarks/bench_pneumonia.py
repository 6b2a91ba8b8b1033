"""PneumoniaMNIST (28 px, real) on this CPU: wsikit's patch core beside MedMNIST v2's published ResNet-18.

Selection uses only ``val``: the best epoch by validation AUROC, temperature and Youden threshold
fitted on val; ``test`` is scored once at the end. The default set-up was itself chosen on validation
AUROC alone (two seeds each, on a GPU, test never looked at):

| set-up (28 px, grey) | val AUROC (seeds 0, 1) |
|---|---|
| ResNet-18 from scratch, stride-1 stem, no max-pool, lr 1e-3, class-balanced sampler, 12 epochs | 0.9967, 0.9970 |
| same with class-weighted loss | 0.9957, 0.9968 |
| EfficientNet-Lite0 ImageNet transfer, stride-1 stem, lr 1e-3 | 0.9932, 0.9925 |
| EfficientNet-Lite0 transfer at 64 px, standard stem | 0.9831, 0.9875 |
| EfficientNet-Lite0 transfer, lr 3e-4 | 0.9668, 0.9725 |

This copy of the training set is 10 % normal (388 / 3,882; the official one has 1,214 normals), the
test set 37.5 %, so the class imbalance handling matters. ``--max-minutes`` stops training after the
epoch that passes the budget, so the whole run stays under 20 minutes on a loaded 2-core CPU.

    .venv/bin/python benchmarks/bench_pneumonia.py [--epochs 12] [--out bench_out/pneumonia]
    .venv/bin/python benchmarks/bench_pneumonia.py --encoder efficientnet-lite0 --mode transfer --imbalance weights
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from wsikit.images.data import load_medmnist, split_set
from wsikit.images.evaluate import evaluate_classifier
from wsikit.images.settings import ModelConfig, TrainConfig
from wsikit.images.train import train_classifier

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "xray" / "pneumoniamnist_28.npz"
PUBLISHED = {  # MedMNIST v2 (Yang et al., Scientific Data 2023), Table 3, PneumoniaMNIST at 28 px
    "MedMNIST v2 ResNet-18 (28)": (0.944, 0.854),
    "MedMNIST v2 ResNet-50 (28)": (0.948, 0.854),
    "Google AutoML Vision": (0.991, 0.946),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--mode", default="scratch", choices=["transfer", "finetune", "scratch"])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3, help="Learning rate of the whole network.")
    ap.add_argument(
        "--max-minutes", type=float, default=16.0, help="Training time budget (checked per epoch)."
    )
    ap.add_argument("--imbalance", default="sampler", choices=["weights", "sampler", "focal", "none"])
    ap.add_argument("--threads", type=int, default=1)  # 2 threads on a shared 2-core box oversubscribe
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu (the must-show) or cuda (mixed precision).")
    ap.add_argument("--out", type=Path, default=Path("bench_out/pneumonia"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    data = load_medmnist(args.data)
    parts = split_set(data)
    train, val, test = (data.subset(parts[s]) for s in ("train", "val", "test"))
    print(
        f"{args.data.name}: train {train.class_counts()}, val {val.class_counts()}, test {test.class_counts()}"
    )
    mcfg = ModelConfig(encoder=args.encoder, input_size=28, in_chans=1, small_input=True)
    tcfg = TrainConfig(
        mode=args.mode, epochs=args.epochs, head_epochs=2, lr=args.lr, head_lr=3e-3, batch_size=64,
        imbalance=args.imbalance, patience=4, augment="xray", seed=args.seed, device=args.device,
        max_minutes=args.max_minutes,
    )  # fmt: skip
    t0 = time.perf_counter()
    res = train_classifier(train, val, mcfg, tcfg, args.out, log=lambda s: print(s, flush=True))
    t_train = time.perf_counter() - t0
    m = evaluate_classifier(res.checkpoint, test, args.out, "test", args.device, n_boot=1000, n_gradcam=16)
    t_total = time.perf_counter() - t0

    print(
        f"\ntrained {len(res.history)} epochs (best {res.best_epoch}) in {t_train / 60:.1f} min on "
        f"{args.device} ({torch.get_num_threads()} CPU thread(s); a shared machine, timings are noisy); "
        f"total {t_total / 60:.1f} min"
    )
    print(f"validation-chosen threshold {res.threshold:.3f}, temperature {res.temperature:.2f}\n")
    lo, hi = m["auroc_ci"]
    print(f"{'model (PneumoniaMNIST 28 px, official test, n=624)':<52} {'AUC':>6} {'ACC':>6}")
    for name, (auc, acc) in PUBLISHED.items():
        print(f"{name:<52} {auc:>6.3f} {acc:>6.3f}")
    print(
        f"{'wsikit ' + args.encoder + ' ' + args.mode + ', val threshold':<52} {m['auroc']:>6.3f} {m['accuracy']:>6.3f}"
    )
    print(
        f"{'wsikit ' + args.encoder + ' ' + args.mode + ', arg-max (0.5)':<52} {m['auroc']:>6.3f} {m['accuracy_at_0.5']:>6.3f}"
    )
    print(
        f"\ntest AUROC 95% bootstrap CI [{lo:.3f}, {hi:.3f}]; balanced accuracy {m['balanced_accuracy']:.3f}; "
        f"sensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f}; ECE {m['ece']:.3f}"
    )
    base_auc, base_acc = PUBLISHED["MedMNIST v2 ResNet-18 (28)"]
    verdict = "above" if m["auroc"] > base_auc and m["accuracy"] > base_acc else "NOT above"
    print(f"{verdict} the published ResNet-18 (28) on both AUC and ACC; reports in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
