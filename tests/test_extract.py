"""Extraction: slide → bag, determinism across workers and batch sizes, failures, resume, multi-scale."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsikit.bags import bag_path, read_bag
from wsikit.encoders.build import get_encoder
from wsikit.grids import grid_path, read_grid, write_grid
from wsikit.jobs import JobError, SlideEntry, read_status, resolve_slides
from wsikit.settings import ExtractConfig, SettingsError, TileConfig
from wsikit.specs import TileSpec
from wsikit.stages.extract import ExtractError, run_extraction, stage_name
from wsikit.stages.tile import run_tiling

FINE, COARSE = "mpp0.50_256px_0ov", "mpp1.00_256px_0ov"


@pytest.fixture(scope="module")
def tiled(tmp_path_factory, pyramids) -> Path:
    """A job with two real slides (SVS-like and generic pyramids) tiled at 0.5 and 1.0 µm/px."""
    root = tmp_path_factory.mktemp("tiled")
    slides = root / "slides"
    slides.mkdir()
    for name in ("svs", "generic"):
        shutil.copy(pyramids[name], slides / pyramids[name].name)
    cfg = TileConfig((TileSpec(0.5, 256), TileSpec(1.0, 256)))
    summary = run_tiling(resolve_slides([slides]), root / "job", cfg)
    assert not summary.failed
    return root


@pytest.fixture
def job(tiled, tmp_path) -> Path:
    """A fresh copy of the tiled job (slides included) for one test."""
    shutil.copytree(tiled, tmp_path / "t")
    job = tmp_path / "t" / "job"
    for path in (job / "tiles").rglob("*.h5"):  # point the grids at the copied slides
        grid = read_grid(path)
        grid.attrs["slide_path"] = str(tmp_path / "t" / "slides" / Path(grid.attrs["slide_path"]).name)
        write_grid(path, grid)
    return job


@pytest.fixture(scope="module")
def encoder():
    """Random ResNet-18 fed 112-px tiles: a quarter of the work, the same code paths."""
    return dataclasses.replace(get_encoder("resnet18", pretrained=False), input_size=112)


def _extract(job, encoder, overwrite=False, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("encoder", "resnet18")
    return run_extraction(job, ExtractConfig(**kw), encoder=encoder, overwrite=overwrite)


def test_extract_writes_bags_with_grid_attrs(job, encoder):
    summary = _extract(job, encoder, specs=(FINE,))
    assert not summary.failed and len(summary.done) == 2
    for status in summary.done:
        grid = read_grid(grid_path(job, FINE, status.slide_id))
        bag = read_bag(bag_path(job, FINE, "resnet18", status.slide_id))
        assert bag.features.shape == (len(grid), 512) and bag.features.dtype == np.float32
        np.testing.assert_array_equal(bag.coords, grid.coords)
        np.testing.assert_array_equal(bag.tile_index, np.arange(len(grid)))
        for key in ("patch_size", "patch_size_level0", "level0_magnification", "target_mpp", "slide_mpp"):
            assert bag.coords_attrs[key] == grid.attrs[key]
        a = bag.attrs
        assert a["format"] == "wsikit-bag" and a["encoder"] == "resnet18" and a["weights_id"] == "random"
        assert a["tile_spec"] == FINE and a["slide_id"] == status.slide_id and a["stain"] is None
        assert a["preprocessing"]["input_size"] == 112 and a["slide_mpp"] == pytest.approx(0.499)
        assert a["wsikit_version"] and a["created"] and a["n_skipped"] == 0
        assert status.info["tiles"][FINE] == len(grid)
    assert read_status(job, stage_name("resnet18"), summary.done[0].slide_id).state == "done"


def test_workers_0_and_2_give_identical_features(job, encoder):
    _extract(job, encoder, specs=(FINE,), workers=0)
    first = {p.name: read_bag(p).features for p in (job / "bags" / FINE / "resnet18").glob("*.h5")}
    summary = _extract(job, encoder, specs=(FINE,), workers=2, overwrite=True)
    assert not summary.failed
    for name, feats in first.items():
        np.testing.assert_array_equal(read_bag(job / "bags" / FINE / "resnet18" / name).features, feats)


def test_batch_sizes_1_and_64_agree(job, encoder):
    out = {}
    entry = [SlideEntry(Path(read_grid(grid_path(job, COARSE, "cmu_svs")).attrs["slide_path"]), "cmu_svs")]
    for batch in (1, 64):
        cfg = ExtractConfig("resnet18", specs=(COARSE,), batch_size=batch, precision="fp32", workers=0)
        assert not run_extraction(job, cfg, entry, encoder=encoder, overwrite=True).failed
        out[batch] = read_bag(bag_path(job, COARSE, "resnet18", "cmu_svs")).features
    np.testing.assert_allclose(out[1], out[64], rtol=1e-4, atol=1e-5)


def _corrupt_level0_tile(slide: Path, x: int, y: int) -> None:
    """Overwrite the JPEG header of the level-0 file tile holding level-0 pixel (x, y)."""
    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[0]
        per_row = -(-page.imagewidth // page.tilewidth)
        k = (y // page.tilelength) * per_row + x // page.tilewidth
        offset = page.dataoffsets[k]
    with open(slide, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * 64)


@pytest.mark.parametrize(("workers", "reader"), [(0, "auto"), (2, "auto"), (2, "openslide")])
def test_corrupt_tile_is_skipped_and_recorded(job, encoder, workers, reader):
    encoder = dataclasses.replace(encoder, input_size=224)  # 224 of a 256-px footprint: read at level 0
    grid = read_grid(grid_path(job, FINE, "cmu_svs"))
    bad = [tuple(int(v) for v in grid.coords[i]) for i in (3, len(grid) // 2)]
    slide = Path(grid.attrs["slide_path"])
    for x, y in bad:
        _corrupt_level0_tile(slide, x, y)
    summary = _extract(job, encoder, workers=workers, reader=reader)
    assert not summary.failed and len(summary.done) == 2
    status = next(s for s in summary.done if s.slide_id == "cmu_svs")
    assert sorted(map(tuple, status.info["skipped"][FINE])) == sorted(bad)
    # the next spec reads through a fresh handle: nothing lost there
    assert status.info["skipped"][COARSE] == []
    assert status.info["tiles"][COARSE] == len(read_grid(grid_path(job, COARSE, "cmu_svs")))
    assert status.warnings and "could not be read" in status.warnings[0]
    bag = read_bag(bag_path(job, FINE, "resnet18", "cmu_svs"))
    assert len(bag) == len(grid) - 2
    assert sorted(map(tuple, bag.skipped_coords.tolist())) == sorted(bad)
    assert not {tuple(c) for c in bag.coords.tolist()} & set(bad)
    assert len(bag.attrs["skipped_errors"]) == 2
    # every other tile is still encoded, in grid order
    np.testing.assert_array_equal(bag.coords, grid.coords[bag.tile_index])


def test_failed_slide_is_recorded_and_run_goes_on(job, encoder):
    Path(read_grid(grid_path(job, FINE, "cmu_generic")).attrs["slide_path"]).unlink()
    summary = _extract(job, encoder, specs=(FINE,))
    assert [s.slide_id for s in summary.done] == ["cmu_svs"]
    assert [s.slide_id for s in summary.failed] == ["cmu_generic"]
    assert "no such file" in summary.failed[0].error and "\n" not in summary.failed[0].error
    assert not bag_path(job, FINE, "resnet18", "cmu_generic").exists()


def test_resume_skips_done_and_redoes_changed_settings(job, encoder):
    _extract(job, encoder, specs=(COARSE,))
    again = _extract(job, encoder, specs=(COARSE,))
    assert sorted(again.skipped) == ["cmu_generic", "cmu_svs"] and not again.done
    with pytest.raises(JobError, match="fp16_features False → True"):  # a job holds one set of settings
        _extract(job, encoder, specs=(COARSE,), fp16_features=True)
    changed = _extract(job, encoder, specs=(COARSE,), fp16_features=True, overwrite=True)
    assert len(changed.done) == 2
    assert read_bag(bag_path(job, COARSE, "resnet18", "cmu_svs")).features.dtype == np.float16


def test_multiscale_bag_joins_parents(job, encoder):
    summary = _extract(job, encoder, fmt="zarr")
    assert not summary.failed
    fine = read_bag(bag_path(job, FINE, "resnet18", "cmu_svs", "zarr"))
    coarse = read_bag(bag_path(job, COARSE, "resnet18", "cmu_svs", "zarr"))
    joined = read_bag(bag_path(job, f"{FINE}+{COARSE}", "resnet18", "cmu_svs", "zarr"))
    grid = read_grid(grid_path(job, FINE, "cmu_svs"))
    np.testing.assert_array_equal(joined.features, fine.features)
    parent = grid.parents[COARSE][joined.tile_index]
    has = parent >= 0  # -1: the coarse tile would cross the slide's edge
    assert has.sum() > len(parent) // 2
    np.testing.assert_array_equal(joined.context_index[COARSE], parent)  # no skipped coarse tiles
    np.testing.assert_array_equal(joined.context[COARSE][has], coarse.features[parent[has]])
    assert not joined.context[COARSE][~has].any()
    assert joined.multiscale().shape == (len(fine), 1024)
    assert joined.attrs["multiscale_specs"] == [FINE, COARSE]


def test_empty_grid_gives_empty_bag(job, encoder):
    grid = read_grid(grid_path(job, FINE, "cmu_svs"))
    grid.coords = grid.coords[:0]
    grid.tissue_fraction = grid.tissue_fraction[:0]
    grid.parents = {k: v[:0] for k, v in grid.parents.items()}
    write_grid(grid_path(job, FINE, "blank"), grid)
    entry = SlideEntry(Path(grid.attrs["slide_path"]), "blank")
    summary = run_extraction(
        job, ExtractConfig("resnet18", specs=(FINE,), workers=0), [entry], encoder=encoder
    )
    assert not summary.failed and "empty" in summary.done[0].warnings[0]
    bag = read_bag(bag_path(job, FINE, "resnet18", "blank"))
    assert bag.features.shape == (0, 512) and bag.coords.shape == (0, 2)


@pytest.mark.slow
def test_real_pretrained_encoder_and_stain(job, shared_data):
    stain = pytest.importorskip("wsikit.stain")
    target = stain.load_image(
        shared_data
        / "stain"
        / sorted(p.name for p in (shared_data / "stain").iterdir() if p.suffix == ".png")[0]
    )
    norm_path = stain.fit_normalizer("macenko", target).save(job.parent / "target.json")
    enc = get_encoder("efficientnet-lite0")
    plain = run_extraction(job, ExtractConfig("efficientnet-lite0", specs=(COARSE,), workers=0), encoder=enc)
    before = read_bag(bag_path(job, COARSE, "efficientnet-lite0", "cmu_svs")).features
    normed = run_extraction(  # a stain change is a change of the job's settings: --overwrite redoes it
        job,
        ExtractConfig("efficientnet-lite0", specs=(COARSE,), workers=0, stain=norm_path),
        encoder=enc,
        overwrite=True,
    )
    assert not plain.failed and len(normed.done) == 2
    bag = read_bag(bag_path(job, COARSE, "efficientnet-lite0", "cmu_svs"))
    assert bag.attrs["weights_id"].startswith("sha256:") and bag.attrs["stain"]["method"] == "macenko"
    assert bag.attrs["stain"]["source"] is not None or bag.attrs["stain"]["params"]
    assert not np.allclose(bag.features, before)


def test_bad_requests(job, tmp_path, encoder):
    with pytest.raises(ExtractError, match=r"no coordinates for mpp2\.00_256px_0ov"):
        _extract(job, encoder, specs=("mpp2.00_256px_0ov",))
    with pytest.raises(ExtractError, match="run `wsikit tile"):
        _extract(tmp_path / "nothing", encoder)
    with pytest.raises(SettingsError, match="--format"):
        ExtractConfig(fmt="npy")


def test_cli_extract_inspect_export(job):
    from typer.testing import CliRunner

    from wsikit.cli.main import app

    runner = CliRunner()
    args = ["extract", str(job), "-e", "resnet18", "--random-weights", "--spec", "1.0/256", "-j", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    bags = job / "bags" / COARSE / "resnet18"
    assert sorted(p.name for p in bags.iterdir()) == ["cmu_generic.h5", "cmu_svs.h5"]
    assert runner.invoke(app, args).exit_code == 0  # resume: nothing to do
    result = runner.invoke(app, ["bags", "export", str(bags), "--to", "clam", "-o", str(job / "clam")])
    assert result.exit_code == 0, result.output
    assert (job / "clam" / "pt_files" / "cmu_svs.pt").is_file()
    result = runner.invoke(app, ["bags", "inspect", str(job / "clam" / "h5_files"), "--json"])
    assert result.exit_code == 0 and '"source_format": "clam"' in result.output
    result = runner.invoke(app, ["extract", str(job), "-e", "nope"])
    assert result.exit_code == 2 and "unknown encoder" in result.output
