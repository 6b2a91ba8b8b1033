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
