"""`wsikit patches train / evaluate / predict`: patch and X-ray classification."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import typer
from rich.table import Table

from wsikit.cli.common import build_settings, console, fail, layered_settings, out, say, warn

app = typer.Typer(
    help="Classify patches and X-rays: MedMNIST .npz, image folders or CSV manifests.", no_args_is_help=True
)

DATA_HELP = "A MedMNIST .npz, an image folder (root/<CLASS>/ or root/<split>/<CLASS>/) or a CSV manifest."


def _load(data: Path, patient_regex: str | None, classes: str | None):
    from wsikit.images.data import DataError, load_images

    try:
        return load_images(data, classes.split(",") if classes else None, patient_regex)
    except DataError as exc:
        raise fail(str(exc)) from exc


def _log(msg: str) -> None:
    console.print(msg, highlight=False)


def _headline(title: str, m: dict) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    keys = ("n", "auroc", "auroc_macro", "auroc_ci", "balanced_accuracy", "accuracy", "sensitivity", "specificity",
            "f1_macro", "ece", "temperature", "threshold")  # fmt: skip
    for k in keys:
        if k in m and m[k] is not None:
            v = m[k]
            text = (
                f"[{v[0]:.3f}, {v[1]:.3f}]"
                if isinstance(v, (list, tuple))
                else f"{v:.4g}"
                if isinstance(v, float)
                else str(v)
            )
            table.add_row(k, text)
    out.print(table)


def _cv_tables(summary: dict, folds: int) -> None:
    for part in ("heldout", "test"):
        if part in summary:
            table = Table(title=f"{folds}-fold {part} (mean ± std)")
            table.add_column("metric")
            table.add_column("value", justify="right")
            for key in ("auroc", "auroc_macro", "balanced_accuracy", "accuracy", "ece"):
                if key in summary[part]:
                    m = summary[part][key]
                    table.add_row(key, f"{m['mean']:.4f} ± {m['std']:.4f}")
            out.print(table)


@app.command()
def train(
    ctx: typer.Context,
    data: Path = typer.Argument(..., help=DATA_HELP),
    out_dir: Path = typer.Option(..., "--out", help="Where checkpoints, reports and curves go."),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="YAML recipe (sections 'model', 'train'; see configs/); options given here win.",
    ),
    encoder: str = typer.Option(
        "efficientnet-lite0", help="Registry encoder (wsikit.encoders) or timm:<name>."
    ),
    weights: Path | None = typer.Option(
        None, help="Local checkpoint for the encoder instead of its own weights."
    ),
    mode: str = typer.Option("transfer", help="transfer (frozen, then all) | finetune | scratch"),
    epochs: int = typer.Option(20),
    head_epochs: int = typer.Option(2, help="Head-only epochs of --mode transfer."),
    lr: float = typer.Option(3e-4, help="Learning rate of the whole network."),
    head_lr: float = typer.Option(3e-3, help="Learning rate of the head while the backbone is frozen."),
    batch_size: int = typer.Option(64),
    input_size: int = typer.Option(224, help="Square side the images are resized to."),
    small_input: bool = typer.Option(False, help="Stem stride 1, no stem max-pool (for 28-64 px images)."),
    grey: str = typer.Option(
        "replicate", help="Grey images: replicate to RGB | adapt (1-channel first conv)."
    ),
    imbalance: str = typer.Option("weights", help="weights | sampler | focal | none"),
    augment: str = typer.Option("auto", help="histology | xray | none | auto (xray if grey, else histology)"),
    color_jitter: float = typer.Option(0.0, help="Brightness/contrast jitter (off by default)."),
    monitor: str = typer.Option("auroc", help="Early stopping on validation auroc | loss."),
    patience: int = typer.Option(5),
    patient_regex: str | None = typer.Option(
        None, help="Patient id from file names: a regex (group 1) or a preset: kermany, kather2016, tcga."
    ),
    image_level: bool = typer.Option(
        False, "--image-level-split", help="Split by image although patient ids exist (optimistic; warns)."
    ),
    val_fraction: float = typer.Option(0.2, help="Validation share when the data has no val split."),
    test_fraction: float = typer.Option(0.0, help="Test share held out when the data has no test split."),
    folds: int = typer.Option(0, help="k-fold cross-validation (mean ± std) instead of one split."),
    classes: str | None = typer.Option(None, help="Comma-separated class order (default: sorted names)."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:i]"),
    workers: int = typer.Option(0, help="DataLoader worker processes (image files)."),
    resume: bool = typer.Option(False, help="Continue from <out>/last.pt if present."),
) -> None:
    """Train a classifier: split by patient, select on validation, report test once."""
    from wsikit.encoders import EncoderError
    from wsikit.images.data import DataError
    from wsikit.images.models import ModelError
    from wsikit.images.settings import ModelConfig, TrainConfig
    from wsikit.images.train import TrainError, cross_validate, fit
    from wsikit.splits import SplitError

    if grey not in ("replicate", "adapt"):
        raise fail(f"--grey {grey!r}: use replicate or adapt")
    ds = _load(data, patient_regex, classes)
    console.print(
        f"{data}: {len(ds)} images, {ds.n_classes} classes ({'multi-label' if ds.multilabel else 'single-label'}), "
        f"{'grey' if ds.channels == 1 else 'colour'}, "
        f"{'patients: ' + str(len(set(ds.patients))) if ds.patients is not None else 'no patient ids'}",
        highlight=False,
    )
    model = layered_settings(
        ctx, config, "model",
        {"encoder": (("encoder",), encoder), "input_size": (("input_size",), input_size),
         "small_input": (("small_input",), small_input)},
    )  # fmt: skip
    model["in_chans"] = 1 if grey == "adapt" and ds.channels == 1 else 3
    mcfg = build_settings(ModelConfig, model, config, "model")
    names = ("mode", "epochs", "head_epochs", "lr", "head_lr", "batch_size", "imbalance", "monitor", "patience",
             "augment", "color_jitter", "seed", "device", "resume")  # fmt: skip
    options = {n: ((n,), value) for n, value in zip(names, [mode, epochs, head_epochs, lr, head_lr, batch_size,
               imbalance, monitor, patience, augment, color_jitter, seed, device, resume], strict=True)}  # fmt: skip
    options["num_workers"] = (("workers",), workers)
    tcfg = build_settings(TrainConfig, layered_settings(ctx, config, "train", options), config, "train")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            if folds:
                summary = cross_validate(
                    ds, mcfg, tcfg, out_dir, folds, test_fraction, image_level, log=_log, weights=weights
                )
                _cv_tables(summary, folds)
            else:
                result = fit(
                    ds,
                    mcfg,
                    tcfg,
                    out_dir,
                    val_fraction,
                    test_fraction,
                    image_level,
                    log=_log,
                    weights=weights,
                )
                _headline("validation (selection)", result["val"])
                if "test" in result:
                    _headline("test (scored once)", result["test"])
        except (DataError, ModelError, TrainError, SplitError, EncoderError) as exc:
            raise fail(str(exc)) from exc
    for w in caught:
        console.print(f"[yellow]warning[/] {w.message}", highlight=False)
    console.print(f"outputs in {out_dir}/")


@app.command()
def evaluate(
    checkpoint: Path = typer.Argument(..., help="best.pt from wsikit patches train."),
    data: Path = typer.Argument(..., help=DATA_HELP),
    out_dir: Path = typer.Option(..., "--out"),
    split: str | None = typer.Option(
        None, help="The split to score: test (the default when the data has splits) | val | train | all."
    ),
    include_training: bool = typer.Option(
        False,
        "--include-training-images",
        help="Allow scoring the data's train split (--split train/all); its scores are optimistic if it trained the model.",
    ),
    patient_regex: str | None = typer.Option(None, help="Patient-id regex or preset (kept in the outputs)."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples for the CIs (0 = none)."),
    gradcam: int = typer.Option(16, help="Images in the Grad-CAM picture (0 = none)."),
    device: str = typer.Option("auto"),
) -> None:
    """Score a checkpoint on labelled images: report JSON/markdown, curves, predictions, Grad-CAM."""
    from wsikit.images.evaluate import EvaluateError, evaluate_classifier, scoring_split
    from wsikit.images.models import ModelError

    try:
        ds, name, notes = scoring_split(_load(data, patient_regex, None), split, include_training, str(data))
        for note in notes:
            (warn if "optimistic" in note else say)(note)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            m = evaluate_classifier(checkpoint, ds, out_dir, name, device, bootstrap, gradcam)
    except (ModelError, EvaluateError) as exc:
        raise fail(str(exc)) from exc
    for w in caught:
        warn(str(w.message))
    _headline(f"{name}: {len(ds)} images", m)
    console.print(f"report, curves and Grad-CAM in {out_dir}/")


@app.command()
def predict(
    checkpoint: Path = typer.Argument(..., help="best.pt from wsikit patches train."),
    images: list[Path] = typer.Argument(..., help="Image files or folders (searched recursively)."),
    out_csv: Path = typer.Option(Path("predictions.csv"), "--out", help="CSV of probabilities."),
    device: str = typer.Option("auto"),
) -> None:
    """Predict class probabilities (calibrated; binary decisions at the validation threshold)."""
    import numpy as np

    from wsikit.images.data import IMAGE_EXTENSIONS, ImageSet
    from wsikit.images.evaluate import predict_images
    from wsikit.images.models import ModelError

    files: list[Path] = []
    for p in images:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise fail(f"{p}: no such file or folder")
    if not files:
        raise fail("no images found; pass image files or folders holding .png/.jpg/.tif images")
    ds = ImageSet(
        files, np.zeros(len(files), dtype=np.int64), ["?"], source="predict", names=[str(f) for f in files]
    )
    try:
        probs = predict_images(checkpoint, ds, out_csv, device)
    except ModelError as exc:
        raise fail(str(exc)) from exc
    out.print_json(json.dumps({"images": len(files), "classes": probs.shape[1], "csv": str(out_csv)}))
