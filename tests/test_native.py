"""Native tile reader: pixel-exact against OpenSlide/tiffslide on the real slide and written pyramids."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import tifffile
import torch

from wsikit import decode
from wsikit.decode import CPU_DECODERS, DecodeError, decode_jpeg_batch, decode_jpeg_cpu, jpeg_stream
from wsikit.native import NativeError, NativeFile
from wsikit.pyramid import write_pyramid
from wsikit.slide import SAMPLE_SLIDE, open_slide
from wsikit.tiles import TileItems, TileSource, assemble_batch, collate_items, plan_native, read_tile, resize


def grid(dims: tuple[int, int], step: int, side: int | None = None) -> np.ndarray:
    side = side or step
    xs = np.arange(0, dims[0] - side + 1, step)
    ys = np.arange(0, dims[1] - side + 1, step)
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.int64)


@pytest.fixture(scope="module")
def real_rgb() -> np.ndarray:
    with open_slide(SAMPLE_SLIDE) as slide:
        return slide.read_region((0, 0), 0, slide.dimensions)


@pytest.fixture(scope="module")
def files(tmp_path_factory, real_rgb) -> dict[str, tuple[str, str]]:
    """name → (path, backend that reads it) for pyramids in several layouts and codecs."""
    d = tmp_path_factory.mktemp("native")
    img = np.ascontiguousarray(real_rgb[:1024, :1024])
    out = {
        "svs-jpeg": (write_pyramid(d / "a.svs", img, 0.5, layout="svs"), "openslide"),
        "generic-jpeg": (write_pyramid(d / "b.tif", img, 0.5, layout="generic"), "openslide"),
        "generic-j2k": (
            write_pyramid(d / "c.tif", img, 0.5, layout="generic", compression="jpeg2000"),
            "tiffslide",
        ),
        "generic-zstd": (
            write_pyramid(d / "z.tif", img, 0.5, layout="generic", compression="zstd"),
            "tiffslide",
        ),
    }
    levels = [img, img[::2, ::2], img[::4, ::4]]
    with tifffile.TiffWriter(d / "d.tif") as tw:  # explicitly YCbCr-subsampled JPEG, generic
        for lv, im in enumerate(levels):
            res = 2e4 / 2**lv
            tw.write(
                np.ascontiguousarray(im),
                tile=(128, 128),
                compression="jpeg",
                photometric="ycbcr",
                subfiletype=1 if lv else 0,
                metadata=None,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
            )
    out["generic-ycbcr-128"] = (d / "d.tif", "openslide")
    with tifffile.TiffWriter(d / "e.ome.tif") as tw:  # OME-TIFF, pyramid in SubIFDs
        tw.write(img, tile=(256, 256), compression="jpeg", subifds=2, metadata={"PhysicalSizeX": 0.5})
        for im in levels[1:]:
            tw.write(np.ascontiguousarray(im), tile=(256, 256), compression="jpeg", subfiletype=1)
    out["ome-jpeg"] = (d / "e.ome.tif", "tiffslide")
    return {k: (str(p), b) for k, (p, b) in out.items()}


def test_real_aperio_rgb_jpeg_is_pixel_exact():
    """CMU-1: RGB-encoded JPEG with JPEGTables, 240-px tiles; every tile equals OpenSlide's."""
    for backend in ("openslide", "tiffslide"):
        with open_slide(SAMPLE_SLIDE, backend=backend) as slide:
            coords = grid(slide.dimensions, 240)
            src = TileSource(slide, coords, 240, 240, reader="native")
            assert src.plan.native.all() and src.jpeg_native and not src.gpu_decodable
            for i in range(len(coords)):
                assert np.array_equal(src.read(i), read_tile(slide, tuple(coords[i]), 240, 240)), (backend, i)


@pytest.mark.parametrize(
    "name", ["svs-jpeg", "generic-jpeg", "generic-j2k", "generic-zstd", "generic-ycbcr-128", "ome-jpeg"]
)
def test_pyramids_every_level_pixel_exact(files, name):
    path, backend = files[name]
    side = 128 if name.endswith("128") else 256
    with open_slide(path, backend=backend, mpp=0.5) as slide:
        assert slide.level_count == 3
        for level in range(3):
            k = round(slide.level_downsamples[level])
            coords = grid(slide.dimensions, side * k)
            src = TileSource(slide, coords, side * k, side, reader="native")
            assert src.plan.level == level and src.plan.native.all(), src.plan.reason
            for i in range(len(coords)):
                ref = read_tile(slide, tuple(coords[i]), side * k, side)
                assert np.array_equal(src.read(i), ref), (name, level, i)


def test_odd_dimensions_native_is_the_files_pixels(tmp_path, real_rgb):
    """Levels whose downsample is not exactly 2: native gives the file's own tile; OpenSlide resamples."""
    path = write_pyramid(tmp_path / "odd.svs", real_rgb, 0.5, layout="svs")  # 2220×2967 → 1110×1483
    with open_slide(path, backend="openslide") as slide:
        page = tifffile.TiffFile(path).series[0].levels[1].asarray()
        coords = grid(slide.dimensions, 512)
        src = TileSource(slide, coords, 512, 256, reader="native")
        assert src.plan.level == 1 and src.plan.native.all()
        worst = 0
        for i, (x, y) in enumerate(coords // 2):
            tile = src.read(i)
            assert np.array_equal(tile, page[y : y + 256, x : x + 256])
            worst = max(
                worst, int(np.abs(tile.astype(int) - read_tile(slide, (x * 2, y * 2), 512, 256)).max())
            )
        assert worst > 0  # OpenSlide's sub-pixel shift at downsample 2.0003: documented, not exact


def test_unaligned_tiles_are_cut_from_file_tiles(files):
    """Tiles off the file's tile grid (or of another size) are cropped from the covering file tiles:
    still identical to read_region; only whole file tiles are streamable to a GPU."""
    for name in ("svs-jpeg", "generic-j2k"):
        path, backend = files[name]
        with open_slide(path, backend=backend, mpp=0.5) as slide:
            coords = np.array([[0, 0], [256, 256], [3, 0], [130, 700], [768, 768]], np.int64)
            src = TileSource(slide, coords, 256, 256, reader="native")
            assert src.plan.native.all() and src.plan.whole.tolist() == [True, True, False, False, True]
            for i in range(len(coords)):
                assert np.array_equal(src.read(i), read_tile(slide, tuple(coords[i]), 256, 256)), (name, i)
            assert (src.stream(2) is None) and (src.stream(1) is not None or name.endswith("j2k"))
            # 224-px tiles on a 256-px file grid, at level 0 and level 1 (footprint 448)
            for size0 in (224, 448):
                odd = TileSource(slide, grid(slide.dimensions, size0), size0, 224, reader="native")
                assert odd.plan.native.all() and not odd.plan.whole.any()
                for i in (0, len(odd) // 2, len(odd) - 1):
                    ref = read_tile(slide, tuple(odd.coords[i]), size0, 224)
                    assert np.array_equal(odd.read(i), ref), (name, size0, i)
            # resized output (encoder input 224 from 256-px tiles) equals read_tile's resize
            small = TileSource(slide, coords, 256, 224, reader="native")
            assert np.array_equal(small.read(2), read_tile(slide, (3, 0), 256, 224))


def test_fallbacks_and_reader_errors(files, tmp_path, real_rgb):
    path, backend = files["svs-jpeg"]
    with open_slide(path, backend=backend) as slide:
        coords = np.array([[0, 0], [3, 0]], np.int64)
        src = TileSource(slide, coords, 512, 256, reader="auto")  # level 1: x = 3 is not a multiple of 2
        assert src.plan.level == 1 and src.plan.native.tolist() == [True, False]
        assert "off the level's pixel grid" in src.plan.reason
        for i in range(2):
            assert np.array_equal(src.read(i), read_tile(slide, tuple(coords[i]), 512, 256))
        with pytest.raises(NativeError, match="use one of"):
            TileSource(slide, coords, 256, 256, reader="fast")
    strips = tmp_path / "strips.tif"  # a plain stripped TIFF: tiffslide reads it, nothing is native
    tifffile.imwrite(strips, real_rgb[:512, :512], photometric="rgb", resolution=(2e4, 2e4), resolutionunit=3)
    with open_slide(strips, backend="tiffslide", mpp=0.5) as slide:
        coords = grid(slide.dimensions, 256)
        auto = TileSource(slide, coords, 256, 256, reader="auto")
        assert not auto.plan.native.any() and "not a tiled" in auto.plan.reason
        assert np.array_equal(auto.read(1), read_tile(slide, (256, 0), 256, 256))
        with pytest.raises(NativeError, match="--reader auto"):
            TileSource(slide, coords, 256, 256, reader="native")


def test_partial_edge_tiles_fall_back(tmp_path, real_rgb):
    path = write_pyramid(tmp_path / "edge.tif", np.ascontiguousarray(real_rgb[:600, :700]), 0.5, n_levels=1)
    with open_slide(path) as slide:
        nfile = NativeFile(path, slide.level_dimensions)
        coords = np.array([[0, 0], [256, 256], [512, 256]], np.int64)  # the last crosses x = 700
        plan = plan_native(slide, nfile, coords, 256, 256)
        assert plan.native.tolist() == [True, True, False]


def test_non_tiff_or_unmapped_levels_fall_back(tmp_path, real_rgb):
    with open_slide(SAMPLE_SLIDE) as slide:
        nfile = NativeFile(SAMPLE_SLIDE, [(10, 10)])  # dimensions tifffile's pyramid does not have
        assert nfile.levels == [None]
        plan = plan_native(slide, nfile, np.zeros((2, 2), np.int64), 240, 240)
        assert not plan.native.any() and "level 0" in plan.reason


def test_openslide_and_tiffslide_readers_use_that_backend(files):
    path, _ = files["generic-jpeg"]
    with open_slide(path, backend="openslide") as slide:
        src = TileSource(slide, grid(slide.dimensions, 256), 256, 256, reader="tiffslide")
        assert src.slide.backend == "tiffslide" and src.file is None and not src.plan.native.any()
        assert src.describe()["reader"] == "tiffslide"
        assert np.array_equal(src.read(3), read_tile(slide, tuple(src.coords[3]), 256, 256))


def test_jpeg_stream_marks_rgb_only_where_needed():
    with open_slide(SAMPLE_SLIDE) as slide:
        nfile = NativeFile(SAMPLE_SLIDE, slide.level_dimensions)
    info = nfile.levels[0]
    raw = nfile.raw(0, 1, 1)
    rgb = jpeg_stream(raw, info.jpegtables, 2)
    assert rgb[:4] == b"\xff\xd8\xff\xee" and b"Adobe" in rgb[:20]
    assert b"Adobe" not in jpeg_stream(raw, info.jpegtables, 6)[:40]
    patched = rgb.replace(b"\x03\x00\x11\x00\x01\x11\x00\x02\x11\x00", b"\x03R\x11\x00G\x11\x00B\x11\x00", 1)
    patched = patched.replace(
        b"\xff\xda\x00\x0c\x03\x00\x00\x01\x00\x02\x00", b"\xff\xda\x00\x0c\x03R\x00G\x00B\x00", 1
    )
    assert patched != rgb
    unmarked = b"\xff\xd8" + patched[2 + len(decode._ADOBE_RGB) :]
    assert b"Adobe" not in jpeg_stream(unmarked, None, 2)[:40]  # ids R, G, B: decoders know it is RGB
    assert np.array_equal(decode_jpeg_cpu(unmarked), decode_jpeg_cpu(rgb))
    # without the marker libjpeg takes the data for YCbCr: wrong colours
    wrong = decode_jpeg_cpu(jpeg_stream(raw, info.jpegtables, 6))
    assert np.abs(wrong.astype(int) - decode_jpeg_cpu(rgb)).max() > 50


def test_cpu_decoders_agree_on_real_tiles():
    with open_slide(SAMPLE_SLIDE) as slide:
        nfile = NativeFile(SAMPLE_SLIDE, slide.level_dimensions)
    streams = [nfile.stream(0, i, 2) for i in range(4)]
    ref = [decode_jpeg_cpu(s, "imagecodecs") for s in streams]
    for name in CPU_DECODERS:
        try:
            out = [decode_jpeg_cpu(s, name) for s in streams]
        except ImportError:
            continue
        assert all(np.array_equal(a, b) for a, b in zip(out, ref, strict=True)), name
    with pytest.raises(DecodeError, match="unknown JPEG decoder"):
        decode_jpeg_cpu(streams[0], "nope")


def test_gpu_decode_failure_falls_back_to_cpu(monkeypatch, files):
    """No GPU here: exercise the fallback by making the nvJPEG call fail."""
    import torchvision.io

    path, _ = files["generic-jpeg"]
    with open_slide(path) as slide:
        nfile = NativeFile(path, slide.level_dimensions)
    streams = [nfile.stream(0, i, 0) for i in range(3)]

    def broken(*args, **kwargs):
        raise RuntimeError("nvjpeg unavailable\nmore")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", broken)
    monkeypatch.setattr(decode, "_gpu_failed", [])
    assert decode._gpu_decode(streams, "cuda") is None
    assert decode.gpu_decode_error() == "RuntimeError: nvjpeg unavailable"
    assert decode._gpu_decode(streams, "cuda") is None  # later batches skip the GPU at once
    out = decode_jpeg_batch(streams, "cpu")
    assert out.shape == (3, 256, 256, 3) and out.dtype == torch.uint8
    assert np.array_equal(out[1].numpy(), decode_jpeg_cpu(streams[1]))


def test_items_ship_bytes_and_assemble(files):
    path, backend = files["svs-jpeg"]
    with open_slide(path, backend=backend) as slide:
        coords = np.array([[0, 0], [256, 0], [5, 5]], np.int64)
        src = TileSource(slide, coords, 256, 256)
        assert src.gpu_decodable
        items = TileItems(src, ship_streams=True)
        assert isinstance(items[0][0], bytes) and isinstance(items[2][0], np.ndarray)
        payloads, index, errors = collate_items([items[i] for i in range(3)])
        assert payloads.stream_pos == [0, 1] and payloads.pixel_pos == [2] and len(payloads) == 3
        assert index.tolist() == [0, 1, 2] and errors == ["", "", ""]
        batch = assemble_batch(payloads, 256, "cpu")
        for i in range(3):
            assert np.array_equal(batch[i].numpy(), read_tile(slide, tuple(coords[i]), 256, 256))
        # resized on the device with exact area weights: equals cv2's area resize up to rounding
        for out in (224, 128, 300):
            got = assemble_batch(collate_items([items[0], items[1]])[0], out, "cpu").numpy().astype(int)
            for i in range(2):
                ref = resize(read_tile(slide, tuple(coords[i]), 256, 256), (out, out))
                assert np.abs(got[i] - ref).max() <= 1, out
        # RGB-encoded sources never ship bytes (nvJPEG would get the colours wrong)
    with open_slide(SAMPLE_SLIDE) as slide:
        rgb = TileItems(TileSource(slide, grid(slide.dimensions, 240), 240, 240), ship_streams=True)
        assert not rgb.ship_streams and isinstance(rgb[0][0], np.ndarray)


def test_item_errors_are_recorded_and_source_pickles(files, tmp_path):
    path, backend = files["generic-jpeg"]
    with open_slide(path, backend=backend) as slide:
        src = TileSource(slide, grid(slide.dimensions, 256), 256, 256)
        clone = pickle.loads(pickle.dumps(src))
        assert np.array_equal(clone.read(7), src.read(7))
        items = TileItems(src)
        items.source.plan.xy[0] = (99 * 256, 99 * 256)  # a tile index past the file's table
        payload, i, error = items[0]
        assert payload is None and i == 0 and error.startswith("IndexError")
        assert np.array_equal(items[1][0], read_tile(slide, (256, 0), 256, 256))


def test_dataloader_workers_read_natively(files):
    from torch.utils.data import DataLoader

    path, backend = files["generic-ycbcr-128"]
    with open_slide(path, backend=backend) as slide:
        coords = grid(slide.dimensions, 128)
        items = TileItems(TileSource(slide, coords, 128, 128))

        def init(_):
            torch.utils.data.get_worker_info().dataset.reopen()

        loader = DataLoader(
            items, batch_size=16, num_workers=1, collate_fn=collate_items, worker_init_fn=init
        )
        got = torch.cat([assemble_batch(p, 128) for p, _, _ in loader]).numpy()
        assert got.shape == (len(coords), 128, 128, 3)
        for i in (0, 17, len(coords) - 1):
            assert np.array_equal(got[i], read_tile(slide, tuple(coords[i]), 128, 128))


def test_align_native_specs(files, tmp_path, real_rgb):
    from wsikit.specs import TileSpec
    from wsikit.tiling import align_specs_to_native

    with open_slide(SAMPLE_SLIDE) as slide:  # 0.499 µm/px, 240-px tiles, one level
        specs, notes = align_specs_to_native(slide, [TileSpec(0.5, 256, 16), TileSpec(2.0, 256)])
        assert [s.name for s in specs] == ["mpp0.50_240px_0ov", "mpp2.00_256px_0ov"]
        assert "240-px tiles at level 0" in notes[0] and "no stored level" in notes[1]
    path = write_pyramid(tmp_path / "odd.svs", real_rgb, 0.499, layout="svs")  # levels at 0.998, 1.996
    with open_slide(path) as slide:
        specs, _ = align_specs_to_native(slide, [TileSpec(1.0, 224), TileSpec(2.0, 224)])
        assert [s.name for s in specs] == ["mpp0.998_256px_0ov", "mpp1.996_256px_0ov"]


def test_tile_align_native_then_every_tile_is_native(tmp_path, real_rgb):
    from typer.testing import CliRunner

    from wsikit.cli.main import app
    from wsikit.grids import read_grid

    path = write_pyramid(tmp_path / "s.svs", np.ascontiguousarray(real_rgb[:2048, :2048]), 0.5, layout="svs")
    job = tmp_path / "job"
    args = ["tile", str(path), "--out", str(job), "--mpp", "0.5", "--tile-size", "224", "--spec", "1.0/224"]
    res = CliRunner().invoke(app, [*args, "--align-native", "--min-tissue", "0"])
    assert res.exit_code == 0, res.output
    for name, level in (("mpp0.50_256px_0ov", 0), ("mpp1.00_256px_0ov", 1)):
        grid = read_grid(job / "tiles" / name / "s.h5")
        with open_slide(path) as slide:
            src = TileSource(slide, grid.coords, grid.size_level0, grid.spec.size, reader="native")
            assert src.plan.level == level and src.plan.native.all() and len(grid) > 0
    fine = read_grid(job / "tiles" / "mpp0.50_256px_0ov" / "s.h5")
    assert (fine.parents["mpp1.00_256px_0ov"] >= 0).all()  # the snapped grids still nest


def test_failed_tiles_assemble_as_zeros(files):
    path, backend = files["svs-jpeg"]
    with open_slide(path, backend=backend) as slide:
        src = TileSource(slide, np.array([[0, 0], [256, 0]], np.int64), 256, 256)
        items = TileItems(src, ship_streams=True)
        good = items[1]
        batch, _, errors = collate_items([(None, 0, "SlideError: broken"), good])
        pixels = assemble_batch(batch, 256)
        assert errors[0] == "SlideError: broken" and not pixels[0].any()
        assert np.array_equal(pixels[1].numpy(), read_tile(slide, (256, 0), 256, 256))


def test_extract_reader_native_equals_openslide(tmp_path):
    """`wsikit tile --align-native` then extraction: native and OpenSlide readers give the same bags."""
    from typer.testing import CliRunner

    from wsikit.bags import read_bag
    from wsikit.cli.main import app
    from wsikit.encoders.build import get_encoder
    from wsikit.settings import ExtractConfig, SettingsError
    from wsikit.stages.extract import Extractor, job_slides

    job = tmp_path / "job"
    res = CliRunner().invoke(
        app, ["tile", str(SAMPLE_SLIDE), "--out", str(job), "--align-native", "--min-tissue", "0.3"]
    )
    assert res.exit_code == 0, res.output
    spec = "mpp0.50_240px_0ov"
    torch.manual_seed(0)
    encoder = get_encoder("resnet18", pretrained=False)
    feats = {}
    for reader in ("native", "openslide"):
        cfg = ExtractConfig(
            encoder="resnet18",
            pretrained=False,
            device="cpu",
            precision="fp32",
            batch_size=16,
            workers=0,
            reader=reader,
        )
        ex = Extractor.build(cfg, encoder=encoder)
        out = tmp_path / reader
        import shutil

        shutil.copytree(job, out)
        summary = ex.run(job_slides(out, [spec]), out, [spec])
        status = summary.done[0]
        assert status.info["reader"] == reader
        feats[reader] = read_bag(out / "bags" / spec / "resnet18" / "CMU-1-Small-Region.h5").features
    assert feats["native"].shape[0] > 20
    assert np.array_equal(feats["native"], feats["openslide"])
    with pytest.raises(SettingsError, match="--reader"):
        ExtractConfig(reader="fast")
