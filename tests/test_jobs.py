"""Job-directory mechanics: atomic writes, slide lists, shards, locks and the per-slide batch loop."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from wsikit.io import atomic_path, write_json
from wsikit.jobs import (
    JobError,
    SlideEntry,
    StageResult,
    parse_shard,
    read_status,
    resolve_slides,
    run_batch,
    scheduler_shard,
    select_shard,
)
from wsikit.locks import acquire_lock, release_lock


def test_atomic_path_renames_only_on_success(tmp_path):
    dest = tmp_path / "out.json"
    write_json(dest, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(dest.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left


def test_atomic_path_replaces_directories(tmp_path):
    dest = tmp_path / "bag.zarr"
    for n in (1, 2):
        with atomic_path(dest) as tmp:
            tmp.mkdir()
            (tmp / "v").write_text(str(n))
    assert (dest / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bag.zarr"]


def test_resolve_slides_files_folders_globs_and_tables(tmp_path):
    for name in ("a.svs", "b.tiff", "notes.txt", ".hidden.svs"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.ndpi").write_bytes(b"x")
    assert [e.slide_id for e in resolve_slides([tmp_path])] == ["a", "b"]
    assert [e.slide_id for e in resolve_slides([tmp_path], recursive=True)] == ["a", "b", "c"]
    assert [e.slide_id for e in resolve_slides([str(tmp_path / "*.svs")])] == ["a"]
    table = tmp_path / "slides.csv"
    table.write_text("path,slide_id,mpp,patient_id,label\na.svs,A1,0.25,P1,tumour\nsub/c.ndpi,,,P2,normal\n")
    entries = resolve_slides([table])
    assert entries[0] == SlideEntry(tmp_path / "a.svs", "A1", 0.25, "P1", "tumour")
    assert entries[1].slide_id == "c" and entries[1].mpp is None


def test_duplicate_ids_are_refused_with_a_way_out(tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "s.svs").write_bytes(b"x")
    with pytest.raises(JobError, match=r"duplicate slide id 's'.*relpath"):
        resolve_slides([tmp_path], recursive=True)
    assert [e.slide_id for e in resolve_slides([tmp_path], recursive=True, id_from="relpath")] == [
        "x__s",
        "y__s",
    ]


@pytest.mark.parametrize(
    ("content", "match"),
    [("file,mpp\na.svs,1\n", "needs a 'path' column"), ("path,mpp\na.svs,fast\n", "not a number")],
)
def test_bad_slide_tables(tmp_path, content, match):
    table = tmp_path / "bad.csv"
    table.write_text(content)
    with pytest.raises(JobError, match=match):
        resolve_slides([table])


def test_non_utf8_table(tmp_path):
    table = tmp_path / "latin1.csv"
    table.write_bytes("path\nsl\xefde.svs\n".encode("latin-1"))
    with pytest.raises(JobError, match="not UTF-8"):
        resolve_slides([table])


def test_shards_partition_the_list():
    entries = [SlideEntry(f"{i}.svs", f"s{i:02d}") for i in range(11)]  # type: ignore[arg-type]
    parts = [select_shard(entries, (i, 3)) for i in range(3)]
    ids = [e.slide_id for p in parts for e in p]
    assert sorted(ids) == sorted(e.slide_id for e in entries) and len(ids) == len(set(ids))
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(JobError):
            parse_shard(bad)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"}, (3, 4)),
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4"}, (1, 4)),
        ({"SGE_TASK_ID": "1", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "5"}, (0, 5)),
        ({"LSB_JOBINDEX": "2", "LSB_JOBINDEX_END": "2"}, (1, 2)),
        ({"PBS_ARRAY_INDEX": "0", "WSIKIT_ARRAY_COUNT": "2"}, (0, 2)),
        ({}, None),
    ],
)
def test_scheduler_shards(env, expected):
    assert scheduler_shard(env) == expected


def test_locks_exclude_and_reclaim_stale(tmp_path):
    held = acquire_lock(tmp_path, "tile", "s1")
    assert held is not None
    assert acquire_lock(tmp_path, "tile", "s1") is None
    release_lock(held)
    lock = tmp_path / "locks" / "tile" / "s2.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    # a dead process on this host
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7, "started": time.time()}))
    held = acquire_lock(tmp_path, "tile", "s2")
    assert held is not None
    release_lock(held)
    # a live process elsewhere, but too old
    lock.write_text(json.dumps({"host": "other", "pid": os.getpid(), "started": time.time() - 10**6}))
    assert acquire_lock(tmp_path, "tile", "s2") is not None


def test_run_batch_records_failures_and_resumes(tmp_path):
    entries = [SlideEntry(f"{s}.svs", s) for s in ("a", "b", "c")]  # type: ignore[arg-type]
    calls = []

    def work(entry):
        calls.append(entry.slide_id)
        if entry.slide_id == "b":
            raise ValueError("corrupt tile\nmore detail")
        return StageResult(outputs=[f"{entry.slide_id}.h5"], info={"tiles": 3})

    summary = run_batch("tile", entries, work, tmp_path)
    assert [s.slide_id for s in summary.done] == ["a", "c"] and not summary.ok
    failed = read_status(tmp_path, "tile", "b")
    assert failed.state == "failed" and failed.error == "ValueError: corrupt tile"
    summary = run_batch("tile", entries, work, tmp_path)
    assert summary.skipped == ["a", "b", "c"] and calls == ["a", "b", "c"]
    summary = run_batch("tile", entries, work, tmp_path, retry_failed=True)
    assert calls[-1] == "b" and summary.skipped == ["a", "c"]
    run_batch("tile", entries, work, tmp_path, overwrite=True)
    assert calls[-3:] == ["a", "b", "c"]


def test_job_status_counts_and_cli(tmp_path):
    from typer.testing import CliRunner

    from wsikit.cli.main import app
    from wsikit.jobs import job_status

    entries = [SlideEntry(f"{s}.svs", s) for s in ("a", "b", "c")]  # type: ignore[arg-type]

    def work(entry):
        if entry.slide_id == "b":
            raise OSError("slide vanished")
        return StageResult(warnings=["empty tissue mask"] if entry.slide_id == "c" else [])

    run_batch("tile", entries, work, tmp_path)
    run_batch("extract", entries[:1], work, tmp_path)
    report = job_status(tmp_path)
    assert report["slides"] == 3
    assert report["stages"]["tile"] | {"warnings": None} == {
        "done": 2, "failed": 1, "running": 0, "pending": 0, "warnings": None,
        "failures": {"b": "OSError: slide vanished"},
    }  # fmt: skip
    assert report["stages"]["extract"]["pending"] == 2
    result = CliRunner().invoke(app, ["status", str(tmp_path), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["stages"]["tile"]["failed"] == 1
    result = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert "slide vanished" in result.stdout
