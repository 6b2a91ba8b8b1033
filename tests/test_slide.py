"""The slide layer on the real bundled slide and on pyramids written from it."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from typer.testing import CliRunner

from wsikit.cli.main import app
from wsikit.slide import MPPError, SlideError, open_slide
from wsikit.specs import mag_to_mpp, mpp_to_mag, same_mpp


def test_real_slide_facts(sample_slide):
    with open_slide(sample_slide) as slide:
        assert slide.backend == "openslide"
        assert slide.vendor == "aperio"
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx((0.499, 0.499))
        assert slide.objective_power == 20
        assert round(mpp_to_mag(slide.mpp0)) == 20
        assert {"label", "macro", "thumbnail"} <= set(slide.associated_images)


def test_magnification_convention_is_ten_over_mpp():
    assert mag_to_mpp(20) == 0.5 and mag_to_mpp(40) == 0.25 and mag_to_mpp(10) == 1.0
    # no bucketing: 0.22 and 0.29 µm/px stay different magnifications
    assert mpp_to_mag(0.22) != pytest.approx(mpp_to_mag(0.29))
    assert same_mpp(0.499, 0.5) and not same_mpp(0.25, 0.5)


@pytest.mark.parametrize("kind", ["svs", "generic"])
def test_backends_agree_on_pixels(pyramids, kind):
    regions = {}
    for backend in ("openslide", "tiffslide"):
        with open_slide(pyramids[kind], backend=backend) as slide:
            assert slide.level_count == 3
            assert slide.mpp == pytest.approx((0.499, 0.499))
            regions[backend] = [
                slide.read_region((256, 512), 0, (300, 200)),
                slide.read_region((0, 0), 1, (256, 256)),
                slide.read_region((1024, 1024), 2, (128, 96)),
            ]
    for a, b in zip(regions["openslide"], regions["tiffslide"], strict=True):
        assert a.shape == b.shape and a.dtype == np.uint8
        assert np.array_equal(a, b)


def test_real_slide_backends_identical(sample_slide):
    with (
        open_slide(sample_slide, backend="openslide") as a,
        open_slide(sample_slide, backend="tiffslide") as b,
    ):
        assert np.array_equal(
            a.read_region((700, 900), 0, (512, 384)), b.read_region((700, 900), 0, (512, 384))
        )


def test_outside_the_slide_is_white(sample_slide):
    with open_slide(sample_slide) as slide:
        w, h = slide.dimensions
        region = slide.read_region((w - 10, h - 10), 0, (20, 20))
        assert region.shape == (20, 20, 3)
        assert (region[12:, 12:] == 255).all()


@pytest.mark.parametrize(
    ("mpp", "level", "scale"),
    [
        (0.499, 0, 1.0),
        (0.5, 0, 1.0),
        (1.0, 1, 1.0),
        (2.0, 2, 1.0),
        (1.5, 1, 1.5),
        (4.0, 2, 2.0),
        (0.25, 0, 0.501),
    ],
)
def test_best_level_and_read_at_mpp_geometry(pyramids, mpp, level, scale):
    with open_slide(pyramids["svs"]) as slide:
        choice = slide.best_level(mpp)
        assert choice.level == level
        assert choice.scale == pytest.approx(scale, abs=0.01)
        tile = slide.read_at_mpp((512, 512), 64, mpp)
        assert tile.shape == (64, 64, 3)
        # the tile covers level0_extent(64, mpp) level-0 pixels: compare with a level-0 read resized
        ext = slide.level0_extent(64, mpp)
        assert ext == (64 if same_mpp(mpp, 0.499) else round(64 * mpp / 0.499))
        from wsikit.tiles import resize

        expected = resize(slide.read_region((512, 512), 0, (ext, ext)), (64, 64))
        assert np.abs(tile.astype(int) - expected).mean() < 6  # pyramid level vs level-0 resize


def test_read_at_mpp_is_a_physical_crop(sample_slide):
    """A tile at 1 µm/px covers the same tissue as 2× as many level-0 pixels at 0.5 µm/px."""
    with open_slide(sample_slide) as slide:
        coarse = slide.read_at_mpp((400, 600), 128, 0.998).astype(float)
        fine = slide.read_region((400, 600), 0, (256, 256)).astype(float)
        fine_down = fine.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
        assert np.abs(coarse - fine_down).mean() < 2


def test_thumbnail(sample_slide, pyramids):
    with open_slide(sample_slide) as slide:
        thumb = slide.thumbnail(max_side=512)
        assert thumb.shape == (512, round(2220 * 512 / 2967), 3)
        at_mpp = slide.thumbnail(mpp=8.0)
        assert at_mpp.shape[:2] == (round(2967 * 0.499 / 8), round(2220 * 0.499 / 8))
    with open_slide(pyramids["generic"]) as slide:
        assert slide.thumbnail(max_side=256).shape[0] == 256


def test_missing_mpp_is_a_clear_error_and_override_works(pyramids):
    with open_slide(pyramids["no_mpp"]) as slide:
        assert not slide.has_mpp
        with pytest.raises(MPPError, match=r"cmu_nompp\.tif.*pass mpp="):
            _ = slide.mpp
    with open_slide(pyramids["no_mpp"], mpp=0.25) as slide:
        assert slide.mpp == (0.25, 0.25) and slide.mpp_source == "override"
    with pytest.raises(MPPError, match="outside"):
        open_slide(pyramids["no_mpp"], mpp=352.8)  # a 72-dpi default is not a microscope


def test_implausible_resolution_tag_is_ignored(tmp_path, sample_rgb):
    import tifffile

    path = tmp_path / "dpi72.tif"
    tifffile.imwrite(
        path, sample_rgb[:512, :512], tile=(256, 256), resolution=(72, 72), resolutionunit="INCH"
    )
    with open_slide(path) as slide:
        assert not slide.has_mpp


class _Tiles(Dataset):
    def __init__(self, slide):
        self.slide = slide

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.from_numpy(self.slide.read_at_mpp((i * 256, 0), 64, 1.0))


def test_slide_pickles_into_dataloader_workers(pyramids):
    with open_slide(pyramids["svs"], mpp=0.499) as slide:
        clone = pickle.loads(pickle.dumps(slide))
        assert clone.backend == slide.backend and clone.mpp == slide.mpp
        direct = torch.stack([_Tiles(slide)[i] for i in range(4)])
        loader = DataLoader(_Tiles(slide), batch_size=2, num_workers=2, multiprocessing_context="spawn")
        assert torch.equal(torch.cat(list(loader)), direct)


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "random", "truncated", "text"])
def test_bad_files_give_one_line_errors(tmp_path, sample_slide, case):
    path = tmp_path / f"{case}.svs"
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "random":
        path.write_bytes(np.random.default_rng(0).bytes(50_000))
    elif case == "truncated":
        path.write_bytes(sample_slide.read_bytes()[:4000])
    elif case == "text":
        path.write_text("slide_id,label\n")
    with pytest.raises(SlideError) as info, open_slide(path) as slide:
        slide.read_region((0, 0), 0, (2000, 2000))
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_cli_info_table_and_json(sample_slide, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["info", str(sample_slide), "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)["slides"][0]
    assert (
        facts["mpp"] == [0.499, 0.499]
        and facts["objective_power"] == 20
        and round(facts["magnification"]) == 20
    )
    result = runner.invoke(app, ["info", str(sample_slide)])
    assert result.exit_code == 0 and "0.499" in result.stdout and "20x" in result.stdout
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"not a slide")
    result = runner.invoke(app, ["info", str(sample_slide), str(bad)])
    assert result.exit_code == 1


def test_cli_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and "wsikit" in result.stdout
