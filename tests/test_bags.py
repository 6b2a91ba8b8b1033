"""Feature bags: h5/zarr round trips, streaming writes, the real shared bag, peer adapters and exports."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from wsikit.bags import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Bag,
    BagError,
    BagWriter,
    bag_path,
    export_bag,
    new_attrs,
    read_bag,
    read_bag_shape,
    write_bag,
)

COORDS_ATTRS = {
    "patch_size": 256,
    "patch_size_level0": 512,
    "level0_magnification": 40.0,
    "target_magnification": 20.0,
    "target_mpp": 0.5,
    "slide_mpp": 0.25,
    "overlap": 0,
    "name": "s1",
}


def make_bag(n: int = 37, d: int = 24, seed: int = 0) -> Bag:
    rng = np.random.default_rng(seed)
    coords = np.stack([np.arange(n) * 512, (np.arange(n) % 5) * 512], axis=1).astype(np.int64)
    attrs = new_attrs(
        slide_id="s1",
        encoder="resnet18",
        weights_id="random",
        preprocessing={"input_size": 224, "mean": [0.485, 0.456, 0.406]},
        stain=None,
        tile_spec="mpp0.50_256px_0ov",
        tile_size=256,
        slide_mpp=0.25,
    )
    return Bag(
        rng.standard_normal((n, d)).astype(np.float32),
        coords,
        attrs,
        dict(COORDS_ATTRS),
        tile_index=np.arange(n, dtype=np.int64) * 2,
        skipped_coords=np.array([[1024, 2048]], np.int64),
    )


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_round_trip(tmp_path, fmt):
    bag = make_bag()
    path = write_bag(tmp_path / f"s1.{fmt}", bag)
    back = read_bag(path)
    np.testing.assert_array_equal(back.features, bag.features)
    np.testing.assert_array_equal(back.coords, bag.coords)
    assert back.coords.dtype == np.int64 and back.features.dtype == np.float32
    np.testing.assert_array_equal(back.tile_index, bag.tile_index)
    np.testing.assert_array_equal(back.skipped_coords, bag.skipped_coords)
    assert back.attrs["format"] == FORMAT_NAME and back.attrs["format_version"] == FORMAT_VERSION
    assert back.attrs["preprocessing"] == {"input_size": 224, "mean": [0.485, 0.456, 0.406]}
    assert back.attrs["stain"] is None
    assert back.attrs["n_tiles"] == 37 and back.attrs["n_skipped"] == 1
    assert back.attrs["source_format"] == "wsikit"
    assert back.coords_attrs == COORDS_ATTRS
    assert read_bag_shape(path) == (37, 24)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_empty_bag_has_shapes(tmp_path, fmt):
    bag = Bag(np.zeros((0, 16), np.float32), np.zeros((0, 2), np.int64), {"slide_id": "e"})
    back = read_bag(write_bag(tmp_path / f"e.{fmt}", bag))
    assert back.features.shape == (0, 16) and back.coords.shape == (0, 2)


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_float16_compression_and_context(tmp_path, fmt):
    bag = make_bag()
    bag.context = {"mpp1.00_256px_0ov": bag.features[::-1].copy()}
    bag.context_index = {"mpp1.00_256px_0ov": np.arange(len(bag))[::-1].copy()}
    comp = "gzip" if fmt == "h5" else "zstd"
    back = read_bag(write_bag(tmp_path / f"s.{fmt}", bag, dtype="float16", compression=comp))
    assert back.features.dtype == np.float16
    np.testing.assert_allclose(back.features, bag.features, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(back.context_index["mpp1.00_256px_0ov"], np.arange(len(bag))[::-1])
    assert back.multiscale().shape == (len(bag), 2 * bag.dim)


def test_h5_is_chunked(tmp_path):
    path = write_bag(tmp_path / "s.h5", make_bag(n=5000, d=64))
    with h5py.File(path) as fh:
        assert fh["features"].chunks is not None and fh["features"].chunks[1] == 64


def test_streaming_writer_is_atomic(tmp_path):
    dest = tmp_path / "s.h5"
    with pytest.raises(RuntimeError), BagWriter(dest, 8, {"slide_id": "s"}) as writer:
        writer.append(np.ones((4, 8), np.float32), np.zeros((4, 2)))
        raise RuntimeError("killed")
    assert not dest.exists() and not list(tmp_path.iterdir())
    with BagWriter(dest, 8, {"slide_id": "s"}) as writer:
        for i in range(3):
            writer.append(np.full((4, 8), i, np.float32), np.full((4, 2), i))
    back = read_bag(dest)
    assert back.features.shape == (12, 8) and back.features[-1, 0] == 2


def test_bag_path_layout(tmp_path):
    assert bag_path(tmp_path, "mpp0.50_256px_0ov", "resnet50-trunc", "s1") == (
        tmp_path / "bags" / "mpp0.50_256px_0ov" / "resnet50-trunc" / "s1.h5"
    )
    assert bag_path(tmp_path, "x", "timm:hf-hub:a/b", "s1", fmt="zarr").name == "s1.zarr"
    assert bag_path(tmp_path, "x", "timm:hf-hub:a/b", "s1").parent.name == "timm_hf-hub_a_b"


def test_reads_real_shared_bag(shared_data):
    bag = read_bag(shared_data / "bags" / "TCGA-AD-6964-01Z-00-DX1" / "features.h5")
    assert bag.features.shape == (777, 512) and bag.coords.shape == (777, 2)
    assert bag.coords.dtype == np.int64 and bag.attrs["source_format"] == "feats-px"
    # the staged tiles are named by their level-0 top-left coordinates
    tiles = sorted((shared_data / "bags" / "TCGA-AD-6964-01Z-00-DX1").glob("Tile_*.jpg"))
    for tile in tiles:
        x, y = (int(v) for v in tile.stem.removeprefix("Tile_(").removesuffix(")").split(","))
        assert ((bag.coords[:, 0] == x) & (bag.coords[:, 1] == y)).any()
    assert read_bag_shape(shared_data / "bags" / "TCGA-AD-6964-01Z-00-DX1" / "features.h5") == (777, 512)


def test_export_clam_round_trip(tmp_path):
    bag = make_bag()
    h5, pt = export_bag(bag, "clam", tmp_path)
    assert h5 == tmp_path / "h5_files" / "s1.h5" and pt == tmp_path / "pt_files" / "s1.pt"
    with h5py.File(h5) as fh:
        assert set(fh) == {"features", "coords"} and fh["coords"].dtype == np.int32
    assert torch.load(pt, weights_only=True).shape == (37, 24)
    for path in (h5, pt):
        back = read_bag(path)
        assert back.attrs["source_format"] == "clam"
        np.testing.assert_array_equal(back.features, bag.features)
        np.testing.assert_array_equal(back.coords, bag.coords)


def test_export_trident_round_trip(tmp_path):
    bag = make_bag()
    (path,) = export_bag(bag, "trident", tmp_path)
    back = read_bag(path)
    assert back.attrs["source_format"] == "trident" and back.attrs["encoder"] == "resnet18"
    assert back.coords_attrs["patch_size_level0"] == 512
    np.testing.assert_array_equal(back.coords, bag.coords)


def test_export_stamp_round_trip(tmp_path):
    bag = make_bag()
    (path,) = export_bag(bag, "stamp", tmp_path)
    with h5py.File(path) as fh:
        assert fh["feats"].dtype == np.float16 and fh["coords"].dtype == np.float32
        assert fh.attrs["unit"] == "um" and fh.attrs["tile_size_um"] == pytest.approx(128.0)
        np.testing.assert_allclose(fh["coords"][:], bag.coords * 0.25)
    back = read_bag(path)
    assert back.attrs["source_format"] == "stamp" and back.attrs["coords_unit"] == "px"
    np.testing.assert_array_equal(back.coords, bag.coords)
    np.testing.assert_allclose(back.features, bag.features, rtol=1e-3, atol=1e-3)


def test_stamp_file_without_mpp_keeps_micrometres(tmp_path):
    path = tmp_path / "stamp.h5"
    with h5py.File(path, "w") as fh:
        fh["feats"] = np.ones((3, 4), np.float16)
        fh["coords"] = np.array([[0, 0], [112, 0], [224, 112]], np.float32)
        fh.attrs.update({"unit": "um", "stamp_version": "2.2.0", "tile_size_um": 112.0})
    bag = read_bag(path)
    assert bag.attrs["coords_unit"] == "um" and bag.coords[2, 0] == 224.0
    np.testing.assert_array_equal(read_bag(path, slide_mpp=0.5).coords[1], [224, 0])


def test_export_slideflow_round_trip(tmp_path):
    bag = make_bag()
    pt, index, config = export_bag(bag, "slideflow", tmp_path)
    np.testing.assert_array_equal(np.load(index)["arr_0"], bag.coords + 256)  # centres
    cfg = json.loads(config.read_text())
    assert cfg["num_features"] == 24 and cfg["tile_px"] == 256 and cfg["tile_um"] == 128.0
    assert isinstance(cfg["tile_um"], int) and "slide_mpp" not in cfg  # one config per folder of slides
    assert read_bag(pt).attrs["coords_origin"] == "center"  # slideflow's own files: centres without an MPP
    back = read_bag(pt, slide_mpp=0.25)
    assert back.attrs["source_format"] == "slideflow" and back.attrs["coords_origin"] == "top-left"
    np.testing.assert_array_equal(back.coords, bag.coords)
    np.testing.assert_array_equal(back.features, bag.features)


def test_tiatoolbox_zarr(tmp_path):
    import zarr

    group = zarr.open_group(store=str(tmp_path / "t.zarr"), mode="w", zarr_format=3)
    group.create_array("features", data=np.ones((2, 3), np.float32))
    group.create_array("coordinates", data=np.array([[0, 0, 224, 224], [224, 0, 448, 224]]))
    bag = read_bag(tmp_path / "t.zarr")
    assert bag.attrs["source_format"] == "tiatoolbox" and bag.coords.tolist() == [[0, 0], [224, 0]]


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(BagError, match="no such bag"):
        read_bag(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(BagError, match=r"junk\.h5"):
        read_bag(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as fh:
        fh["images"] = np.zeros(3)
    with pytest.raises(BagError, match="no 'features' or 'feats'"):
        read_bag(other)
    with pytest.raises(BagError, match="unknown export layout"):
        export_bag(make_bag(), "nope", tmp_path)
    with pytest.raises(BagError, match="rows"):
        Bag(np.zeros((3, 2)), np.zeros((2, 2)))
