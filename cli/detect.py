"""`wsikit detect train / evaluate`: Faster R-CNN / RetinaNet on COCO-format boxes."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from wsikit.cli.common import console, fail, out

app = typer.Typer(help="Detect objects (lesions, nuclei…) with COCO-format boxes.", no_args_is_help=True)


def _coco(path: Path, images: Path | None):
    from wsikit.images.coco import DetectError, load_coco

    try:
        return load_coco(path, images)
    except DetectError as exc:
        raise fail(str(exc)) from exc


def _table(title: str, m: dict) -> None:
    table = Table(title=title)
    for col in ("category", "AP@0.5", "AP@[.5:.95]"):
        table.add_column(col, justify="right" if col != "category" else "left")
    for name, v in m["ap_50_per_class"].items():
        table.add_row(name, f"{v:.4f}", f"{m['ap_50_95_per_class'][name]:.4f}")
    table.add_row("[bold]mean", f"{m['map_50']:.4f}", f"{m['map_50_95']:.4f}")
    out.print(table)


@app.command()
def train(
    coco: Path = typer.Argument(..., help="COCO json of the training images."),
    out_dir: Path = typer.Option(..., "--out"),
    images: Path | None = typer.Option(None, help="Folder of the training images (default: the json's)."),
    val_coco: Path | None = typer.Option(None, "--val", help="COCO json for validation (model selection)."),
    val_images: Path | None = typer.Option(None, help="Folder of the validation images."),
    arch: str = typer.Option("fasterrcnn", help="fasterrcnn | retinanet (focal loss)"),
    backbone: str = typer.Option("efficientnet-lite0", help="Registry encoder (a CNN) for the FPN backbone."),
    pretrained: bool = typer.Option(True, help="Start from the encoder's ImageNet weights."),
    min_size: int = typer.Option(512, help="Shorter image side the detector resizes to."),
    max_size: int = typer.Option(1024),
    anchors: str = typer.Option("16,32,64,128", help="Anchor sizes (px) per pyramid level, smallest first."),
    trainable_layers: int = typer.Option(3, help="Backbone stages trained (from the top); 0 freezes it."),
    box_head_dim: int = typer.Option(1024, help="Faster R-CNN box-head width (256 suits small sets)."),
    rois_per_image: int = typer.Option(512, help="Faster R-CNN proposals sampled per training image."),
    proposals: int = typer.Option(1000, help="RPN proposals kept after NMS."),
    epochs: int = typer.Option(20),
    batch_size: int = typer.Option(4),
    lr: float = typer.Option(3e-4),
    patience: int = typer.Option(5),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu | cuda[:i]"),
) -> None:
    """Train a detector; keeps the epoch with the best validation mAP@[.5:.95]."""
    from wsikit.encoders import EncoderError
    from wsikit.images.coco import DetectError
    from wsikit.images.detect import DetectorConfig, DetTrainConfig, train_detector

    train_set = _coco(coco, images)
    val_set = _coco(val_coco, val_images) if val_coco else None
    if val_set is None:
        console.print("[yellow]warning[/] no --val: the last epoch is kept; pass a validation set to select")
    try:
        cfg = DetectorConfig(
            arch=arch, backbone=backbone, min_size=min_size, max_size=max_size,
            anchor_sizes=tuple(int(a) for a in anchors.split(",")), trainable_layers=trainable_layers,
            box_head_dim=box_head_dim, rois_per_image=rois_per_image, proposals=proposals,
        )  # fmt: skip
        res = train_detector(
            train_set, val_set, cfg,
            DetTrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, seed=seed, device=device),
            out_dir, pretrained=pretrained, log=lambda s: console.print(s, highlight=False),
        )  # fmt: skip
    except (DetectError, EncoderError, ValueError) as exc:
        raise fail(str(exc)) from exc
    console.print(f"best epoch {res.best.get('epoch')}: checkpoint {res.checkpoint}")


@app.command()
def evaluate(
    checkpoint: Path = typer.Argument(..., help="detector.pt from wsikit detect train."),
    coco: Path = typer.Argument(..., help="COCO json with the ground-truth boxes."),
    out_dir: Path = typer.Option(..., "--out"),
    images: Path | None = typer.Option(None, help="Folder of the images (default: the json's)."),
    draw: int = typer.Option(16, help="Images drawn with predictions and ground truth."),
    score_threshold: float = typer.Option(0.3, help="Lowest score drawn (mAP uses all detections)."),
    device: str = typer.Option("cpu"),
) -> None:
    """mAP@0.5 and mAP@[.5:.95], COCO results json and drawn predictions."""
    from wsikit.images.coco import DetectError
    from wsikit.images.detect import evaluate_detector

    gt = _coco(coco, images)
    try:
        m = evaluate_detector(checkpoint, gt, out_dir, device, draw, score_threshold)
    except DetectError as exc:
        raise fail(str(exc)) from exc
    _table(f"{m['n_images']} images, {m['n_detections']} detections", m)
    console.print(f"predictions.json, detection_report.md and drawn/ in {out_dir}/")
