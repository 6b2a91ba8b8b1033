"""Bounded memory: training streams bags, extraction streams features, chunked tiling and masking agree.

Peak RSS at 10k vs 100k tiles is measured by ``benchmarks/bench_memory.py``; these tests check the
mechanisms that keep it flat, by counting (no timings, no RSS thresholds).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest
from torch import nn

import wsikit.tiling as tiling
import wsikit.tissue as tissue
from wsikit.bags import Bag, BagWriter, bag_path, read_bag, write_bag
from wsikit.encoders import IMAGENET_MEAN, IMAGENET_STD
from wsikit.encoders.build import Encoder
from wsikit.grids import grid_path, read_grid
from wsikit.jobs import SlideEntry
from wsikit.mil.data import BagDataset
from wsikit.mil.train import TrainConfig, train_fold
from wsikit.settings import ExtractConfig, TileConfig
from wsikit.slide import open_slide
from wsikit.specs import TileSpec
from wsikit.stages.extract import run_extraction
from wsikit.stages.tile import run_tiling
from wsikit.tiles import TileItems
from wsikit.tiling import build_grids

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_training_holds_a_bounded_number_of_bags(tmp_path, monkeypatch):
    """30 bags, 2 epochs of train_fold (training + validation passes): at most 3 bags alive at once
    (the one in use, the next being read and, during validation, the last training bag)."""
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(30):
        feats = rng.normal(size=(int(rng.integers(50, 200)), 16)).astype(np.float32)
        feats[:3, 0] += 3.0 * (i % 2)
        paths.append(write_bag(tmp_path / f"s{i:02d}.h5", Bag(feats, np.zeros((len(feats), 2), np.int64))))
        labels.append(i % 2)
    alive, peak, loads = [0], [0], [0]

    def released() -> None:
        alive[0] -= 1

    original = BagDataset.__getitem__

    def tracked(self: BagDataset, i: int) -> dict:
        item = original(self, i)
        loads[0] += 1
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(item["features"], released)
        return item

    monkeypatch.setattr(BagDataset, "__getitem__", tracked)
    train = BagDataset(paths[:20], labels[:20])
    val = BagDataset(paths[20:], labels[20:])
    cfg = TrainConfig(model="abmil", epochs=2, min_epochs=1, device="cpu", num_workers=0, bootstrap=0)
    train_fold(cfg, train, val, ["neg", "pos"], 16, tmp_path / "fold")
    assert loads[0] >= 2 * 30  # every bag was read each epoch …
    assert peak[0] <= 3  # … but never more than a constant few at a time
    assert alive[0] == 0


def _tiny_encoder() -> Encoder:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Encoder(
        "tiny", model.eval(), 8, 32, IMAGENET_MEAN, IMAGENET_STD, "bilinear", "fp32", None, "random"
    )


def test_extraction_streams_features_to_the_file_in_batches(tmp_path, pyramids, monkeypatch):
    """Rows reach the bag's on-disk dataset batch by batch, at most two batches behind the reads."""
    job = tmp_path / "job"
    spec = TileSpec(0.5, 64)
    summary = run_tiling([SlideEntry(pyramids["svs"], "s")], job, TileConfig((spec,)))
    assert not summary.failed
    n = len(read_grid(grid_path(job, spec, "s")))
    batch = 32
    reads, appends = [0], []
    read_item = TileItems.__getitem__
    append = BagWriter.append

    def counted_read(self: TileItems, i: int):
        reads[0] += 1
        return read_item(self, i)

    def checked_append(self: BagWriter, features, coords, tile_index=None) -> None:
        append(self, features, coords, tile_index)
        appends.append((len(features), reads[0], self.n, self._arrays["features"].shape[0]))

    monkeypatch.setattr(TileItems, "__getitem__", counted_read)
    monkeypatch.setattr(BagWriter, "append", checked_append)
    cfg = ExtractConfig("tiny", batch_size=batch, workers=0, device="cpu", precision="fp32")
    assert not run_extraction(job, cfg, encoder=_tiny_encoder()).failed
    assert n > 10 * batch and len(appends) == -(-n // batch)
    for rows, read_so_far, written, in_file in appends:
        assert rows <= batch and in_file == written  # each batch is in the file's dataset once appended
        assert read_so_far - written <= 2 * batch  # tiles are not read (decoded) ahead of writing
    assert len(read_bag(bag_path(job, spec.name, "tiny", "s"))) == n


def test_chunked_grids_equal_whole_grids(monkeypatch, sample_slide):
    """Tissue fractions, kept tiles and parents do not depend on the chunk size."""
    with open_slide(sample_slide) as slide:
        mask = tissue.compute_mask(slide)
        dims, mpp = slide.dimensions, slide.mpp0
    specs = [TileSpec(0.5, 64), TileSpec(1.0, 64), TileSpec(2.0, 64)]
    whole = build_grids(specs, dims, mpp, mask.mask, mask.scale, 0.5)
    monkeypatch.setattr(tiling, "CHUNK", 7)
    chunked = build_grids(specs, dims, mpp, mask.mask, mask.scale, 0.5)
    assert len(whole[0][2]) > 100
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_array_equal(a[2], b[2])
        np.testing.assert_array_equal(a[3], b[3])
        assert a[4].keys() == b[4].keys()
        for key in a[4]:
            np.testing.assert_array_equal(a[4][key], b[4][key])


def test_mask_in_strips_equals_mask_at_once(monkeypatch, sample_slide):
    with open_slide(sample_slide) as slide:
        rgb = slide.thumbnail(mpp=4.0)
    params = tissue.MaskParams(mpp=4.0, channel="both")
    at_once = tissue.otsu_mask(rgb, 4.0, params)
    monkeypatch.setattr(tissue.base, "STRIP_PIXELS", 1000)
    strips = tissue.otsu_mask(rgb, 4.0, params)
    assert at_once[0].any() and at_once[1] == strips[1]
    np.testing.assert_array_equal(at_once[0], strips[0])


def test_tile_images_and_manifest_are_streamed(tmp_path, pyramids):
    """Many tile images: every file and manifest row is written (in blocks of 1024, rows streamed)."""
    job = tmp_path / "job"
    spec = TileSpec(0.5, 32)
    cfg = TileConfig((spec,), save_tiles=True)
    assert not run_tiling([SlideEntry(pyramids["svs"], "s")], job, cfg).failed
    n = len(read_grid(grid_path(job, spec, "s")))
    folder = job / "patches" / spec.name
    assert n > 1024 and len(list((folder / "s").iterdir())) == n
    lines = (folder / "manifest.csv").read_text().splitlines()
    assert len(lines) == n + 1 and lines[0].startswith("path,label")
    assert Path(folder / lines[1].split(",")[0]).is_file()
