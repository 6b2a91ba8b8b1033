"""Issue 19 #6, #8, #9: reruns do what the error said; one job, one set of settings; no stale outputs.

Comments say what each test found before the fix (FAIL before) or guards (passed before too).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from wsikit.bags import bag_path, read_bag
from wsikit.cli.main import app
from wsikit.encoders.build import get_encoder
from wsikit.grids import read_grid
from wsikit.jobs import JobError, SlideEntry, read_status, resolve_slides
from wsikit.locks import acquire_lock, release_lock
from wsikit.settings import ExtractConfig, TileConfig
from wsikit.specs import TileSpec
from wsikit.stages.extract import job_slides, resolve_specs, run_extraction
from wsikit.stages.tile import run_tiling

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def encoder():
    return dataclasses.replace(get_encoder("resnet18", pretrained=False), input_size=112)


# -- #6 --------------------------------------------------------------------------------------------------
def test_failed_slide_is_retried_when_the_fix_is_given(tmp_path, pyramids):  # FAIL before: skipped
    entry = SlideEntry(pyramids["no_mpp"], "nompp")
    cfg = TileConfig((TileSpec(0.5, 256),))
    first = run_tiling([entry], tmp_path / "job", cfg)
    assert [s.slide_id for s in first.failed] == ["nompp"] and "--slide-mpp" in first.failed[0].error
    again = run_tiling([dataclasses.replace(entry, mpp=0.499)], tmp_path / "job", cfg)
    assert [s.slide_id for s in again.done] == ["nompp"], "the MPP the error asked for must be used"
    assert read_status(tmp_path / "job", "tile", "nompp").state == "done"


def test_failed_slide_with_unchanged_settings_is_still_skipped(tmp_path, pyramids):  # guard
    entry = SlideEntry(pyramids["no_mpp"], "nompp")
    cfg = TileConfig((TileSpec(0.5, 256),))
    run_tiling([entry], tmp_path / "job", cfg)
    assert run_tiling([entry], tmp_path / "job", cfg).skipped == ["nompp"]


def test_cli_lists_skipped_slides_and_says_why(tmp_path, pyramids):  # FAIL before: empty table
    args = ["tile", str(pyramids["svs"]), "--out", str(tmp_path / "job")]
    assert CliRunner().invoke(app, args).exit_code == 0
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0
    assert "cmu_svs" in res.output and "skipped" in res.output  # the slide's row, not only a count


# -- #8 --------------------------------------------------------------------------------------------------
def test_second_run_with_other_settings_is_refused(tmp_path, small_slides):  # FAIL before: mixes settings
    entries = resolve_slides(small_slides)
    run_tiling(entries[:2], tmp_path / "job", TileConfig((TileSpec(0.5, 256),), min_tissue=0.5))
    with pytest.raises(JobError, match=r"min_tissue 0\.5 → 0\.1.*--overwrite"):
        run_tiling(entries, tmp_path / "job", TileConfig((TileSpec(0.5, 256),), min_tissue=0.1))
    keys = {read_status(tmp_path / "job", "tile", e.slide_id).info["settings"] for e in entries[:2]}
    assert len(keys) == 1
    assert not read_status(tmp_path / "job", "tile", entries[2].slide_id)


def test_overwrite_is_refused_while_another_process_works(tmp_path, small_slides):
    entries = resolve_slides(small_slides[:1])
    job = tmp_path / "job"
    run_tiling(entries, job, TileConfig((TileSpec(0.5, 256),), min_tissue=0.5))
    # a live process (this one) is tiling a slide of the job
    held = acquire_lock(job, "tile", "other")
    try:
        with pytest.raises(JobError, match=r"another process"):
            run_tiling(entries, job, TileConfig((TileSpec(0.5, 256),), min_tissue=0.1), overwrite=True)
    finally:
        release_lock(held)  # type: ignore[arg-type]


def test_overwrite_replaces_the_jobs_settings(tmp_path, small_slides):  # guard: --overwrite still works
    entries = resolve_slides(small_slides)
    run_tiling(entries, tmp_path / "job", TileConfig((TileSpec(0.5, 256),), min_tissue=0.5))
    s = run_tiling(
        entries, tmp_path / "job", TileConfig((TileSpec(0.5, 256),), min_tissue=0.1), overwrite=True
    )
    assert len(s.done) == len(entries)
    keys = {read_status(tmp_path / "job", "tile", e.slide_id).info["settings"] for e in entries}
    assert len(keys) == 1


@pytest.mark.slow
def test_two_concurrent_runs_with_other_settings(tmp_path, small_slides):  # FAIL before: both exit 0, mixed
    cmd = [
        sys.executable,
        "-m",
        "wsikit.cli.main",
        "tile",
        *map(str, small_slides),
        "--out",
        str(tmp_path / "job"),
    ]
    procs = [
        subprocess.Popen(
            [*cmd, "--min-tissue", v], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for v in ("0.5", "0.1")
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    keys = {
        read_status(tmp_path / "job", "tile", p.stem).info["settings"]
        for p in small_slides
        if read_status(tmp_path / "job", "tile", p.stem)
    }
    assert len(keys) == 1, "a job holds one set of tile settings"
    assert codes == [0, 0] or (codes[0] == 0 and codes[1] != 0 and any("settings" in o for o in outs))


# -- #9 --------------------------------------------------------------------------------------------------
def test_retiled_spec_is_not_extracted_silently(tmp_path, small_slides):  # FAIL before: old spec encoded
    from wsikit.grids import tiled_specs

    entries = resolve_slides(small_slides[:1])
    job = tmp_path / "job"
    run_tiling(entries, job, TileConfig((TileSpec(0.5, 256),)))
    # another --tile-size (the job's settings change: --overwrite); the 256 grid is stale
    run_tiling(entries, job, TileConfig((TileSpec(0.5, 224),)), overwrite=True)
    assert resolve_specs(job, ()) == ["mpp0.50_224px_0ov"]
    assert tiled_specs(job) == (["mpp0.50_224px_0ov"], {"mpp0.50_256px_0ov": ["s0"]})
    assert not job_slides(job, ["mpp0.50_256px_0ov"])  # asked for by name: no slide's tiling has it now
    res = CliRunner().invoke(
        app, ["extract", str(job), "--encoder", "resnet18", "--random-weights", "-j", "0"]
    )
    assert "mpp0.50_256px_0ov" in res.output and "stale" in res.output, res.output


def test_retiled_grid_redoes_the_bag(tmp_path, small_slides, encoder):  # FAIL before: stale bag kept
    entries = resolve_slides(small_slides[:1])
    job, sid = tmp_path / "job", entries[0].slide_id
    spec = TileSpec(0.5, 256)
    run_tiling(entries, job, TileConfig((spec,), min_tissue=0.9))
    cfg = ExtractConfig("resnet18", pretrained=False, workers=0)
    run_extraction(job, cfg, encoder=encoder)
    assert run_extraction(job, cfg, encoder=encoder).skipped == [sid]  # resume: nothing changed
    run_tiling(entries, job, TileConfig((spec,), min_tissue=0.05), overwrite=True)  # same spec, other grid
    summary = run_extraction(job, cfg, encoder=encoder)
    assert [s.slide_id for s in summary.done] == [sid]
    grid = read_grid(job / "tiles" / spec.name / f"{sid}.h5")
    assert len(read_bag(bag_path(job, spec.name, "resnet18", sid))) == len(grid)
