"""The demo: the whole pipeline on the bundled real slide, writing pictures a person can look at.

info → tissue mask + QC → aligned 20x/10x tiling → Macenko stain normalization (fitted to a bundled
H&E target) → features with real ImageNet EfficientNet-Lite0 weights → a feature map (the tiles' first
three principal components as colours over the thumbnail). The slide has no label, so the labelled
stages run their documented example on real labelled data instead: PneumoniaMNIST (bundled).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from wsikit.bags import bag_path, read_bag, require_positions
from wsikit.jobs import SlideEntry
from wsikit.settings import pipeline_config
from wsikit.slide import SAMPLE_SLIDE, open_slide, slide_facts
from wsikit.stages.pipeline import PipelineSummary, run_pipeline

DATA = Path(__file__).parent / "data"
STAIN_TARGET = DATA / "stain_target_he.png"
PNEUMONIA = DATA / "pneumoniamnist_28.npz"
DEMO_CONFIG: dict[str, Any] = {
    "tile": {"specs": ["20x/224/0", "10x/224/0"], "min_tissue": 0.25},
    "extract": {"encoder": "efficientnet-lite0", "batch_size": 32},
}


@dataclass
class DemoResult:
    """Where the demo wrote what, and what it measured."""

    out_dir: Path
    facts: dict[str, Any]
    written: dict[str, Path] = field(default_factory=dict)
    numbers: dict[str, Any] = field(default_factory=dict)


def feature_map(
    slide_path: str | Path, bag_file: str | Path, out: str | Path, max_side: int = 1024
) -> tuple[Path, np.ndarray]:
    """Draw a bag's tiles coloured by their first three principal components over the slide thumbnail.

    Writes a side-by-side PNG (thumbnail | feature map) and returns it with the explained variance ratios.
    """
    from sklearn.decomposition import PCA

    from wsikit.stages.heatmap import rasterize, size_level0_of

    bag = read_bag(bag_file)
    require_positions(bag, str(bag_file), "a feature map")
    with open_slide(slide_path) as slide:
        thumb = slide.thumbnail(max_side=max_side)
        w0, h0 = slide.dimensions
    h, w = thumb.shape[:2]
    n_comp = min(3, len(bag), bag.dim)
    pca = PCA(n_components=n_comp, random_state=0).fit(bag.features.astype(np.float32))
    comps = pca.transform(bag.features.astype(np.float32))
    lo, hi = np.percentile(comps, 2, axis=0), np.percentile(comps, 98, axis=0)
    comps = np.clip((comps - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
    size0 = size_level0_of(bag)
    channels = [rasterize(bag.coords, comps[:, i], size0, (w / w0, h / h0), (h, w)) for i in range(n_comp)]
    channels += [channels[-1]] * (3 - n_comp)
    colour = np.stack(channels, axis=-1)
    inside = np.isfinite(colour[..., 0])
    picture = thumb.astype(np.float32) * 0.35 + 255 * 0.65  # faded slide outside the tiles
    picture[inside] = thumb[inside] * 0.35 + colour[inside] * 255 * 0.65
    side = np.concatenate([thumb, np.full((h, 8, 3), 255, np.uint8), picture.astype(np.uint8)], axis=1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(side).save(out)
    return out, pca.explained_variance_ratio_


#: The quick labelled example (the default): a class-balanced share of the training split, one epoch.
QUICK_TRAIN_PER_CLASS, QUICK_VAL_PER_CLASS = 300, 100


def _balanced(data: Any, per_class: int, seed: int = 0) -> Any:
    """Up to ``per_class`` images of each class of ``data`` (an ImageSet), in file order."""
    rng = np.random.default_rng(seed)
    pick = [rng.choice(idx, min(per_class, len(idx)), replace=False)
            for idx in (np.flatnonzero(data.labels == k) for k in range(data.n_classes))]  # fmt: skip
    return data.subset(np.sort(np.concatenate(pick)))


def pneumonia_example(
    out_dir: str | Path, full: bool = False, data: str | Path = PNEUMONIA, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """The labelled-data example: a small ResNet-18 on real PneumoniaMNIST (28 px), selected on ``val``,
    scored once on the official ``test`` split with the shared metrics (AUROC, sensitivity/specificity
    at the validation-chosen threshold, calibration), writing its report and ROC/PR/reliability PNGs.

    Quick by default (600 training images, one epoch: about a minute on 2 CPU cores); ``full`` trains
    the documented recipe (every training image, two epochs: about 7 minutes on 2 cores). ``say`` hears
    what runs, each epoch's result and the scoring."""
    from wsikit.images.data import load_medmnist, split_set
    from wsikit.images.evaluate import evaluate_classifier
    from wsikit.images.settings import ModelConfig, TrainConfig
    from wsikit.images.train import train_classifier

    images = load_medmnist(data)
    parts = split_set(images)
    train, val, test = (images.subset(parts[s]) for s in ("train", "val", "test"))
    n_all, epochs = len(train), 2 if full else 1
    if not full:
        train, val = _balanced(train, QUICK_TRAIN_PER_CLASS), _balanced(val, QUICK_VAL_PER_CLASS)
    say(
        f"labelled example: ResNet-18 on {len(train)} of {n_all} PneumoniaMNIST training images, {epochs} "
        f"epoch(s), {'about 7 minutes' if full else 'about a minute'} on 2 CPU cores"
        + ("" if full else "; `wsikit demo --full` trains on all of them for 2 epochs (about 7 minutes)")
    )
    model = ModelConfig(encoder="resnet18", input_size=28, in_chans=1, small_input=True)
    cfg = TrainConfig(
        mode="scratch", epochs=epochs, lr=1e-3, imbalance="sampler", augment="xray", device="cpu"
    )
    res = train_classifier(train, val, model, cfg, out_dir, log=say)
    say(f"scoring the test split once ({len(test)} images, 200 bootstrap resamples, Grad-CAM of 8)")
    return evaluate_classifier(res.checkpoint, test, out_dir, "test", "cpu", n_boot=200, n_gradcam=8)


def run_demo(
    out_dir: str | Path,
    slide_path: str | Path = SAMPLE_SLIDE,
    labelled: bool = True,
    say: Callable[[str], None] = lambda _: None,
    full: bool = False,
) -> DemoResult:
    """Run the pipeline on one slide (the bundled sample by default) into ``out_dir``, then the labelled
    example (quick, or ``full``: see :func:`pneumonia_example`)."""
    from wsikit.stain import fit_normalizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_slide(slide_path) as slide:
        result = DemoResult(out, slide_facts(slide))
        slide_id = slide.slide_id
        thumb = out / f"{slide_id}_thumbnail.png"
        Image.fromarray(slide.thumbnail(max_side=1024)).save(thumb)
        result.written["thumbnail"] = thumb

    say("fitting Macenko stain normalization to the bundled H&E target")
    stain_json = fit_normalizer("macenko", [STAIN_TARGET]).save(out / "stain_macenko.json")
    result.written["stain target"] = Path(stain_json)

    say(
        "tissue mask, aligned 20x/10x tiles, EfficientNet-Lite0 features (real ImageNet weights): "
        "about half a minute"
    )
    job = out / "job"
    cfg = pipeline_config(
        {**DEMO_CONFIG, "extract": {**DEMO_CONFIG["extract"], "stain": str(stain_json)}}, "demo"
    )
    summary: PipelineSummary = run_pipeline([SlideEntry(Path(slide_path), slide_id)], job, cfg)
    failures = [s.error for part in summary.stages.values() for s in part.failed]
    if failures:
        raise RuntimeError(f"demo pipeline failed: {failures[0]}")
    result.written["job directory"] = job
    result.written["tissue QC"] = job / "qc" / f"{slide_id}.png"
    result.written["tissue GeoJSON"] = job / "masks" / f"{slide_id}.geojson"
    fine = cfg.tile.specs[0].name
    bag = bag_path(job, fine, "efficientnet-lite0", slide_id)
    result.written["feature bag"] = bag
    picture, variance = feature_map(slide_path, bag, out / f"{slide_id}_feature_map.png")
    result.written["feature map"] = picture
    result.numbers["tiles"] = len(read_bag(bag))
    result.numbers["pca variance (3 comps)"] = round(float(variance.sum()), 3)
    if labelled:
        metrics = pneumonia_example(out / "pneumoniamnist", full=full, say=say)
        result.written["PneumoniaMNIST report"] = out / "pneumoniamnist" / "test_report.md"
        result.numbers["PneumoniaMNIST test AUROC"] = round(metrics["auroc"], 3)
        result.numbers["  sensitivity/specificity"] = (
            f"{metrics['sensitivity']:.3f} / {metrics['specificity']:.3f}"
        )
        result.numbers["  ECE (calibrated)"] = round(metrics["ece"], 3)
    return result
