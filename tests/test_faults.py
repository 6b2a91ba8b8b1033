"""Faults: SIGKILL at random points of tile / extract / train, a full disk, a slide file that goes away
mid-run and a tile-reading worker that dies. Each time nothing partial is counted as done, the rest of
the run is kept, and a rerun ends with the outputs of an uninterrupted run.

Kills land at a random count of written files (plus a random delay), drawn from a seeded RNG, so each
seed interrupts a different place; the first seed of each stage runs in ``make test``, the rest are slow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from wsikit.bags import Bag, read_bag, write_bag
from wsikit.cli.main import app
from wsikit.grids import read_grid, write_grid
from wsikit.jobs import BatchSummary, read_status, resolve_slides
from wsikit.settings import load_pipeline_config
from wsikit.stages.extract import run_extraction, stage_name
from wsikit.stages.tile import run_tiling

WSIKIT = [sys.executable, "-m", "wsikit.cli.main"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
CONFIG = {
    "tile": {"specs": ["1.0/128/0", "2.0/128/0"], "min_tissue": 0.25},
    "extract": {"encoder": "efficientnet-lite0", "batch_size": 4, "workers": 0},
}
EXTRACT = stage_name("efficientnet-lite0")
TIMEOUT = 180  # s: no fault may turn into a hang

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _seeds(n: int) -> list:
    """Seeds 0..n-1; all but the first are slow."""
    return [0, *(pytest.param(s, marks=pytest.mark.slow) for s in range(1, n))]


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fault_cfg") / "pipeline.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture(scope="module")
def tiled(tmp_path_factory, small_slides, config_file) -> Path:
    """An uninterrupted tiling of the four slides."""
    job = tmp_path_factory.mktemp("fault_tiled") / "job"
    summary = run_tiling(resolve_slides(small_slides), job, load_pipeline_config(config_file).tile)
    assert len(summary.done) == 4
    return job


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiled, config_file) -> Path:
    """An uninterrupted extraction of the tiled job (one torch thread, like the CLI runs here)."""
    job = _copy_job(tiled, tmp_path_factory.mktemp("fault_extracted"))
    assert len(_extract_here(job, config_file).done) == 4
    return job


# -- helpers -------------------------------------------------------------------------------------------
def _copy_job(job: Path, dest: Path) -> Path:
    return Path(shutil.copytree(job, dest / "job", dirs_exist_ok=True))


def _wsikit_here(args: list) -> None:
    """Run the CLI in this process (no start-up cost) and check that it succeeded."""
    result = CliRunner().invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output


def _wsikit(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*WSIKIT, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=TIMEOUT, **kw
    )


def _extract_args(job: Path, config_file: Path, *extra: str) -> list:
    return ["extract", job, "--config", config_file, *extra]


def _extract_here(job: Path, config_file: Path, **kw) -> BatchSummary:
    """Extract in this process with one torch thread, as the CLI runs here do."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        return run_extraction(job, load_pipeline_config(config_file).extract, **kw)


def _written(root: Path) -> set[tuple[Path, int]]:
    """(path, mtime) of every finished (non-hidden) file under ``root``."""
    found = set()
    for p in root.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
                found.add((p, p.stat().st_mtime_ns))
    return found


def _kill_at_random(args: list, watch: Path, seed: int, events: tuple[int, int], delay: float) -> int:
    """Run wsikit and SIGKILL it once a random number (in ``events``) of file writes under ``watch``
    were seen, after a further random delay (≤ ``delay`` s); returns how many writes were seen."""
    rng = np.random.default_rng(seed)
    target, wait = int(rng.integers(*events)), float(rng.uniform(0, delay))
    before = _written(watch) if watch.is_dir() else set()
    proc = subprocess.Popen(
        [*WSIKIT, *map(str, args)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    seen: set[tuple[Path, int]] = set()
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and len(seen) < target and time.monotonic() < deadline:
        if watch.is_dir():
            seen |= _written(watch) - before
        time.sleep(0.005)
    time.sleep(wait)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"wsikit ended before the kill ({len(seen)} writes seen)"
    return len(seen)


def _hidden(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.name.endswith(".tmp")]


def _assert_nothing_partial(job: Path, stage: str, ids: list[str], ref: Path) -> None:
    """Every finished HDF5 file equals the uninterrupted run's; a slide recorded done has its outputs."""
    for p in job.rglob("*.h5"):
        if not p.name.startswith("."):
            with h5py.File(p, "r") as got, h5py.File(ref / p.relative_to(job), "r") as want:
                for name in {"coords", "features", "tissue_fraction"} & set(want):
                    assert np.array_equal(got[name][:], want[name][:]), (p, name)
    for slide_id in ids:
        status = read_status(job, stage, slide_id)
        if status is not None and status.state == "done":
            assert all(Path(o).exists() for o in status.outputs), slide_id


def _bags(job: Path) -> dict[str, Bag]:
    return {p.relative_to(job).as_posix(): read_bag(p) for p in sorted((job / "bags").rglob("*.h5"))}


def _assert_same_bags(ref: Path, got: Path) -> None:
    a, b = _bags(ref), _bags(got)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key].coords, b[key].coords, err_msg=key)
        assert np.array_equal(a[key].features, b[key].features), key  # bit-equal
        for name, feats in a[key].context.items():
            assert np.array_equal(feats, b[key].context[name]), (key, name)


# -- SIGKILL at random points --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", _seeds(3))
def test_sigkill_tile_then_rerun_equals_uninterrupted(tmp_path, seed, small_slides, config_file, tiled):
    job = tmp_path / "job"
    args = ["tile", *small_slides, "--out", job, "--config", config_file]
    # per slide: mask, two grids, QC picture, status record (20 writes in all)
    seen = _kill_at_random(args, job, seed, (1, 13), 0.1)
    ids = [s.stem for s in small_slides]
    _assert_nothing_partial(job, "tile", ids, tiled)
    assert sum(getattr(read_status(job, "tile", i), "state", None) == "done" for i in ids) < 4, seen
    _wsikit_here(args)
    assert not _hidden(job)
    for p in sorted((tiled / "tiles").rglob("*.h5")):
        np.testing.assert_array_equal(read_grid(p).coords, read_grid(job / p.relative_to(tiled)).coords)


@pytest.mark.parametrize("seed", _seeds(3))
def test_sigkill_extract_then_rerun_equals_uninterrupted(tmp_path, seed, tiled, extracted, config_file):
    job = _copy_job(tiled, tmp_path)
    # per slide: two bags, their multi-scale join, the status record (16 writes in all)
    _kill_at_random(_extract_args(job, config_file), job, seed, (1, 11), 0.5)
    ids = [f"s{i}" for i in range(4)]
    _assert_nothing_partial(job, EXTRACT, ids, extracted)
    assert _extract_here(job, config_file).ok
    assert all(read_status(job, EXTRACT, i).state == "done" for i in ids)
    assert not _hidden(job)  # temporary files of the killed run were cleared when the slide was redone
    _assert_same_bags(extracted, job)


# -- training ------------------------------------------------------------------------------------------
TRAIN_OUTPUTS = ("report.json", "predictions_oof.csv", *(f"fold_{k}/result.json" for k in range(3)))


@pytest.fixture(scope="module")
def bag_dir(tmp_path_factory) -> Path:
    """18 synthetic bags of 9 patients (a planted signal in positives) and their labels."""
    root = tmp_path_factory.mktemp("fault_bags")
    rng = np.random.default_rng(0)
    rows = ["slide_id,patient_id,label"]
    for i in range(18):
        n = int(rng.integers(40, 120))
        feats = rng.normal(size=(n, 16)).astype(np.float32)
        feats[:3, 0] += 2.0 * (i % 2)
        coords = np.stack([np.arange(n) * 256, np.zeros(n)], axis=1).astype(np.int64)
        write_bag(root / f"b{i:02d}.h5", Bag(feats, coords, {"encoder": "toy"}, {"patch_size_level0": 256}))
        rows.append(f"b{i:02d},p{i // 2},{'tumor' if i % 2 else 'normal'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _train_args(bags: Path, out: Path) -> list:
    return ["train", bags, "--labels", bags / "labels.csv", "--out", out, "--model", "abmil", "--folds", "3",
            "--epochs", "8", "--min-epochs", "8", "--device", "cpu", "--bootstrap", "0", "--threads", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bag_dir) -> Path:
    """An uninterrupted 3-fold training run."""
    out = tmp_path_factory.mktemp("fault_trained") / "run"
    _wsikit_here(_train_args(bag_dir, out))
    return out


def _assert_same_run(ref: Path, got: Path) -> None:
    for name in TRAIN_OUTPUTS:
        assert (ref / name).read_bytes() == (got / name).read_bytes(), name


@pytest.mark.parametrize("seed", _seeds(3))
def test_sigkill_train_then_resume_equals_uninterrupted(tmp_path, seed, bag_dir, trained):
    out = tmp_path / "run"
    # per fold: last.pt every epoch, best.pt when better, result, predictions, reports, pictures
    _kill_at_random(_train_args(bag_dir, out), out, seed, (2, 20), 0.2)
    assert not (out / "report.json").exists()
    _wsikit_here(_train_args(bag_dir, out))
    _assert_same_run(trained, out)


def test_kill_between_fold_result_and_its_report_resumes(tmp_path, bag_dir, trained):
    """A fold whose result.json was written but not its predictions and report is evaluated again."""
    out = Path(shutil.copytree(trained, tmp_path / "run"))
    for name in ("report.json", "predictions_oof.csv", "fold_1/report.json", "fold_1/predictions_val.csv"):
        (out / name).unlink()
    _wsikit_here(_train_args(bag_dir, out))
    _assert_same_run(trained, out)
    assert (out / "fold_1" / "predictions_val.csv").read_bytes() == (
        trained / "fold_1" / "predictions_val.csv"
    ).read_bytes()


# -- a full disk ---------------------------------------------------------------------------------------
def test_disk_full_while_writing_a_bag_fails_the_slide_cleanly(tmp_path, tiled, extracted, config_file):
    """A file-size limit between the single-spec bags' size and the larger multi-scale bags' makes every
    slide's third bag fail to write (EFBIG, as on a full disk); SIGXFSZ is ignored as Python does."""
    sizes = {
        p.relative_to(extracted).as_posix(): p.stat().st_size for p in (extracted / "bags").rglob("*.h5")
    }
    single = max(n for k, n in sizes.items() if "+" not in k)
    joined = min(n for k, n in sizes.items() if "+" in k)
    assert single < joined

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ((single + joined) // 2, resource.RLIM_INFINITY))

    job = _copy_job(tiled, tmp_path)
    result = _wsikit(_extract_args(job, config_file), preexec_fn=limit_file_size)
    assert result.returncode == 1, result.stderr  # slides failed, the run itself did not crash
    for i in range(4):
        status = read_status(job, EXTRACT, f"s{i}")
        assert status.state == "failed" and "File too large" in status.error and "disk" in status.error
    assert not _hidden(job)  # the temporary files were removed
    ref, got = _bags(extracted), _bags(job)
    assert set(got) == {k for k in ref if "+" not in k}  # the bags that fitted, complete
    for key, bag in got.items():
        assert np.array_equal(bag.features, ref[key].features), key
    assert len(_extract_here(job, config_file, retry_failed=True).done) == 4  # the limit lifted
    _assert_same_bags(extracted, job)


def test_disk_full_while_writing_a_zarr_bag_fails_the_slide_cleanly(tmp_path, tiled, config_file):
    """A Zarr bag is a folder of chunk files: a file-size limit below one feature chunk fails each slide
    with the same one-line disk error, leaves no temporary folder, and a rerun without it completes."""

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))

    job = _copy_job(tiled, tmp_path)
    result = _wsikit(_extract_args(job, config_file, "--format", "zarr"), preexec_fn=limit_file_size)
    assert result.returncode == 1, result.stderr
    for i in range(4):
        error = read_status(job, EXTRACT, f"s{i}").error
        assert "could not write a bag there (File too large): is the disk full" in error, error
    assert not _hidden(job) and not list((job / "bags").rglob("*.zarr"))
    cfg = dataclasses.replace(load_pipeline_config(config_file).extract, fmt="zarr")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        summary = run_extraction(job, cfg, retry_failed=True)
    assert len(summary.done) == 4 and len(list((job / "bags").rglob("*.zarr"))) == 12


def test_disk_full_while_writing_a_status_record_stops_with_one_line(
    tmp_path, tiled, config_file, monkeypatch
):
    """The disk fills just as slide s1's status record is written: the command stops with a one-line error
    naming the record (no traceback), s0 stays done, s1 is not counted done, and a rerun finishes."""
    import errno

    import wsikit.jobs

    job = _copy_job(tiled, tmp_path)
    write = wsikit.jobs.write_status

    def full_disk(job_dir, status):
        if status.slide_id == "s1":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(job_dir, status)

    monkeypatch.setattr(wsikit.jobs, "write_status", full_disk)
    monkeypatch.setenv("COLUMNS", "400")
    result = CliRunner().invoke(app, list(map(str, _extract_args(job, config_file))))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit | None)
    message = " ".join(result.output.split())
    assert "cannot write the status record (No space left on device); free disk space" in message
    assert "s1.json" in message and "Traceback" not in result.output
    assert read_status(job, EXTRACT, "s0").state == "done" and read_status(job, EXTRACT, "s1") is None
    monkeypatch.setattr(wsikit.jobs, "write_status", write)
    assert [s.slide_id for s in _extract_here(job, config_file).done] == ["s1", "s2", "s3"]


# -- a slide file that goes away mid-run ---------------------------------------------------------------
def _own_slides(job: Path, slides: list[Path], folder: Path) -> dict[str, Path]:
    """Copies of the slides, with the job's grids pointed at them."""
    folder.mkdir()
    copies = {s.stem: Path(shutil.copy(s, folder / s.name)) for s in slides}
    for path in (job / "tiles").rglob("*.h5"):
        grid = read_grid(path)
        grid.attrs["slide_path"] = str(copies[grid.slide_id])
        write_grid(path, grid)
    return copies


@pytest.mark.parametrize("fault", ["truncate", pytest.param("delete", marks=pytest.mark.slow)])
def test_slide_file_lost_mid_extraction_fails_and_run_goes_on(
    tmp_path, fault, small_slides, tiled, extracted, config_file
):
    job = _copy_job(tiled, tmp_path)
    copies = _own_slides(job, small_slides, tmp_path / "slides")
    victim = copies["s1"]
    backup = shutil.copy(victim, tmp_path / "backup.svs")
    current: list[str] = []

    def on_tiles(n: int) -> None:  # after the victim's first batch
        if current[-1] == "s1" and victim.exists():
            victim.unlink() if fault == "delete" else os.truncate(victim, victim.stat().st_size // 3)

    summary = _extract_here(
        job, config_file, on_start=lambda e: current.append(e.slide_id), on_tiles=on_tiles
    )
    assert [s.slide_id for s in summary.done] == ["s0", "s2", "s3"]
    status = read_status(job, EXTRACT, "s1")
    assert status.state == "failed" and f"{victim}: the slide file" in status.error
    assert not any(p.stem == "s1" for p in (job / "bags").rglob("*.h5"))
    assert not _hidden(job)
    shutil.copy(backup, victim)
    assert [s.slide_id for s in _extract_here(job, config_file, retry_failed=True).done] == ["s1"]
    _assert_same_bags(extracted, job)


# -- a tile-reading worker that dies -------------------------------------------------------------------
CRASHING_WORKER = """
import os, signal, sys, time
import torch.utils.data
from wsikit.cli.main import main
from wsikit.tiles import TileItems

read = TileItems.__getitem__


def crashing(self, i):
    if torch.utils.data.get_worker_info() and self.source.slide.slide_id == "s1" and i == 2:
        {crash}
    return read(self, i)


TileItems.__getitem__ = crashing
sys.argv[0] = "wsikit"
main()
"""


@pytest.mark.parametrize(
    ("crash", "error"),
    [
        ("os._exit(3)", "a tile-reading worker died"),
        pytest.param(
            "os.kill(os.getpid(), signal.SIGKILL)", "a tile-reading worker died", marks=pytest.mark.slow
        ),
        ("time.sleep(3600)", "no tiles from the reading workers for 3 s"),  # a stalled network read
    ],
    ids=["exit", "sigkill", "hang"],
)
def test_dead_or_stalled_reader_worker_fails_the_slide_and_run_goes_on(
    tmp_path, crash, error, tiled, extracted, config_file
):
    job = _copy_job(tiled, tmp_path)
    script = tmp_path / "crashing_worker.py"
    script.write_text(CRASHING_WORKER.replace("{crash}", crash))
    args = _extract_args(job, config_file, "--workers", "1", "--read-timeout", "3")
    result = subprocess.run(
        [sys.executable, script, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=TIMEOUT
    )
    assert result.returncode == 1, result.stderr
    status = read_status(job, EXTRACT, "s1")
    assert status.state == "failed" and error in status.error, status.error
    assert all(read_status(job, EXTRACT, i).state == "done" for i in ("s0", "s2", "s3"))
    assert not any(p.stem == "s1" for p in (job / "bags").rglob("*.h5")) and not _hidden(job)
    ref = _bags(extracted)
    for key, bag in _bags(job).items():
        assert np.array_equal(bag.features, ref[key].features), key
