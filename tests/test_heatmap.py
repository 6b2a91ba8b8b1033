"""Heatmaps: normalisation, rasterisation at tile coordinates, outputs, and placement on the real slide."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from wsikit.slide import open_slide
from wsikit.stages.heatmap import (
    HeatmapError,
    TileScores,
    normalize_scores,
    rasterize,
    render,
    size_level0_of,
)


def test_normalize():
    s = np.array([3.0, 1.0, 2.0, 2.0, 10.0])
    assert normalize_scores(s, "rank").tolist() == pytest.approx([0.75, 0.0, 0.375, 0.375, 1.0])
    assert normalize_scores(s, "minmax").tolist() == pytest.approx([2 / 9, 0, 1 / 9, 1 / 9, 1])
    p = normalize_scores(np.r_[np.arange(100.0), 1e6], "percentile")
    assert p.max() == 1.0 and 0.4 < p[50] < 0.6  # the outlier does not squash the rest
    assert normalize_scores(np.ones(4), "minmax").tolist() == [0.5] * 4
    with pytest.raises(HeatmapError):
        normalize_scores(s, "zscore")


def test_rasterize_places_and_averages():
    coords = np.array([[0, 0], [100, 0], [50, 0]])  # third tile overlaps the first two
    img = rasterize(coords, np.array([0.0, 1.0, 0.5]), 100, (0.1, 0.1), (20, 30))
    assert np.isnan(img[10:, :]).all() and np.isnan(img[:, 20:]).all()  # outside every tile
    assert img[5, 2] == 0.0 and img[5, 17] == 1.0  # covered by one tile
    assert img[5, 7] == pytest.approx(0.25)  # tiles 1 and 3: (0 + 0.5) / 2
    assert img[5, 12] == pytest.approx(0.75)  # tiles 2 and 3


def test_size_level0_of():
    from wsikit.bags import Bag

    bag = Bag(np.zeros((2, 3), np.float32), np.zeros((2, 2), np.int64), {}, {"patch_size_level0": 512})
    assert size_level0_of(bag) == 512
    with pytest.raises(HeatmapError, match="--size-level0"):
        size_level0_of(Bag(np.zeros((2, 3), np.float32), np.zeros((2, 2), np.int64)))


def test_render_on_slide_scores_where_coords_are(sample_slide, tmp_path):
    """Score = tile x position: the overlay's colour must follow x, tile by tile, on the real slide."""
    size = 256
    with open_slide(sample_slide) as slide:
        w, h = slide.dimensions
        xs, ys = np.meshgrid(np.arange(0, w - size, size), np.arange(0, h - size, size))
        coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
        keep = coords[:, 1] < h // 2  # only the top half has tiles
        coords = coords[keep]
        ts = TileScores(coords, coords[:, 0].astype(float), size)
        paths = render(slide, ts, tmp_path / "hm.png", normalize="minmax", max_side=800, top_k=3)
    rgba = np.asarray(Image.open(paths["rgba"]))
    th, tw = rgba.shape[:2]
    assert th == 800 or tw == 800
    # transparent where there is no tile (bottom half), opaque on the tiles
    assert rgba[int(0.8 * th), :, 3].max() == 0
    assert rgba[int(0.2 * th), : int((coords[:, 0].max() + size) * tw / w) - 2, 3].min() == 255
    # each tile's centre pixel has the colour of that tile's own score (x position, min-max scaled)
    import matplotlib

    jet = matplotlib.colormaps["jet"]
    xmax = coords[:, 0].max()
    for x, y in coords:
        cx, cy = int((x + size / 2) * tw / w), int((y + size / 2) * th / h)
        expected = np.asarray(jet(x / xmax, bytes=True)[:3], int)
        assert np.abs(rgba[cy, cx, :3].astype(int) - expected).max() <= 2, (x, y)
    overlay = np.asarray(Image.open(paths["overlay"]))
    assert overlay.shape == (th, tw, 3)
    with open_slide(sample_slide) as slide:
        thumb = slide.thumbnail(max_side=800)
    assert np.array_equal(overlay[int(0.8 * th)], thumb[int(0.8 * th)])  # untouched outside tiles
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == len(coords) and int(rows[0]["width"]) == size
    best = min(rows, key=lambda r: int(r["rank"]))
    assert int(best["x"]) == coords[:, 0].max()
    gj = json.loads(paths["geojson"].read_text())
    f0 = gj["features"][0]
    assert f0["geometry"]["coordinates"][0][2] == [int(coords[0, 0]) + size, int(coords[0, 1]) + size]
    assert set(f0["properties"]["measurements"]) == {"score", "score_norm"}
    for key in ("heatmap", "montage"):
        assert Image.open(paths[key]).size[0] > 300


def test_render_refuses_a_bag_of_another_slide(sample_slide, tmp_path):
    with open_slide(sample_slide) as slide:
        ts = TileScores(np.array([[50_000, 50_000], [60_000, 0]]), np.array([0.1, 0.2]), 256)
        with pytest.raises(HeatmapError, match="is the bag from this slide"):
            render(slide, ts, tmp_path / "x.png")
        with pytest.raises(HeatmapError, match=r"\.png"):
            render(slide, TileScores(np.zeros((1, 2), np.int64), np.ones(1), 256), tmp_path / "x.jpg")
