"""Issue 19 #1-#5 and the per-peer round trips: the peers' files written exactly as their own writers
write them (dataset names, dtypes, attributes, units), read with ``read_bag``, exported back and compared.

Layouts from the peers' code (facts only, no code copied): CLAM mahmoodlab/CLAM@53e2409
(extract_features_fp.py, utils/file_utils.py), TRIDENT mahmoodlab/TRIDENT@a91fa84 (IO.py save_h5 /
coords_to_h5, wsi_objects/WSI.py), STAMP KatherLab/STAMP@c54ce06 (preprocessing/__init__.py,
modeling/data.py get_coords), slideflow slideflow/slideflow@7f5a40b (model/features.py to_torch,
slide/wsi.py), tiatoolbox TissueImageAnalytics/tiatoolbox@6fc8a2e (models/engine/engine_abc.py).
Comments say which tests found a defect before the fix (FAIL before) and which guard what worked.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wsikit.bags import Bag, BagError, export_bag, export_bags, read_bag, read_bag_shape, write_bag
from wsikit.cli.main import app

RNG = np.random.default_rng(19)
FEATS = RNG.standard_normal((40, 16)).astype(np.float32)
GRID = np.array([(x * 512, y * 512) for y in range(8) for x in range(5)], np.int64)  # level-0 top-left


# -- the peers' layouts (facts: notes/interop/peers.md) ------------------------------------------------
def write_stamp(
    path: Path,
    feats=FEATS,
    coords_um=GRID * 0.5,
    tile_size_um=256.0,
    tile_size_px=224,
    extractor="ctranspath",
) -> Path:
    """STAMP preprocessing/__init__.py:345-359 (c54ce06): feats float16, coords float32 µm top-left."""
    with h5py.File(path, "w") as h5:
        h5["coords"] = np.asarray(coords_um, np.float32)
        h5["feats"] = np.asarray(feats, np.float16)
        h5.attrs.update(
            {
                "stamp_version": "2.5.0",
                "extractor": extractor,
                "unit": "um",
                "tile_size_um": tile_size_um,
                "tile_size_px": tile_size_px,
                "code_hash": "0123abcd",
                "feat_type": "tile",
            }
        )
    return path


TRIDENT_COORDS_ATTRS = {
    "patch_size": 256,
    "patch_size_level0": 512,
    "level0_magnification": 40,
    "target_magnification": 20,
    "overlap": 0,
    "name": "S1",
    "savetodir": "/job/20x_256px_0px_overlap",
    "level0_width": 2560,
    "level0_height": 4096,
}


def write_trident(path: Path, feats=FEATS, coords=GRID, encoder="uni_v1") -> Path:
    """TRIDENT IO.save_h5 as called by WSI.extract_features (WSI.py:1024-1035, a91fa84): chunks (1, …)."""
    with h5py.File(path, "w") as f:
        for key, val, attrs in (
            ("features", feats, {"name": "S1", "savetodir": str(path.parent), "encoder": encoder}),
            ("coords", coords, TRIDENT_COORDS_ATTRS),
        ):
            ds = f.create_dataset(
                key,
                shape=val.shape,
                maxshape=(None, *val.shape[1:]),
                chunks=(1, *val.shape[1:]),
                dtype=val.dtype,
            )
            ds[:] = val
            for k, v in attrs.items():
                ds.attrs[k] = "None" if v is None else v
    return path


def write_clam(feat_dir: Path, slide_id="S1", feats=FEATS, coords=GRID) -> Path:
    """CLAM extract_features_fp.py:38-45,110-117 (53e2409): h5 float32 + int32, no attrs; pt = tensor."""
    (feat_dir / "h5_files").mkdir(parents=True, exist_ok=True)
    (feat_dir / "pt_files").mkdir(parents=True, exist_ok=True)
    with h5py.File(feat_dir / "h5_files" / f"{slide_id}.h5", "w") as f:
        for key, val in (("features", feats.astype(np.float32)), ("coords", coords.astype(np.int32))):
            ds = f.create_dataset(
                key,
                shape=val.shape,
                maxshape=(None, *val.shape[1:]),
                chunks=(32, *val.shape[1:]),
                dtype=val.dtype,
            )
            ds[:] = val
    torch.save(torch.from_numpy(feats.astype(np.float32)), feat_dir / "pt_files" / f"{slide_id}.pt")
    return feat_dir / "h5_files" / f"{slide_id}.h5"


def write_slideflow(folder: Path, centres: np.ndarray, tile_px: int, tile_um, feats=None, slide="S1") -> Path:
    """slideflow DatasetFeatures.to_torch (model/features.py:727-772, 7f5a40b): float32 tensor,
    <slide>.index.npz arr_0 = tile centres (int64), bags_config.json (indent=1)."""
    folder.mkdir(parents=True, exist_ok=True)
    feats = FEATS[: len(centres)] if feats is None else feats
    torch.save(torch.from_numpy(feats.astype(np.float32)), folder / f"{slide}.pt")
    np.savez(folder / f"{slide}.index", arr_0=np.asarray(centres, np.int64))
    config = {
        "extractor": {"class": "slideflow.model.extractors.retccl.RetCCLFeatures", "kwargs": {}},
        "normalizer": None,
        "num_features": int(feats.shape[1]),
        "tile_px": tile_px,
        "tile_um": tile_um,
    }
    (folder / "bags_config.json").write_text(json.dumps(config, indent=1))
    return folder / f"{slide}.pt"


def slideflow_centres(width: int, height: int, tile_um: int, mpp: float) -> tuple[np.ndarray, int]:
    """slideflow's grid on a one-level slide: fe = int(tile_um/mpp) (wsi.py:714), top-lefts every fe
    from 0 (wsi.py:567-576), centre = top-left + int(fe/2) (wsi.py:2075)."""
    fe = int(tile_um / mpp)
    tl = np.array(
        [(x, y) for y in range(0, height + 1 - fe, fe) for x in range(0, width + 1 - fe, fe)], np.int64
    )
    return tl + int(fe / 2), fe


def native_bag(tmp_path: Path, dtype="float32", size0=256, mpp=0.499) -> Path:
    attrs = {
        "slide_id": "S1",
        "slide_mpp": mpp,
        "encoder": "resnet18",
        "tile_size": 256,
        "tile_mpp": 0.5,
        "size_level0": size0,
        "wsikit_version": "0.1.0",
    }
    coords_attrs = {
        "patch_size": 256,
        "patch_size_level0": size0,
        "slide_mpp": mpp,
        "level0_magnification": 10 / mpp,
        "target_magnification": 20.0,
    }
    bag = Bag(FEATS.astype(dtype), GRID // 2, attrs, coords_attrs, tile_index=np.arange(len(GRID)))
    return write_bag(tmp_path / "S1.h5", bag, dtype=dtype)


# -- #1 features without coordinates --------------------------------------------------------------------
def test_features_without_coords_are_marked_unknown(tmp_path):  # FAIL before: coords (0, 0), 'clam'
    path = tmp_path / "slideA.h5"
    with h5py.File(path, "w") as f:
        f["features"] = FEATS[:5]
        f["metadata"] = np.array([b"slideA_x1024_y2048.png"] * 5)
    bag = read_bag(path)
    assert bag.attrs["coords_unit"] == "none"
    assert (bag.coords == -1).all()
    assert bag.attrs["source_format"] != "clam"


@pytest.mark.parametrize("layout", ["clam", "trident", "stamp", "slideflow"])
def test_export_refuses_unknown_coordinates(tmp_path, layout):  # FAIL before for clam/trident (zeros written)
    path = tmp_path / "slideA.h5"
    with h5py.File(path, "w") as f:
        f["features"] = FEATS[:5]
    bag = read_bag(path)
    bag.attrs["slide_mpp"] = 0.5
    with pytest.raises(BagError, match=r"slideA.*coordinates"):
        export_bag(bag, layout, tmp_path / "out", slide_id="slideA")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.h5"))


def test_wsikit_tile_names_give_positions(tmp_path):  # a bonus, not a guess: only wsikit's own names
    path = tmp_path / "slideA.h5"
    names = [f"slideA_x{x}_y{y}.png".encode() for x, y in GRID[:5]]
    with h5py.File(path, "w") as f:
        f["features"] = FEATS[:5]
        f["metadata"] = np.array(names)
    bag = read_bag(path)
    assert bag.attrs["coords_unit"] == "px" and bag.attrs["coords_source"] == "tile names"
    np.testing.assert_array_equal(bag.coords, GRID[:5])
    with h5py.File(path, "r+") as f:
        del f["metadata"]
        f["metadata"] = np.array([b"tile_%d.png" % i for i in range(5)])
    assert read_bag(path).attrs["coords_unit"] == "none"


def test_tiatoolbox_patch_mode_boxes_are_unknown_positions(tmp_path):  # FAIL before: all (0, 0)
    import zarr

    g = zarr.open_group(str(tmp_path / "t.zarr"), mode="w")
    g.create_array("features", data=FEATS[:4])
    g.create_array("coordinates", data=np.tile([0, 0, 224, 224], (4, 1)))  # engine_abc.py:500-502
    bag = read_bag(tmp_path / "t.zarr")
    assert bag.attrs["coords_unit"] == "none"


# -- #2 STAMP export keeps the bag's own tile size and extractor -----------------------------------------
def test_stamp_round_trip_keeps_tile_size_and_extractor(tmp_path):  # FAIL before: 0.0 / 0 / 'unknown'
    src = write_stamp(tmp_path / "S1.h5")
    bag = read_bag(src, slide_mpp=0.5)
    bag.attrs["slide_mpp"] = 0.5
    (out,) = export_bag(bag, "stamp", tmp_path / "out", slide_id="S1")
    with h5py.File(out) as f, h5py.File(src) as g:
        assert f.attrs["tile_size_um"] == pytest.approx(256.0)
        assert int(f.attrs["tile_size_px"]) == 224
        assert f.attrs["extractor"] == "ctranspath"
        assert f.attrs["unit"] == "um" and f.attrs["feat_type"] == "tile"
        np.testing.assert_allclose(f["coords"][()], g["coords"][()], atol=1e-3)
        assert f["feats"].dtype == np.float16


def test_stamp_to_stamp_needs_no_slide_mpp(tmp_path):  # FAIL before: "read the bag with slide_mpp="
    src = write_stamp(tmp_path / "S1.h5")
    (out,) = export_bag(read_bag(src), "stamp", tmp_path / "out", slide_id="S1")
    with h5py.File(out) as f:
        assert f.attrs["tile_size_um"] == pytest.approx(256.0)


def test_stamp_export_refuses_unknown_tile_size(tmp_path):  # FAIL before: writes tile_size_um=0.0
    clam = write_clam(tmp_path / "clam")  # CLAM files carry no tile size at all
    bag = read_bag(clam)
    bag.attrs["slide_mpp"] = 0.5
    with pytest.raises(BagError, match=r"S1.*tile size"):
        export_bag(bag, "stamp", tmp_path / "out", slide_id="S1")
    with pytest.raises(BagError, match=r"S1\.h5.*tile size"):  # from files: the file is named
        export_bags([clam], "stamp", tmp_path / "out", slide_mpp=0.5)


def test_native_bag_to_stamp(tmp_path):  # guard (passed before too)
    (out,) = export_bag(read_bag(native_bag(tmp_path)), "stamp", tmp_path / "out")
    with h5py.File(out) as f:
        assert f.attrs["tile_size_um"] == pytest.approx(256 * 0.499)
        assert int(f.attrs["tile_size_px"]) == 256 and f.attrs["extractor"] == "resnet18"


# -- #3 slideflow ----------------------------------------------------------------------------------------
def test_slideflow_export_writes_an_int_tile_um_slideflow_reproduces(tmp_path):  # FAIL before: 127.744
    export_bag(read_bag(native_bag(tmp_path)), "slideflow", tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "bags_config.json").read_text())
    assert isinstance(cfg["tile_um"], int) and isinstance(cfg["tile_px"], int)
    assert int(cfg["tile_um"] / 0.499) == 256  # slideflow's full_extract_px (wsi.py:714)
    centres = np.load(tmp_path / "out" / "S1.index.npz")["arr_0"]
    np.testing.assert_array_equal(centres, GRID // 2 + int(256 / 2))


def test_slideflow_export_refuses_a_tile_side_slideflow_cannot_make(tmp_path):  # FAIL before
    # at 0.499 µm/px int(t / 0.499) is 254 for t=127 and 256 for t=128: no integer tile_um gives 255
    with pytest.raises(BagError, match=r"S1.*tile_um"):
        export_bag(read_bag(native_bag(tmp_path, size0=255)), "slideflow", tmp_path / "out")


@pytest.mark.parametrize(("tile_um", "mpp"), [(128, 0.202), (302, 0.5), (256, 0.2527), (128, 0.217)])
def test_slideflow_centres_to_top_left_use_slideflows_rule(
    tmp_path, tile_um, mpp
):  # FAIL before for 0.202/0.217
    centres, fe = slideflow_centres(4000, 4000, tile_um, mpp)
    bag = read_bag(write_slideflow(tmp_path / "bags", centres, 256, tile_um), slide_mpp=mpp)
    np.testing.assert_array_equal(bag.coords, centres - int(fe / 2))
    assert (bag.coords >= 0).all()


def test_slideflow_magnification_tile_um_names_the_file(tmp_path):  # FAIL before: bare ValueError
    centres, _ = slideflow_centres(1500, 1500, 128, 0.5)
    path = write_slideflow(tmp_path / "bags", centres, 256, "20x")
    assert read_bag(path).attrs["coords_origin"] == "center"  # no MPP: centres kept, as today
    with pytest.raises(BagError, match=r"S1\.pt.*20x"):
        read_bag(path, slide_mpp=0.5)


def test_slideflow_magnification_bags_round_trip_without_an_mpp(tmp_path):  # slideflow's own values kept
    centres, _ = slideflow_centres(1500, 1500, 128, 0.5)
    bag = read_bag(write_slideflow(tmp_path / "in", centres, 256, "20x"))
    export_bag(bag, "slideflow", tmp_path / "out", slide_id="S1")
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "S1.index.npz")["arr_0"], centres)
    cfg = json.loads((tmp_path / "out" / "bags_config.json").read_text())
    assert (cfg["tile_um"], cfg["tile_px"]) == ("20x", 256)
    assert cfg["extractor"]["class"] == "slideflow.model.extractors.retccl.RetCCLFeatures"
    with pytest.raises(BagError, match="top-left"):  # other layouts need top-left pixels: an MPP
        export_bag(bag, "clam", tmp_path / "clam", slide_id="S1")


def test_slideflow_round_trip(tmp_path):  # FAIL before: export needs patch_size_level0
    centres, _ = slideflow_centres(633 * 5, 633 * 8, 128, 0.202)
    bag = read_bag(write_slideflow(tmp_path / "in", centres, 256, 128), slide_mpp=0.202)
    export_bag(bag, "slideflow", tmp_path / "out", slide_id="S1")
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "S1.index.npz")["arr_0"], centres)
    assert json.loads((tmp_path / "out" / "bags_config.json").read_text())["tile_um"] == 128


# -- #4 duplicate slide ids ------------------------------------------------------------------------------
def test_export_refuses_duplicate_slide_ids(tmp_path):  # FAIL before: second overwrites the first
    for name in ("slideA", "slideB"):
        (tmp_path / name).mkdir()
        with h5py.File(tmp_path / name / "features.h5", "w") as f:
            f["feats"], f["coords"] = FEATS, GRID
    res = CliRunner().invoke(
        app,
        [
            "bags",
            "export",
            str(tmp_path / "slideA" / "features.h5"),
            str(tmp_path / "slideB" / "features.h5"),
            "--to",
            "clam",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert res.exit_code != 0
    assert "features" in res.output and "slideA" in res.output and "slideB" in res.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.h5"))
    res = CliRunner().invoke(app, [*res_args(tmp_path), "--id-from", "parent"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out" / "h5_files").iterdir()) == ["slideA.h5", "slideB.h5"]


def res_args(tmp_path: Path) -> list[str]:
    bags = [str(tmp_path / n / "features.h5") for n in ("slideA", "slideB")]
    return ["bags", "export", *bags, "--to", "clam", "--out", str(tmp_path / "out")]


def test_heatmap_refuses_a_bag_without_positions(tmp_path):
    from wsikit.stages.heatmap import HeatmapError, model_tile_scores

    path = tmp_path / "slideA.h5"
    with h5py.File(path, "w") as f:
        f["features"] = FEATS[:5]
    with pytest.raises(HeatmapError, match=r"slideA\.h5.*no tile coordinates"):
        model_tile_scores(tmp_path / "no-model", path)


# -- #5 TRIDENT .pt / slide-level files, float32 for CLAM ------------------------------------------------
def test_trident_pt_pickled_numpy_array(tmp_path):  # FAIL before: UnpicklingError
    path = tmp_path / "S1.pt"
    torch.save(FEATS, path)  # WSI.py:1037: torch.save(<numpy array>)
    bag = read_bag(path)
    np.testing.assert_array_equal(bag.features, FEATS)
    assert bag.attrs["coords_unit"] == "none"


def test_trident_pt_shape_without_loading(tmp_path):  # read_bag_shape / MIL's lazy reads take it too
    torch.save(FEATS, tmp_path / "S1.pt")
    assert read_bag_shape(tmp_path / "S1.pt") == FEATS.shape


def test_pt_with_other_pickled_objects_is_still_refused(tmp_path):  # guard (passed before too)
    path = tmp_path / "evil.pt"
    torch.save({"features": FEATS, "f": Path("/x")}, path)  # a non-allow-listed global (pathlib)
    with pytest.raises(BagError, match=r"evil\.pt"):
        read_bag(path)


def test_trident_slide_level_file_is_named(tmp_path):  # FAIL before: no path in the message
    path = tmp_path / "S1.h5"
    write_trident(path)
    with h5py.File(path, "r+") as f:
        del f["features"]
        f["features"] = FEATS.mean(0)  # WSI.py:1158-1173: (D,)
    with pytest.raises(BagError, match=r"S1\.h5.*slide-level"):
        read_bag(path)


@pytest.mark.parametrize("layout", ["clam", "trident", "slideflow"])
def test_exports_to_float32_peers_are_float32(tmp_path, layout):  # guard (passed before too)
    written = export_bag(read_bag(native_bag(tmp_path, dtype="float16")), layout, tmp_path / "out")
    for p in written:
        if p.suffix == ".h5":
            with h5py.File(p) as f:
                assert f["features"].dtype == np.float32
        elif p.suffix == ".pt":
            assert torch.load(p).dtype == torch.float32


# -- round trips (peer → wsikit → peer), compared as the peer's loader sees them -------------------------
def test_clam_round_trip(tmp_path):  # guard (passed before too)
    bag = read_bag(write_clam(tmp_path / "in"))
    export_bag(bag, "clam", tmp_path / "out", slide_id="S1")
    with h5py.File(tmp_path / "out" / "h5_files" / "S1.h5") as f:
        assert f["coords"].dtype == np.int32 and f["features"].dtype == np.float32
        np.testing.assert_array_equal(f["coords"][()], GRID)
    assert torch.equal(torch.load(tmp_path / "out" / "pt_files" / "S1.pt"), torch.from_numpy(FEATS))


def test_trident_round_trip(tmp_path):  # guard (passed before too)
    src = write_trident(tmp_path / "S1.h5")
    export_bag(read_bag(src), "trident", tmp_path / "out", slide_id="S1")
    with h5py.File(tmp_path / "out" / "S1.h5") as f:
        for k, v in TRIDENT_COORDS_ATTRS.items():
            assert f["coords"].attrs[k] == v
        assert f["features"].attrs["encoder"] == "uni_v1"
        np.testing.assert_array_equal(f["coords"][()], GRID)
