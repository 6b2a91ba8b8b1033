"""Bad input: every broken slide, table, config or bag gets one line naming the file and the fix (or a
recorded, counted skip) and the rest of the run goes on.

Cases covered elsewhere are not repeated: missing, directory, empty, random-bytes, text and
early-truncated slides (``test_slide.py::test_bad_files_give_one_line_errors``), a 72-dpi resolution tag
(``test_slide.py::test_implausible_resolution_tag_is_ignored``), a corrupt tile during extraction
(``test_extract.py::test_corrupt_tile_is_skipped_and_recorded``), missing label columns, conflicting
duplicate rows and bags without labels (``test_mil.py::test_labels_and_matching``), unknown config keys
(``test_pipeline.py::test_bad_configs_name_the_key``, ``::test_mil_train_reads_the_mil_section``).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import yaml
from typer.testing import CliRunner

from wsikit.bags import Bag, write_bag
from wsikit.cli.main import app
from wsikit.config import ConfigError, load_yaml
from wsikit.images.data import DataError as CoreDataError
from wsikit.images.data import kfold_set, load_manifest
from wsikit.jobs import SlideEntry, job_status, read_status
from wsikit.mil import data as mil_data
from wsikit.mil.cv import run_cv
from wsikit.mil.data import DataError, check_bags, find_bags, match_bags, read_labels
from wsikit.mil.train import TrainConfig
from wsikit.pyramid import write_pyramid
from wsikit.settings import TileConfig
from wsikit.slide import MPPError, SlideError, open_slide
from wsikit.specs import TileSpec
from wsikit.stages.tile import run_tiling

SPEC = "mpp0.50_256px_0ov"


def _one_line_error(path: Path, *words: str, error: type[Exception] = SlideError) -> str:
    with pytest.raises(error) as info, open_slide(path) as slide:
        slide.read_region((0, 0), 0, (64, 64))
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


@pytest.fixture(scope="module")
def good(tmp_path_factory, sample_rgb) -> dict[str, Path]:
    """Small tissue-bearing pyramids of the real slide, SVS-like and generic."""
    root = tmp_path_factory.mktemp("good")
    crop = np.ascontiguousarray(sample_rgb[1024:2048, 512:1536])
    return {
        "svs": write_pyramid(root / "good_svs.svs", crop, 0.499, layout="svs"),
        "generic": write_pyramid(root / "good_generic.tif", crop, 0.499, layout="generic"),
    }


def _patch_dimensions(src: Path, dest: Path, side: int) -> Path:
    """Copy ``src`` with level 0's ImageWidth/ImageLength tags set to ``side``."""
    dest.write_bytes(src.read_bytes())
    with tifffile.TiffFile(dest) as tif:
        tags = tif.pages[0].tags
        offsets = [tags[name].valueoffset for name in ("ImageWidth", "ImageLength")]
        assert all(tags[name].dtype == 4 for name in ("ImageWidth", "ImageLength"))  # LONG
    with open(dest, "r+b") as fh:
        for offset in offsets:
            fh.seek(offset)
            fh.write(struct.pack("<I", side))
    return dest


# -- slides ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["svs", "generic"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_slide_is_refused_at_open(tmp_path, good, layout, fraction):
    data = good[layout].read_bytes()
    path = tmp_path / f"cut{good[layout].suffix}"
    path.write_bytes(data[: int(len(data) * fraction)])
    _one_line_error(path, "truncated", "copy the slide again")


def test_slide_cut_where_its_page_list_breaks_is_refused(tmp_path, good):
    with tifffile.TiffFile(good["generic"]) as tif:
        last_ifd = tif.pages[-1].offset  # every page before it is complete
    path = tmp_path / "cut.tif"
    path.write_bytes(good["generic"].read_bytes()[:last_ifd])
    _one_line_error(path, "truncated", "list of pages breaks off")


@pytest.mark.parametrize("side", [2**31 - 1, 100_000])
def test_absurd_header_dimensions_are_refused_without_allocating(tmp_path, good, side):
    path = _patch_dimensions(good["svs"], tmp_path / "huge.svs", side)
    _one_line_error(path, f"{side}x{side} px", "header is damaged")


def test_symlink_loop_and_broken_link(tmp_path):
    a, b = tmp_path / "a.svs", tmp_path / "b.svs"
    a.symlink_to(b)
    b.symlink_to(a)
    _one_line_error(a, "symbolic link loop")
    dangling = tmp_path / "dangling.svs"
    dangling.symlink_to(tmp_path / "gone.svs")
    _one_line_error(dangling, "broken symbolic link", "gone.svs")


def _without_file_override() -> None:
    """In a child process before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding
    set (root's capabilities after exec), so even root obeys file modes."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unreadable_slide(tmp_path, good):
    """chmod 000; the check runs in a child process without the capabilities that let root read anything."""
    path = tmp_path / "locked.svs"
    path.write_bytes(good["svs"].read_bytes())
    path.chmod(0)
    code = (
        "import sys\nfrom wsikit.slide import SlideError, open_slide\n"
        "try:\n    open_slide(sys.argv[1])\nexcept SlideError as exc:\n    print(exc)\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            capture_output=True,
            text=True,
            preexec_fn=_without_file_override if os.geteuid() == 0 else None,
            timeout=120,
        )
    except subprocess.SubprocessError as exc:  # preexec_fn failed: a container without CAP_SETPCAP
        if isinstance(exc, subprocess.TimeoutExpired):
            raise
        pytest.skip("cannot drop root's file-override capabilities here")
    message = out.stdout.strip()
    assert out.returncode == 0 and len(message.splitlines()) == 1, (out.stdout, out.stderr)
    assert str(path) in message and "permission denied" in message


def test_no_mpp_names_both_fixes(pyramids):
    with open_slide(pyramids["no_mpp"]) as slide, pytest.raises(MPPError) as info:
        _ = slide.mpp
    assert "--slide-mpp" in str(info.value) and "mpp=" in str(info.value)


def _corrupt_tile(path: Path, page: int, index: int) -> tuple[int, int]:
    """Flip the bits of the middle of one JPEG tile; returns the tile's level-0 (x, y)."""
    with tifffile.TiffFile(path) as tif:
        p = tif.pages[page]
        offset, count = p.dataoffsets[index], p.databytecounts[index]
        per_row = -(-p.imagewidth // p.tilewidth)
        xy = ((index % per_row) * p.tilewidth, (index // per_row) * p.tilelength)
    with open(path, "r+b") as fh:
        fh.seek(offset + count // 2)
        chunk = fh.read(64)
        fh.seek(offset + count // 2)
        fh.write(bytes(v ^ 0xFF for v in chunk))
    return xy


def test_bit_flipped_tile_still_tiles_and_the_read_names_the_file(tmp_path, sample_rgb):
    path = write_pyramid(tmp_path / "flipped.svs", sample_rgb, 0.499, layout="svs")
    x, y = _corrupt_tile(path, 0, 40)  # level 0: the mask and QC thumbnails read coarser levels
    summary = run_tiling(
        [SlideEntry(path, "flipped")], tmp_path / "job", TileConfig((TileSpec(0.5, 256, 0),))
    )
    assert not summary.failed and summary.done[0].info["tiles"][SPEC] > 0
    with open_slide(path) as slide, pytest.raises(SlideError) as info:
        slide.read_region((x, y), 0, (256, 256))
    assert str(path) in str(info.value) and "copy the slide again" in str(info.value)
    # extraction skips and records such a tile: test_extract.py::test_corrupt_tile_is_skipped_and_recorded


def test_slide_smaller_than_a_tile_gives_an_empty_grid_and_a_warning(tmp_path, sample_rgb):
    crop = np.ascontiguousarray(sample_rgb[1400:1550, 1000:1200])
    path = write_pyramid(tmp_path / "tiny.tif", crop, 0.499, layout="generic", n_levels=1)
    summary = run_tiling([SlideEntry(path, "tiny")], tmp_path / "job", TileConfig((TileSpec(0.5, 256, 0),)))
    status = summary.done[0]
    assert status.info["tiles"] == {SPEC: 0}
    assert any("SMALLER THAN A TILE: 200x150 px" in w for w in status.warnings)


def test_batch_tile_goes_on_past_every_bad_slide(tmp_path, good, pyramids, sample_rgb):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero.svs").write_bytes(b"")
    data = good["svs"].read_bytes()
    (bad / "cut.svs").write_bytes(data[: len(data) // 2])
    (bad / "noise.tif").write_bytes(np.random.default_rng(0).bytes(40_000))
    _patch_dimensions(good["generic"], bad / "huge.tif", 2**31 - 1)
    (bad / "loop_a.svs").symlink_to(bad / "loop_b.svs")
    (bad / "loop_b.svs").symlink_to(bad / "loop_a.svs")
    tifffile.imwrite(
        bad / "dpi72.tif", sample_rgb[:512, :512], tile=(256, 256), resolution=(72, 72), resolutionunit="INCH"
    )
    reasons = {
        "zero": "empty file",
        "cut": "truncated",
        "noise": "cannot be opened",
        "huge": "header is damaged",
        "loop_a": "symbolic link loop",
        "cmu_nompp": "--slide-mpp",
        "dpi72": "--slide-mpp",  # 352.8 µm/px from a 72-dpi tag is ignored: no MPP
    }
    slides = [*good.values(), pyramids["no_mpp"], *(bad / f"{n}{s}" for n, s in [
        ("zero", ".svs"), ("cut", ".svs"), ("noise", ".tif"), ("huge", ".tif"), ("loop_a", ".svs"), ("dpi72", ".tif"),
    ])]  # fmt: skip
    job = tmp_path / "job"
    result = CliRunner().invoke(app, ["tile", *map(str, slides), "--out", str(job)], env={"COLUMNS": "250"})
    assert result.exit_code == 1, result.output
    assert f"2 done, {len(reasons)} failed" in result.output
    for slide_id, reason in reasons.items():
        status = read_status(job, "tile", slide_id)
        assert status.state == "failed" and reason in status.error, (slide_id, status.error)
        assert slide_id in status.error and f"failed {slide_id}:" in result.output
    for path in good.values():
        status = read_status(job, "tile", path.stem)
        assert status.state == "done" and status.info["tiles"][SPEC] > 0
    report = job_status(job)["stages"]["tile"]
    assert (report["done"], report["failed"]) == (2, len(reasons))
    # the fix the error names works: a resumed run with --slide-mpp finishes the slide without MPP
    again = CliRunner().invoke(
        app, ["tile", str(pyramids["no_mpp"]), "--out", str(job), "--slide-mpp", "0.499", "--retry-failed"]
    )
    assert again.exit_code == 0 and read_status(job, "tile", "cmu_nompp").state == "done"


# -- labels tables and configs ---------------------------------------------------------------------------
def test_labels_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("slide_id,patient_id,label\ns1,p1,tumor\ns2,p2,Kn\xf6tchen\n".encode("latin-1"))
    with pytest.raises(
        DataError, match=rf"{path}:3: not UTF-8 text \(byte 0xf6\); save the labels table as UTF-8"
    ):
        read_labels(path)


def test_labels_with_one_class_are_refused(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,patient_id,label\ns1,p1,tumor\ns2,p2,tumor\n")
    with pytest.raises(
        DataError, match=r"every slide has label 'tumor'; a classifier needs at least 2 classes"
    ):
        read_labels(path)
    with pytest.raises(DataError, match="every slide has label 'tumor'"):
        read_labels(path, classes=["normal", "tumor"])  # declared classes do not make examples


def test_duplicates_and_mixed_patients_are_reported(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text(
        "slide_id,patient_id,label\ns1,p1,tumor\ns2,p1,normal\ns3,p2,tumor\ns3,p2,tumor\ns4,p3,normal\n"
    )
    table = read_labels(path)
    assert table.slide_ids == ["s1", "s2", "s3", "s4"]
    bags = {s: tmp_path / f"{s}.h5" for s in [*table.slide_ids, "orphan"]}
    _, _, warnings = match_bags(table, bags)
    assert warnings[0] == "1 bags have no label and are not used: orphan"
    assert warnings[1] == "merged 1 duplicate row(s) (lines 5)"
    assert warnings[2].startswith("1 patient(s) have slides of different labels, e.g. p1 (normal/tumor)")


def test_patch_manifest_not_utf8_and_one_class(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"")
    bad = tmp_path / "bad.csv"
    bad.write_bytes("path,label\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(CoreDataError, match=rf"{bad}:2: not UTF-8 text"):
        load_manifest(bad)
    one = tmp_path / "one.csv"
    one.write_text("path,label,patient_id\na.png,tumor,p1\na.png,tumor,p2\na.png,tumor,p3\n")
    with pytest.raises(CoreDataError, match="every image has class 'tumor'; training needs at least 2"):
        kfold_set(load_manifest(one), k=2)


def test_config_wrong_type_not_utf8_and_directory(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"mil": {"model": "abmil", "epochs": "many"}}))
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,patient_id,label\n")
    args = [
        "train",
        str(tmp_path),
        "--labels",
        str(labels),
        "--out",
        str(tmp_path / "run"),
        "--config",
        str(cfg),
    ]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})
    assert result.exit_code == 2 and "mil.epochs: Input should be a valid integer" in result.output
    assert "'many'" in result.output and not (tmp_path / "run").exists()
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("mil:\n  model: abmil\n# r\xe9sum\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{latin}:3: not UTF-8 text"):
        load_yaml(latin)
    with pytest.raises(ConfigError, match="cannot read the config"):
        load_yaml(tmp_path)


# -- bags mixed into a training set ----------------------------------------------------------------------
def _bag(folder: Path, name: str, n: int = 12, dim: int = 8, seed: int = 0, **attrs) -> Path:
    rng = np.random.default_rng(seed)
    coords = np.stack([np.arange(n) * 256, np.zeros(n)], axis=1).astype(np.int64)
    meta = {"encoder": "toy", "weights_id": "sha256:toy", **attrs}
    return write_bag(folder / f"{name}.h5", Bag(rng.normal(size=(n, dim)).astype(np.float32), coords, meta))


@pytest.fixture
def mixed_bags(tmp_path) -> tuple[Path, dict[str, str]]:
    """Eight good bags (two classes) and one of each kind of bad bag, with the reason each must get."""
    rows = ["slide_id,patient_id,label"]
    for i in range(8):
        _bag(tmp_path, f"ok{i}", seed=i)
        rows.append(f"ok{i},p{i},{'tumor' if i % 2 else 'normal'}")
    nan = _bag(tmp_path, "nan", n=3000)
    with h5py.File(nan, "r+") as fh:
        fh["features"][2999, 3] = np.nan  # in the last chunk of the scan
    inf = _bag(tmp_path, "inf")
    with h5py.File(inf, "r+") as fh:
        fh["features"][0, 0] = np.inf
    _bag(tmp_path, "empty", n=0)
    short = _bag(tmp_path, "short")
    with h5py.File(short, "r+") as fh:
        del fh["coords"]
        fh["coords"] = np.zeros((7, 2), np.int64)
    _bag(tmp_path, "wide", dim=16)
    _bag(tmp_path, "other_encoder", encoder="uni")
    _bag(tmp_path, "other_weights", weights_id="sha256:other")
    (tmp_path / "garbage.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    expected = {
        "nan": "1 NaN/Inf feature values",
        "inf": "1 NaN/Inf feature values",
        "empty": "0 tiles",
        "short": "12 feature rows but 7 coordinates",
        "wide": "16-d features (different feature sizes: the others are 8-d)",
        "other_encoder": "encoder 'uni', the others 'toy'",
        "other_weights": "weights_id 'sha256:other', the others 'sha256:toy'",
        "garbage": "unreadable",
    }
    for i, name in enumerate(expected):
        rows.append(f"{name},q{i},{'tumor' if i % 2 else 'normal'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return tmp_path, expected


def test_bad_bags_are_all_named_before_training(mixed_bags, monkeypatch):
    folder, expected = mixed_bags
    monkeypatch.setattr(mil_data, "_SCAN_BYTES", 4 * 8 * 100)  # 100 rows a chunk: the NaN is in chunk 30
    table, paths, _ = match_bags(read_labels(folder / "labels.csv"), find_bags(folder))
    report = check_bags(paths)
    assert report.dim == 8 and report.encoder == {"encoder": "toy", "weights_id": "sha256:toy"}
    found = {p.stem: reasons for p, reasons in report.problems.items()}
    assert list(found) == list(expected)  # in the order given, the good bags not among them
    assert all(found[name] == [reason] for name, reason in expected.items() if name != "garbage")
    assert len(found["garbage"]) == 1 and found["garbage"][0].startswith("unreadable: ")
    with pytest.raises(DataError) as info:
        run_cv(
            TrainConfig(model="mean-pool", epochs=1, folds=2, device="cpu"), table, paths, 8, folder / "run"
        )
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{len(expected)} of {len(paths)} bags cannot be used")
    assert all(str(folder / f"{name}.h5") in message for name in expected)
    assert "re-extract" in message and "--min-tissue" in message
    assert not (folder / "run").exists()  # refused before any fold, nothing written


def test_cli_train_names_every_bad_bag(mixed_bags):
    folder, expected = mixed_bags
    args = ["train", str(folder), "--labels", str(folder / "labels.csv"), "--out", str(folder / "run")]
    result = CliRunner().invoke(app, [*args, "--epochs", "1", "--device", "cpu"], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and "fold 0" not in result.output
    assert all(f"{name}.h5 ({reason}" in result.output for name, reason in expected.items()), result.output


def test_training_set_with_one_class_left_is_refused(tmp_path):
    rows = ["slide_id,patient_id,label"]
    for i in range(4):
        _bag(tmp_path, f"s{i}", seed=i)
        rows.append(f"s{i},p{i},normal")
    rows.append("gone,p9,tumor")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    table, paths, _ = match_bags(read_labels(tmp_path / "labels.csv"), find_bags(tmp_path), skip_missing=True)
    with pytest.raises(DataError, match="all have label 'normal'; training needs at least 2 classes"):
        run_cv(
            TrainConfig(model="mean-pool", epochs=1, folds=2, device="cpu"), table, paths, 8, tmp_path / "run"
        )
