"""Tile specs, grid geometry (property tests), coordinates files, the tile stage and `wsikit tile`."""

from __future__ import annotations

import csv
import json
import shutil

import h5py
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from wsikit.cli.main import app
from wsikit.grids import TileGrid, grid_path, list_specs, read_grid, write_grid
from wsikit.jobs import JobError, SlideEntry, read_status, resolve_slides
from wsikit.settings import TileConfig
from wsikit.slide import open_slide
from wsikit.specs import Layout, TileSpec, TilingError, aligned_layouts, nominal_layout, parse_spec
from wsikit.stages.tile import run_tiling
from wsikit.tiles import read_tile
from wsikit.tiling import build_grids, tile_fractions, tile_slide
from wsikit.tissue import compute_mask

# -- specs ---------------------------------------------------------------------------------------------


def test_spec_names_are_stable_and_parse_back():
    assert TileSpec.from_mag(20).name == "mpp0.50_256px_0ov"
    assert TileSpec.from_mag(40, 224, 16).name == "mpp0.25_224px_16ov"
    assert TileSpec(0.499, 512).name == "mpp0.499_512px_0ov"
    assert TileSpec.from_mag(30).name == "mpp0.3333_256px_0ov"  # never bucketed
    for spec in (TileSpec(0.5), TileSpec(0.2431, 224, 32), TileSpec(2.0, 128, 1)):
        assert TileSpec.from_name(spec.name) == spec
    assert parse_spec("20x") == TileSpec(0.5)
    assert parse_spec("10x/512/64") == TileSpec(1.0, 512, 64)
    assert parse_spec("0.25/224") == TileSpec(0.25, 224)
    assert parse_spec("mpp1.00_256px_0ov") == TileSpec(1.0)
    assert parse_spec("5x", size=224, overlap=8) == TileSpec(2.0, 224, 8)


@pytest.mark.parametrize("bad", ["", "x", "20x/abc", "1/2/3/4", "-1", "0.5/256/256"])
def test_bad_specs_say_what_is_expected(bad):
    with pytest.raises(TilingError):
        parse_spec(bad)


def test_layout_uses_the_slide_resolution():
    assert nominal_layout(TileSpec(0.5), 0.499) == Layout(256, 256)  # within 5%: read level 0 as is
    assert nominal_layout(TileSpec(0.5), 0.25) == Layout(512, 512)
    assert nominal_layout(TileSpec(0.5, 256, 32), 0.25) == Layout(512, 448)
    assert nominal_layout(TileSpec(0.5), 0.2431).size_level0 == 527


# -- geometry: property tests --------------------------------------------------------------------------
slide_mpps = st.sampled_from([0.2166, 0.2431, 0.25, 0.2527, 0.263, 0.46, 0.499, 0.5, 1.0])
dims = st.tuples(st.integers(300, 30_000), st.integers(300, 30_000))


@settings(max_examples=60, deadline=None)
@given(
    dims=dims,
    slide_mpp=slide_mpps,
    base_mpp=st.sampled_from([0.25, 0.5, 1.0]),
    size=st.sampled_from([64, 128, 224, 256]),
    overlap_frac=st.sampled_from([0, 0.125, 0.25, 0.5]),
    levels=st.integers(1, 3),
)
@example(dims=(300, 300), slide_mpp=0.46, base_mpp=0.25, size=64, overlap_frac=0.5, levels=1)  # 1-px rounding
def test_aligned_grids_geometry(dims, slide_mpp, base_mpp, size, overlap_frac, levels):
    overlap = int(size * overlap_frac)
    specs = [TileSpec(base_mpp * 2**k, size, overlap) for k in range(levels)]
    grids = build_grids(specs, dims, slide_mpp)  # no mask: every tile
    W, H = dims
    for spec, layout, coords, fractions, parents in grids:
        assert coords.dtype == np.int64 and coords.shape[1] == 2
        assert (fractions == 1).all()
        # inside the slide
        assert (coords >= 0).all()
        assert (coords[:, 0] + layout.size_level0 <= W).all() and (
            coords[:, 1] + layout.size_level0 <= H
        ).all()
        # closed form on a full mask
        nx = (W - layout.size_level0) // layout.stride_level0 + 1 if layout.size_level0 <= W else 0
        ny = (H - layout.size_level0) // layout.stride_level0 + 1 if layout.size_level0 <= H else 0
        assert len(coords) == nx * ny
        # exact strides and overlaps
        for axis in (0, 1):
            steps = np.diff(np.unique(coords[:, axis]))
            assert (steps == layout.stride_level0).all()
        assert layout.size_level0 - layout.stride_level0 == layout.overlap_level0
        nominal = nominal_layout(spec, slide_mpp)
        assert layout.overlap_level0 == nominal.overlap_level0
        base = nominal_layout(specs[0], slide_mpp)
        drift = base.size_level0 / (specs[0].size * specs[0].mpp / slide_mpp)  # level 0 read as is within 5%
        # the physical stride, up to 2% and the rounding of the finest stride (≤ 1 px, times the nesting)
        physical = drift * spec.stride * spec.mpp / slide_mpp
        assert layout.stride_level0 == pytest.approx(physical, rel=0.02, abs=2 ** specs.index(spec))
        # parents contain their children
        for name, index in parents.items():
            coarse = next(g for g in grids if g[0].name == name)
            has = index >= 0
            parent_xy = coarse[2][index[has]]
            child_xy = coords[has]
            assert (parent_xy <= child_xy).all()
            assert (child_xy + layout.size_level0 <= parent_xy + coarse[1].size_level0).all()
            # a child without a parent sits where no coarse tile fits
            orphan = coords[~has]
            assert (
                (
                    (orphan // coarse[1].stride_level0 + 1) * coarse[1].stride_level0
                    + coarse[1].overlap_level0
                    > [W, H]
                )
                .any(axis=1)
                .all()
            )


@settings(max_examples=40, deadline=None)
@given(
    mask_shape=st.tuples(st.integers(5, 40), st.integers(5, 40)),
    scale=st.sampled_from([1.0, 2.0, 2.5, 3.7, 8.0]),
    size0=st.integers(1, 60),
    seed=st.integers(0, 2**16),
)
def test_tissue_fraction_is_the_exact_area_fraction(mask_shape, scale, size0, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random(mask_shape) < 0.5
    W, H = int(mask_shape[1] * scale), int(mask_shape[0] * scale)
    size0 = min(size0, W, H)  # tiles lie inside the slide, which the mask covers exactly
    coords = np.stack([rng.integers(0, W - size0 + 1, 20), rng.integers(0, H - size0 + 1, 20)], 1)
    got = tile_fractions(mask, (scale, scale), coords, size0)
    # brute force: each level-0 pixel takes the value of the mask pixel it falls in, sampled 10x finer
    sub = 10
    for (x, y), f in zip(coords, got, strict=True):
        u = (x + (np.arange(size0 * sub) + 0.5) / sub) / scale
        v = (y + (np.arange(size0 * sub) + 0.5) / sub) / scale
        inside = mask[np.minimum(v.astype(int), mask.shape[0] - 1)][
            :, np.minimum(u.astype(int), mask.shape[1] - 1)
        ]
        assert f == pytest.approx(inside.mean(), abs=2.5 / sub / max(1, size0) * scale + 0.02)


def test_tissue_fraction_on_integer_blocks_is_exact():
    mask = np.zeros((8, 8), bool)
    mask[:4, :2] = True
    f = tile_fractions(mask, (4.0, 4.0), np.array([[0, 0], [0, 16], [4, 0], [0, 8]]), 16)
    assert f.tolist() == [0.5, 0.0, 0.25, 0.25]


def test_non_nesting_specs_are_refused_with_a_fix():
    with pytest.raises(TilingError, match="multiple"):
        aligned_layouts([TileSpec(0.5, 224), TileSpec(1.0, 256)], 0.5)
    with pytest.raises(TilingError, match="overlap of"):
        aligned_layouts([TileSpec(0.5, 256, 128), TileSpec(1.0, 256, 0)], 0.25)
    # unaligned grids still get parents: the coarse tile holding each fine tile's centre
    grids = build_grids([TileSpec(0.5, 224), TileSpec(1.0, 256)], (5000, 4000), 0.5, align=False)
    (_, fine, coords, _, parents), (_, coarse, ccoords, _, _) = grids
    index = parents["mpp1.00_256px_0ov"]
    centre = coords[index >= 0] + fine.size_level0 // 2
    p = ccoords[index[index >= 0]]
    assert ((p <= centre) & (centre < p + coarse.size_level0)).all()


def test_min_tissue_and_complete_parents():
    mask = np.zeros((1000, 1000), bool)
    mask[150:210, 150:210] = True  # 600×600 level-0 px at scale 10: too little for a 1024-px tile
    specs = [TileSpec(0.5, 256), TileSpec(1.0, 256), TileSpec(2.0, 256)]
    kept = build_grids(specs, (1000 * 10, 1000 * 10), 0.5, mask, (10.0, 10.0), min_tissue=0.5)
    plain = build_grids(specs, (10_000, 10_000), 0.5, mask, (10.0, 10.0), 0.5, complete_parents=False)
    fine = kept[0]
    assert (fine[3] >= 0.5).all() and len(fine[2]) > 0
    for name, index in fine[4].items():
        assert (index >= 0).all(), name  # every kept fine tile has its context
    assert len(kept[2][2]) >= len(plain[2][2])
    assert any((index < 0).any() for index in plain[0][4].values())
    with pytest.raises(TilingError):
        build_grids(specs, (100, 100), 0.5, min_tissue=1.5)


# -- coordinates files ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cmu_grids(sample_slide):
    with open_slide(sample_slide) as slide:
        mask = compute_mask(slide)
        return tile_slide(
            slide, [TileSpec.from_mag(20), TileSpec.from_mag(10), TileSpec(0.75)], mask, 0.5, align=False
        )


def test_attributes_for_trident_and_clam(pyramids):
    with open_slide(pyramids["svs"]) as slide:
        grids = tile_slide(
            slide, [TileSpec(0.5), TileSpec(1.0), TileSpec(0.75, 256)], compute_mask(slide), align=False
        )
    by = {g.spec.name: g for g in grids}
    for g in grids:
        a = g.attrs
        assert a["level0_magnification"] / a["target_magnification"] == pytest.approx(
            a["patch_size_level0"] / a["patch_size"], rel=1e-9
        )
        assert a["level0_width"] == 2048 and a["level0_height"] == 2944
        assert a["slide_mpp"] == pytest.approx(0.499) and a["wsikit_version"]
    assert by["mpp0.50_256px_0ov"].attrs["patch_level"] == 0
    assert by["mpp1.00_256px_0ov"].attrs["patch_level"] == 1  # 1.0 µm/px is the stored level 1 (0.998)
    assert "patch_level" not in by["mpp0.75_256px_0ov"].attrs  # not a stored level: no CLAM attrs


def test_write_read_round_trip(tmp_path, cmu_grids):
    grid = cmu_grids[0]
    path = write_grid(grid_path(tmp_path, grid.spec, grid.slide_id), grid)
    assert path == tmp_path / "tiles" / "mpp0.50_256px_0ov" / "CMU-1-Small-Region.h5"
    back = read_grid(path)
    assert isinstance(back, TileGrid)
    assert back.spec == grid.spec and back.slide_id == grid.slide_id and back.size_level0 == 256
    np.testing.assert_array_equal(back.coords, grid.coords)
    np.testing.assert_array_equal(back.tissue_fraction, grid.tissue_fraction)
    assert back.parents.keys() == grid.parents.keys()
    assert back.attrs["patch_size"] == 256 and back.stride_level0 == 256
    with h5py.File(path) as fh:
        assert fh["coords"].dtype == np.int64 and fh["tissue_fraction"].dtype == np.float32
    assert not list(path.parent.glob(".*tmp"))  # no temporary left
    write_grid(grid_path(tmp_path, TileSpec(2.0), "x"), cmu_grids[1])
    assert list_specs(tmp_path) == ["mpp0.50_256px_0ov", "mpp2.00_256px_0ov"]
    assert list_specs(tmp_path / "nothing") == []


def test_read_grid_reads_trident_files_and_refuses_clam(tmp_path):
    trident = tmp_path / "slide_patches.h5"
    with h5py.File(trident, "w") as fh:
        ds = fh.create_dataset("coords", data=np.array([[0, 0], [1024, 0]], np.int64))
        ds.attrs.update(
            patch_size=512,
            patch_size_level0=1024,
            level0_magnification=40.0,
            target_magnification=20.0,
            overlap=0,
            name="slide",
        )
    grid = read_grid(trident)
    assert grid.spec == TileSpec(0.5, 512) and grid.slide_mpp == 0.25 and grid.size_level0 == 1024
    assert np.isnan(grid.tissue_fraction).all()
    clam = tmp_path / "clam.h5"
    with h5py.File(clam, "w") as fh:
        fh.create_dataset("coords", data=np.zeros((1, 2), np.int64)).attrs.update(
            patch_size=256, patch_level=0
        )
    with pytest.raises(TilingError, match="CLAM"):
        read_grid(clam)
    (tmp_path / "junk.h5").write_text("no")
    with pytest.raises(TilingError, match="junk"):
        read_grid(tmp_path / "junk.h5")


def test_read_tile_matches_the_footprint(pyramids):
    with open_slide(pyramids["svs"]) as slide:
        a = read_tile(slide, (256, 512), 256, 256)
        np.testing.assert_array_equal(a, slide.read_region((256, 512), 0, (256, 256)))
        b = read_tile(slide, (256, 512), 1024, 256)  # 4x coarser: read from level 2
        ref = slide.read_region((256, 512), 2, (256, 256))
        assert np.abs(b.astype(int) - ref.astype(int)).mean() < 1


# -- the stage -----------------------------------------------------------------------------------------
def _cfg(**kw) -> TileConfig:
    return TileConfig((TileSpec.from_mag(20), TileSpec.from_mag(10)), **kw)


def test_run_tiling_outputs_resume_and_settings_change(tmp_path, sample_slide):
    entries = resolve_slides([str(sample_slide)])
    job = tmp_path / "job"
    summary = run_tiling(entries, job, _cfg())
    assert not summary.failed and len(summary.done) == 1
    sid = entries[0].slide_id
    status = read_status(job, "tile", sid)
    assert status.state == "done" and status.info["tiles"]["mpp0.50_256px_0ov"] > 10
    for p in (
        job / "masks" / f"{sid}.geojson",
        job / "qc" / f"{sid}.png",
        grid_path(job, "mpp1.00_256px_0ov", sid),
    ):
        assert p.is_file()
    fine = read_grid(grid_path(job, "mpp0.50_256px_0ov", sid))
    assert fine.attrs["savetodir"] == str(job / "tiles" / "mpp0.50_256px_0ov")
    assert "mpp1.00_256px_0ov" in fine.parents
    assert run_tiling(entries, job, _cfg()).skipped == [sid]  # resume
    with pytest.raises(JobError, match=r"min_tissue 0\.5 → 0\.9"):  # a job holds one set of settings
        run_tiling(entries, job, _cfg(min_tissue=0.9))
    again = run_tiling(entries, job, _cfg(min_tissue=0.9), overwrite=True)  # other settings: redone
    assert len(again.done) == 1 and not again.done[0].warnings
    finer = run_tiling(entries, tmp_path / "job2", TileConfig((TileSpec(0.25),)))
    assert any("upsampled" in w for w in finer.done[0].warnings)
    assert (
        read_status(job, "tile", sid).info["tiles"]["mpp0.50_256px_0ov"]
        < status.info["tiles"]["mpp0.50_256px_0ov"]
    )


def test_failures_are_recorded_and_the_batch_goes_on(tmp_path, pyramids):
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"II*\x00garbage" * 100)
    entries = [
        SlideEntry(broken, "broken"),
        SlideEntry(pyramids["no_mpp"], "nompp"),
        SlideEntry(pyramids["generic"], "generic"),
    ]
    summary = run_tiling(entries, tmp_path / "job", _cfg())
    assert [s.slide_id for s in summary.done] == ["generic"]
    errors = {s.slide_id: s.error for s in summary.failed}
    assert "broken.svs" in errors["broken"]
    assert "mpp" in errors["nompp"].lower()
    assert not (tmp_path / "job" / "tiles" / "mpp0.50_256px_0ov" / "broken.h5").exists()


def test_empty_slide_is_a_loud_warning(tmp_path):
    from wsikit.pyramid import write_pyramid

    blank = write_pyramid(
        tmp_path / "blank.tif", np.full((1024, 1024, 3), 245, np.uint8), 0.5, layout="generic"
    )
    summary = run_tiling(resolve_slides([str(blank)]), tmp_path / "job", _cfg())
    status = summary.done[0]
    assert any("EMPTY MASK" in w for w in status.warnings)
    assert read_status(tmp_path / "job", "tile", "blank").warnings == status.warnings
    grid = read_grid(grid_path(tmp_path / "job", "mpp0.50_256px_0ov", "blank"))
    assert grid.coords.shape == (0, 2)  # an explicit empty file, as TRIDENT writes


def test_user_geojson_replaces_the_computed_mask(tmp_path, sample_slide):
    entries = resolve_slides([str(sample_slide)])
    sid = entries[0].slide_id
    run_tiling(entries, tmp_path / "a", _cfg())
    edited = tmp_path / "edited"
    edited.mkdir()
    gj = json.loads((tmp_path / "a" / "masks" / f"{sid}.geojson").read_text())
    W = 2220
    gj["features"].append(
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [W, 0], [W, 1500], [0, 1500], [0, 0]]]},
            "properties": {"classification": {"name": "Ignore*"}},
        }
    )
    (edited / f"{sid}.geojson").write_text(json.dumps(gj))
    summary = run_tiling(entries, tmp_path / "b", _cfg(geojson_dir=edited))
    assert summary.done[0].info["mask_source"].endswith(f"{sid}.geojson")
    grid = read_grid(grid_path(tmp_path / "b", "mpp0.50_256px_0ov", sid))
    assert len(grid) > 0 and (grid.coords[:, 1] >= 1500 - 256).all()
    assert (tmp_path / "b" / "masks" / f"{sid}.geojson").read_text() == (
        edited / f"{sid}.geojson"
    ).read_text()
    assert run_tiling(entries, tmp_path / "b", _cfg(geojson_dir=edited)).skipped == [sid]
    gj["features"].pop()  # edited again in QuPath: the slide is redone
    (edited / f"{sid}.geojson").write_text(json.dumps(gj))
    assert len(run_tiling(entries, tmp_path / "b", _cfg(geojson_dir=edited)).done) == 1
    assert len(read_grid(grid_path(tmp_path / "b", "mpp0.50_256px_0ov", sid))) > len(grid)


# -- CLI -----------------------------------------------------------------------------------------------
def test_cli_tile_bundled_slide_and_pyramids(tmp_path, sample_slide, pyramids):
    folder = tmp_path / "slides"
    folder.mkdir()
    for key in ("svs", "generic", "no_mpp"):
        shutil.copy(pyramids[key], folder / pyramids[key].name)
    shutil.copy(sample_slide, folder / sample_slide.name)
    job = tmp_path / "job"
    runner = CliRunner()
    assert runner.invoke(app, ["tile", "--help"]).exit_code == 0  # rich markup in the help must render
    args = [
        "tile",
        str(folder),
        "--out",
        str(job),
        "--mag",
        "20",
        "--spec",
        "10x",
        "--spec",
        "5x",
        "--save-tiles",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output  # the slide without MPP fails, the rest go on
    assert "cmu_nompp" in result.output and "--slide-mpp" in result.output
    assert list_specs(job) == ["mpp0.50_256px_0ov", "mpp1.00_256px_0ov", "mpp2.00_256px_0ov"]
    for sid in ("cmu_svs", "cmu_generic", "CMU-1-Small-Region"):
        assert read_status(job, "tile", sid).state == "done"
        grid = read_grid(grid_path(job, "mpp0.50_256px_0ov", sid))
        pngs = list((job / "patches" / "mpp0.50_256px_0ov" / sid).glob("*.png"))
        assert len(pngs) == len(grid) > 0
    manifest = job / "patches" / "mpp0.50_256px_0ov" / "manifest.csv"
    rows = list(csv.DictReader(manifest.open()))
    assert {r["slide_id"] for r in rows} == {"cmu_svs", "cmu_generic", "CMU-1-Small-Region"}
    assert all((manifest.parent / r["path"]).is_file() for r in rows)
    # resume: nothing redone, the failed slide listed with why it is skipped
    result = runner.invoke(app, args)
    assert "4 skipped (3 done earlier, 1 failed earlier)" in " ".join(result.output.split())
    assert "--retry-failed" in result.output and result.exit_code == 1  # the job is not done
    # the no-MPP slide succeeds with the override its error named (no --retry-failed needed: its input
    # changed); the override applies to every slide given, so the others are redone with it too
    result = runner.invoke(app, [*args, "--slide-mpp", "0.499"])
    assert result.exit_code == 0, result.output
    assert read_status(job, "tile", "cmu_nompp").state == "done"
    assert "4 done" in result.output.replace("\n", " ")


def test_cli_shards_and_errors(tmp_path, pyramids, monkeypatch):
    runner = CliRunner()
    slides = [str(pyramids["svs"]), str(pyramids["generic"])]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    result = runner.invoke(app, ["tile", *slides, "--out", str(tmp_path / "j"), "--mpp", "1.0"])
    assert result.exit_code == 0, result.output
    done = {p.stem for p in (tmp_path / "j" / "status" / "tile").glob("*.json")}
    assert done == {"cmu_svs"}  # sorted ids ["cmu_generic", "cmu_svs"], shard 1 of 2
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    result = runner.invoke(
        app, ["tile", *slides, "--out", str(tmp_path / "k"), "--mpp", "0.5", "--spec", "1.0/224"]
    )
    assert result.exit_code == 2 and "nest" in result.output
    result = runner.invoke(
        app, ["tile", *slides, "--out", str(tmp_path / "k"), "--mpp", "0.5", "--mag", "20"]
    )
    assert result.exit_code == 2
