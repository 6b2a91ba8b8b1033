"""A 2-task SLURM job array (a real one-node cluster on localhost) tiles and extracts 4 slides.

Needs root and Debian's slurmctld/slurmd/munge (``tests/slurm/localhost-cluster.sh install``; CI does
it). Skipped, saying why, where they are missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from wsikit.jobs import read_status
from wsikit.pyramid import write_pyramid

CLUSTER = Path(__file__).parent / "slurm" / "localhost-cluster.sh"
STAGES = ("tile", "extract-efficientnet-lite0")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the localhost SLURM cluster runs its daemons as root"
    for tool in ("slurmctld", "slurmd", "sbatch", "munged", "mungekey"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (run tests/slurm/localhost-cluster.sh install)"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = _missing()
    if why:
        pytest.skip(why)
    state = tmp_path_factory.mktemp("slurm")
    t0 = time.perf_counter()
    started = subprocess.run(
        ["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True, timeout=90
    )
    if started.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True, timeout=60)
        pytest.fail(f"localhost SLURM did not start: {started.stderr or started.stdout}")
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    yield env, time.perf_counter() - t0
    subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True, timeout=60)


def test_slurm_array_tiles_and_extracts_each_slide_once(cluster, tmp_path, sample_rgb):
    env, start_seconds = cluster
    slides = tmp_path / "slides"
    slides.mkdir()
    for i, (x, y) in enumerate([(600, 0), (600, 800), (600, 1600), (800, 1900)]):
        write_pyramid(slides / f"slide{i}.svs", sample_rgb[y : y + 1024, x : x + 1024], 0.499, n_levels=2)
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "tile": {"specs": ["1.0/128/0", "2.0/128/0"], "min_tissue": 0.25},
                "extract": {"encoder": "efficientnet-lite0", "batch_size": 8, "workers": 0},
            }
        )
    )
    job = tmp_path / "job"
    wsikit = [sys.executable, "-m", "wsikit.cli.main"]
    made = subprocess.run(
        [*wsikit, "slurm", str(config), str(slides), "--out", str(job), "--tasks", "2", "--cpus", "1", "--mem", "2G",
         "--time", "00:10:00"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    script = job / "wsikit-array.sh"
    text = script.read_text()
    assert "#SBATCH --array=0-1" in text and " run " in text
    t0 = time.perf_counter()
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--export=ALL,HF_HUB_OFFLINE=1,OMP_NUM_THREADS=1,COLUMNS=200", str(script)],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    array_seconds = time.perf_counter() - t0
    logs = sorted((job / "logs").glob("*.out"))
    log_text = [p.read_text() for p in logs]
    assert submitted.returncode == 0, (submitted.stderr, log_text)
    assert len(logs) == 2
    for i in range(4):
        sid = f"slide{i}"
        for stage in STAGES:
            assert read_status(job, stage, sid).state == "done", (sid, stage)
        # done (tile and extract rows) in exactly one task's log: no slide processed by both tasks
        rows = [len(re.findall(rf"│ {sid}\s+│ done", t)) for t in log_text]
        assert sorted(rows) == [0, 2], (sid, rows)
    # both tasks worked (round-robin shards of 2 slides each)
    assert all("shard " in t for t in log_text)
    report = json.loads(
        subprocess.run(
            [*wsikit, "status", str(job), "--json"], capture_output=True, text=True, env=env
        ).stdout
    )
    for stage in STAGES:
        assert report["stages"][stage] | {"warnings": {}} == {
            "done": 4, "failed": 0, "running": 0, "pending": 0, "warnings": {}, "failures": {}
        }  # fmt: skip
    print(f"\nlocalhost SLURM start {start_seconds:.1f} s; 2-task array over 4 slides {array_seconds:.1f} s")
