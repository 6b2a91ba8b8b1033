"""Shared fixtures: the real bundled slide, pyramids written from it, the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from wsikit.pyramid import write_pyramid
from wsikit.slide import SAMPLE_SLIDE, open_slide

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(  # beside the checkout; WSIKIT_SHARED_DATA for checkouts elsewhere (git worktrees)
    os.environ.get("WSIKIT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (real public test data); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_slide() -> Path:
    return SAMPLE_SLIDE


@pytest.fixture(scope="session")
def sample_rgb() -> np.ndarray:
    """The bundled slide's level-0 pixels, cropped to 2048×2944 (a multiple of 4 × 256 in x, 64 in y)."""
    with open_slide(SAMPLE_SLIDE) as slide:
        return slide.read_region((0, 0), 0, (2048, 2944))


@pytest.fixture(scope="session")
def pyramids(tmp_path_factory, sample_rgb) -> dict[str, Path]:
    """Pyramids written from the real slide: SVS-like and generic tiled (3 levels, MPP 0.499), and one without MPP."""
    root = tmp_path_factory.mktemp("pyramids")
    return {
        "svs": write_pyramid(root / "cmu_svs.svs", sample_rgb, 0.499, layout="svs"),
        "generic": write_pyramid(root / "cmu_generic.tif", sample_rgb, 0.499, layout="generic"),
        "no_mpp": write_pyramid(root / "cmu_nompp.tif", sample_rgb, None, layout="generic"),
    }


@pytest.fixture(scope="session")
def small_slides(tmp_path_factory, sample_rgb) -> list[Path]:
    """Four small real-tissue pyramids s0…s3 (different 1024-px crops of the bundled slide, 2 levels)."""
    root = tmp_path_factory.mktemp("small_slides")
    crops = [(600, 0), (600, 800), (600, 1600), (800, 1900)]
    return [
        write_pyramid(root / f"s{i}.svs", sample_rgb[y : y + 1024, x : x + 1024], 0.499, n_levels=2)
        for i, (x, y) in enumerate(crops)
    ]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: small models on a shared 2-core CPU run many times slower with two
    (oversubscribed OpenMP threads spin and wait)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def view_job(tmp_path_factory) -> dict[str, Path]:
    """The bundled slide as a job (20x/224 tiles, EfficientNet-Lite0 bags) and a small gated-ABMIL run
    trained on 12 pseudo-slides cut from its bag, with made-up labels (3 of 8 chosen tiles make a slide
    positive): what `wsikit view` shows. About 8 s."""
    import torch

    from wsikit.bags import Bag, bag_path, read_bag, write_bag
    from wsikit.jobs import SlideEntry
    from wsikit.mil.cv import run_cv
    from wsikit.mil.data import LabelsTable, bag_provenance
    from wsikit.mil.train import TrainConfig
    from wsikit.settings import pipeline_config
    from wsikit.stages.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("view_job")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = {
            "tile": {"specs": ["20x/224/0"], "min_tissue": 0.25},
            "extract": {"encoder": "efficientnet-lite0"},
        }
        run_pipeline([SlideEntry(SAMPLE_SLIDE, SAMPLE_SLIDE.stem)], root / "job", pipeline_config(cfg))
        bag = read_bag(bag_path(root / "job", "mpp0.50_224px_0ov", "efficientnet-lite0", SAMPLE_SLIDE.stem))
        feats = bag.features.astype(np.float32)
        direction = np.random.default_rng(0).standard_normal(feats.shape[1])
        order = np.argsort(-(feats - feats.mean(0)) @ direction)
        rng = np.random.default_rng(1)
        paths, labels = [], []
        for i in range(12):
            positive = i % 2 == 1
            pick = np.r_[
                rng.choice(order[:8], 3 * positive, replace=False), rng.choice(order[8:], 20, replace=False)
            ]
            paths.append(
                write_bag(
                    root / "pseudo" / f"p{i:02d}.h5",
                    Bag(feats[pick], bag.coords[pick], bag.attrs, bag.coords_attrs),
                )
            )
            labels.append("tumour" if positive else "normal")
        table = LabelsTable(
            None, [p.stem for p in paths], [f"case{i}" for i in range(12)], labels, ["normal", "tumour"]
        )
        train = TrainConfig(epochs=4, lr=1e-3, folds=2, device="cpu", bootstrap=20, min_epochs=1)
        run_cv(train, table, paths, feats.shape[1], root / "run", bag_provenance(paths))
    finally:
        torch.set_num_threads(threads)
    return {"job": root / "job", "run": root / "run", "slide_id": SAMPLE_SLIDE.stem}
