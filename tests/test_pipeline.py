"""`wsikit run`: configs, the chained pipeline, resume after SIGKILL, and concurrent processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from wsikit.bags import read_bag
from wsikit.cli.main import app
from wsikit.config import ConfigError
from wsikit.jobs import read_status
from wsikit.settings import load_pipeline_config

REPO = Path(__file__).resolve().parents[1]
WSIKIT = [sys.executable, "-m", "wsikit.cli.main"]
CONFIG = {
    "tile": {"specs": ["1.0/128/0", "2.0/128/0"], "min_tissue": 0.25},
    "extract": {"encoder": "efficientnet-lite0", "batch_size": 4, "workers": 0},
}


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "pipeline.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def test_shipped_configs_validate():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if yaml.safe_load(path.read_text()).get("tile"):
            cfg = load_pipeline_config(path)
            assert cfg.tile.specs


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"tile": {"specs": ["20x"]}, "extrct": {}}, r"unknown section\(s\) extrct; allowed: .*extract"),
        (
            {"tile": {"specs": ["20x"], "mask": {"mpp": 8, "otsu": 1}}},
            r"tile\.mask: unknown key\(s\) otsu; allowed: method",
        ),
        ({"tile": {"specs": [{"mpp": "fine"}]}}, r"tile\.specs\[0\]\.mpp: Input should be a valid number"),
        ({"tile": {"specs": ["20y/256"]}}, r"tile\.specs\[0\]: tile spec '20y/256'"),
        ({"tile": {"specs": ["20x"]}, "extract": {"batch_size": "many"}}, r"extract\.batch_size"),
        ({"extract": {}}, "needs a 'tile' section"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, data, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=match):
        load_pipeline_config(path)


def test_bad_yaml_and_cli_config_show(tmp_path, config_file):
    bad = tmp_path / "broken.yaml"
    bad.write_text("tile:\n  specs: [20x\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_pipeline_config(bad)
    result = CliRunner().invoke(app, ["config", "show", str(config_file)])
    assert (
        result.exit_code == 0
        and "efficientnet-lite0" in result.stdout
        and "min_tissue: 0.25" in result.stdout
    )


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(WSIKIT + args, capture_output=True, text=True, env=env, timeout=300, **kw)


def _bags(job: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(job).as_posix(): read_bag(p).features for p in sorted((job / "bags").rglob("*.h5"))}


@pytest.fixture(scope="module")
def reference_job(tmp_path_factory, small_slides, config_file) -> Path:
    """An uninterrupted run over the four slides."""
    job = tmp_path_factory.mktemp("ref")
    result = _run(["run", str(config_file), *map(str, small_slides), "--out", str(job)])
    assert result.returncode == 0, result.stderr
    return job


def test_run_writes_every_stage_and_resumes(reference_job, small_slides, config_file):
    for s in small_slides:
        assert read_status(reference_job, "tile", s.stem).state == "done"
        assert read_status(reference_job, "extract-efficientnet-lite0", s.stem).state == "done"
    bags = _bags(reference_job)
    assert len(bags) == 4 * 3  # two specs and their multi-scale join
    assert list((reference_job / "configs").glob("run-*.yaml"))
    again = _run(["run", str(config_file), *map(str, small_slides), "--out", str(reference_job)])
    assert again.returncode == 0 and "4 skipped" in again.stderr


def test_sigkill_mid_extraction_then_rerun_equals_uninterrupted(
    tmp_path, reference_job, small_slides, config_file
):
    job = tmp_path / "job"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*WSIKIT, "run", str(config_file), *map(str, small_slides), "--out", str(job)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lock_dir = job / "locks" / "extract-efficientnet-lite0"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock_dir.is_dir() and any(lock_dir.glob("*.lock"))):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before extraction started"
    killed_slide = next(lock_dir.glob("*.lock")).stem
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    status = read_status(job, "extract-efficientnet-lite0", killed_slide)
    assert status is None or status.state != "done"  # nothing partial counted as done
    assert not any(p.stem == killed_slide for p in (job / "bags").rglob("*.h5") if not p.name.startswith("."))
    result = _run(["run", str(config_file), *map(str, small_slides), "--out", str(job)])
    assert result.returncode == 0, result.stderr
    ref, got = _bags(reference_job), _bags(job)
    assert ref.keys() == got.keys()
    for key in ref:
        assert np.array_equal(ref[key], got[key]), key


def test_two_concurrent_processes_do_each_slide_once(tmp_path, small_slides, config_file):
    job = tmp_path / "job"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    cmd = [*WSIKIT, "run", str(config_file), *map(str, small_slides), "--out", str(job)]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    for s in small_slides:
        assert read_status(job, "extract-efficientnet-lite0", s.stem).state == "done"
        # its tile row and its extract row are "done" in exactly one process's summary tables
        rows = [len(re.findall(rf"│ {s.stem}\s+│ done", out)) for out, _ in outputs]
        assert sorted(rows) == [0, 2], (s.stem, rows)
    report = json.loads(_run(["status", str(job), "--json"]).stdout)
    assert (
        report["stages"]["tile"]["done"] == 4 and report["stages"]["extract-efficientnet-lite0"]["done"] == 4
    )


def test_coarse_grid_without_tiles_still_joins(tmp_path, small_slides):
    """A coarse spec larger than the slide keeps no tile; the fine bag's context is then all missing (-1)."""
    config = tmp_path / "coarse.yaml"
    config.write_text(
        yaml.safe_dump({**CONFIG, "tile": {"specs": ["2.0/128/0", "4.0/128/0"], "min_tissue": 0.25}})
    )
    job = tmp_path / "job"
    result = _run(["run", str(config), str(small_slides[0]), "--out", str(job)])
    assert result.returncode == 0, result.stderr
    joined = read_bag(next((job / "bags").glob("mpp2.00_128px_0ov+mpp4.00_128px_0ov/*/s0.h5")))
    assert len(joined) > 0 and (joined.context_index["mpp4.00_128px_0ov"] == -1).all()


def test_demo_pipeline_writes_its_pictures(tmp_path):
    from wsikit.demo import run_demo

    result = run_demo(tmp_path, labelled=False)
    for name in ("thumbnail", "tissue QC", "tissue GeoJSON", "feature bag", "feature map"):
        assert result.written[name].exists(), name
    assert result.numbers["tiles"] > 20
    assert result.facts["mpp"] == [0.499, 0.499]


def test_tile_and_extract_take_config_with_command_line_overrides(tmp_path, small_slides):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                # min_side_px 0: the 0.5 mm slide keeps the file's working resolution (not a finer one)
                "tile": {"specs": ["1.0/128/0"], "min_tissue": 0.9, "mask": {"mpp": 16.0, "min_side_px": 0}},
                "extract": {
                    "encoder": "efficientnet-lite0",
                    "batch_size": 2,
                    "workers": 0,
                    "multiscale": False,
                },
            }
        )
    )
    job = tmp_path / "job"
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["tile", str(small_slides[1]), "--out", str(job), "--config", str(config), "--min-tissue", "0.25"],
    )
    assert result.exit_code == 0, result.output
    from wsikit.grids import read_grid

    grid = read_grid(job / "tiles" / "mpp1.00_128px_0ov" / "s1.h5")  # the file's spec
    assert grid.attrs["min_tissue"] == 0.25  # the command-line option won over the file
    assert abs(grid.attrs["mask_mpp"] - 16.0) < 0.1  # the file's value where no option was given
    status = read_status(job, "tile", "s1")
    assert status.state == "done"
    result = runner.invoke(app, ["extract", str(job), "--config", str(config), "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    assert "batch 3" in result.output and "efficientnet-lite0" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tile": {"specs": ["1.0/128"], "min_tisue": 0.5}}))
    result = runner.invoke(app, ["tile", str(small_slides[1]), "--out", str(job), "--config", str(bad)])
    assert result.exit_code == 2 and "unknown key(s) min_tisue" in result.output


def test_patch_recipes_validate_and_drive_patches_train(tmp_path):
    for recipe in ("pneumoniamnist-resnet18.yaml", "chest-xray-efficientnet-lite0.yaml"):
        result = CliRunner().invoke(app, ["config", "show", str(REPO / "configs" / recipe)])
        assert result.exit_code == 0 and "train:" in result.stdout, result.output
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 48), ("val", 24), ("test", 24)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 120, (n, 28, 28), dtype=np.uint8)
        images[labels == 1, 8:20, 8:20] = 230  # a bright square marks class 1
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez(tmp_path / "tiny.npz", **arrays)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["patches", "train", str(tmp_path / "tiny.npz"), "--out", str(out), "--device", "cpu",
         "--config", str(REPO / "configs" / "pneumoniamnist-resnet18.yaml"), "--epochs", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    history = json.loads((out / "history.json").read_text())
    assert len(history["history"]) == 1  # --epochs 1 won over the recipe's 12
    ckpt = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    assert "resnet18" in json.dumps(ckpt, default=str)  # the recipe's encoder


def test_mil_train_reads_the_mil_section(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"mil": {"model": "abmil", "fold": 3}}))
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,patient_id,label\n")
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(tmp_path),
            "--labels",
            str(labels),
            "--out",
            str(tmp_path / "run"),
            "--config",
            str(bad),
        ],
    )
    assert result.exit_code == 2 and "mil: unknown key(s) fold; allowed: model" in result.output
