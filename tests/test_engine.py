"""The extraction engine: batches across slides, out-of-order reading, kill and resume mid-cohort, OOM
back-off, two engines sharing one job, progress, seeded random weights, the fast path and the choices
made by measurement (batch size, where JPEG tiles are decoded)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wsikit.bags import read_bag
from wsikit.encoders import IMAGENET_MEAN, IMAGENET_STD, Encoder, get_encoder
from wsikit.grids import grid_path, read_grid
from wsikit.jobs import BatchSummary, SlideEntry, Status, read_status, resolve_slides
from wsikit.runtime import DeviceError, batch_for_memory, is_oom, resolve_devices, split_cpus
from wsikit.settings import ExtractConfig, TileConfig
from wsikit.slide import open_slide
from wsikit.specs import parse_spec
from wsikit.stages.devices import merge_summaries
from wsikit.stages.encode import (
    CPU_BATCH,
    Encoding,
    Runtime,
    auto_batch_size,
    choose_decode,
    prepare_model,
)
from wsikit.stages.engine import Batcher, ExtractSummary
from wsikit.stages.extract import Extractor, job_slides, run_extraction, stage_name
from wsikit.stages.reading import Segment, second_try
from wsikit.stages.tile import run_tiling
from wsikit.tiles import read_tile

SPECS = ("1.0/128/0", "2.0/128/0")
FINE = "mpp1.00_128px_0ov"
WSIKIT = [sys.executable, "-m", "wsikit.cli.main"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_encoder(size: int = 32) -> Encoder:
    """A seeded two-layer CNN: every code path of a real encoder at a fraction of the cost."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Encoder(
        "tiny", model.eval(), 8, size, IMAGENET_MEAN, IMAGENET_STD, "bilinear", "fp32", None, "random"
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, small_slides) -> Path:
    """Eight slides (the four small real-tissue pyramids, twice) tiled at 1.0 and 2.0 µm/px."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "slides").mkdir()
    for k in range(2):
        for s in small_slides:
            shutil.copy(s, root / "slides" / f"{s.stem}_{k}.svs")
    cfg = TileConfig(tuple(parse_spec(t) for t in SPECS), min_tissue=0.25)
    assert not run_tiling(resolve_slides([root / "slides"]), root / "job", cfg).failed
    return root / "job"


@pytest.fixture
def job(cohort, tmp_path) -> Path:
    return Path(shutil.copytree(cohort, tmp_path / "job"))


def _bags(job: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(job).as_posix(): read_bag(p).features for p in sorted((job / "bags").rglob("*.h5"))}


def _cfg(**kw) -> ExtractConfig:
    return ExtractConfig(**{"encoder": "tiny", "workers": 0, "batch_size": 5, "precision": "fp32", **kw})


def test_batches_span_slides_and_bags_equal_one_slide_at_a_time(job, tmp_path, monkeypatch):
    alone = Path(shutil.copytree(job, tmp_path / "alone"))
    for entry in job_slides(alone, [FINE]):
        assert not run_extraction(alone, _cfg(), [entry], encoder=tiny_encoder()).failed
    slides_per_batch = []
    take = Batcher.take

    def spy(self, n):
        pixels, pieces, stains = take(self, n)
        slides_per_batch.append(len({p.grid.slide.key for p in pieces}))
        return pixels, pieces, stains

    monkeypatch.setattr(Batcher, "take", spy)
    summary = run_extraction(job, _cfg(), encoder=tiny_encoder())
    assert len(summary.done) == 8 and summary.tiles == sum(
        sum(s.info["tiles"].values()) for s in summary.done
    )
    assert max(slides_per_batch) > 1  # batches crossed slide boundaries …
    got, ref = _bags(job), _bags(alone)
    assert got.keys() == ref.keys() and len(got) == 8 * 3
    for key in ref:  # … and every bag is bit-identical to the slide encoded on its own
        assert np.array_equal(got[key], ref[key]), key


def test_segments_read_out_of_order_are_written_in_grid_order(job, tmp_path):
    """Two reading processes, segments of 8 tiles: a grid's segments arrive in any order."""
    inline = Path(shutil.copytree(job, tmp_path / "inline"))
    assert not run_extraction(inline, _cfg(batch_size=2), encoder=tiny_encoder()).failed
    summary = run_extraction(job, _cfg(batch_size=2, workers=2), encoder=tiny_encoder())
    assert len(summary.done) == 8
    got, ref = _bags(job), _bags(inline)
    for key in ref:
        assert np.array_equal(got[key], ref[key]), key
    bag = read_bag(next((job / "bags" / FINE).rglob("*.h5")))
    np.testing.assert_array_equal(bag.tile_index, np.arange(len(bag)))


def test_kill_mid_cohort_then_resume_equals_uninterrupted(job, tmp_path):
    reference = Path(shutil.copytree(job, tmp_path / "reference"))
    cfg = ExtractConfig("resnet18", pretrained=False, seed=7, batch_size=4, workers=0, precision="fp32")
    assert len(run_extraction(reference, cfg).done) == 8
    args = ["extract", str(job), "-e", "resnet18", "--random-weights", "--seed", "7", "-b", "4", "-j", "0",
            "--precision", "fp32"]  # fmt: skip
    proc = subprocess.Popen([*WSIKIT, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status_dir, deadline = job / "status" / stage_name("resnet18"), time.monotonic() + 120
    while time.monotonic() < deadline and len(list(status_dir.glob("*.json"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before the kill"
    done = [p.stem for p in status_dir.glob("*.json")]
    assert 3 <= len(done) < 8
    summary = run_extraction(job, cfg)
    assert sorted(summary.skipped) == sorted(done) and len(summary.done) == 8 - len(done)
    assert not [p for p in job.rglob(".*") if p.name.endswith(".tmp")]
    got, ref = _bags(job), _bags(reference)
    assert got.keys() == ref.keys()
    for key in ref:
        assert np.array_equal(got[key], ref[key]), key
    assert read_bag(next((job / "bags").rglob("*.h5"))).attrs["weights_id"] == "random:seed=7"


class _OutOfMemory(nn.Module):
    """Wraps a model; batches over ``limit`` tiles raise the device's out-of-memory error."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.sizes = model, limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x)


def test_out_of_memory_halves_the_batch_and_keeps_it(job, tmp_path):
    small = Path(shutil.copytree(job, tmp_path / "small"))
    assert not run_extraction(small, _cfg(batch_size=4), encoder=tiny_encoder()).failed
    enc = tiny_encoder()
    enc.model = _OutOfMemory(enc.model, limit=4)
    summary = run_extraction(job, _cfg(batch_size=16), encoder=enc)
    assert len(summary.done) == 8 and summary.batch_size == 4
    assert enc.model.sizes[:3] == [16, 8, 4]  # halved twice on the first batch …
    assert max(enc.model.sizes[3:]) <= 8 and enc.model.sizes.count(16) == 1  # … and kept
    got, ref = _bags(job), _bags(small)
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-6)


def test_out_of_memory_splits_stain_runs_and_refuses_one_tile():
    enc = tiny_encoder()
    enc.model = _OutOfMemory(enc.model, limit=2)
    seen = []

    def norm(x):
        seen.append(len(x))
        return x

    encoding = Encoding(Runtime(enc, torch.device("cpu")), batch_size=6)
    out = encoding(torch.zeros((6, 32, 32, 3), dtype=torch.uint8), [(1, None), (5, norm)])
    assert out.shape == (6, 8) and encoding.backoffs == [3, 1] and encoding.batch_size == 1
    assert sum(seen) >= 5  # the normalizer saw its five rows (again on each retry)
    enc.model.limit = 0
    with pytest.raises(DeviceError, match="even one tile at a time"):
        Encoding(Runtime(enc, torch.device("cpu")), batch_size=1)(
            torch.zeros((1, 32, 32, 3), dtype=torch.uint8)
        )
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 5 GB"))
    assert not is_oom(RuntimeError("shape mismatch"))


def test_two_engines_share_one_job(job, tmp_path):
    """``--devices cpu,cpu``: two engine processes, each slide done exactly once, bags as one engine's."""
    single = Path(shutil.copytree(job, tmp_path / "single"))
    assert not run_extraction(single, _cfg(), encoder=tiny_encoder()).failed
    ready = []
    summary = run_extraction(job, _cfg(devices="cpu,cpu"), encoder=tiny_encoder(), on_ready=ready.append)
    assert len(ready) == 2 and all("tiny" in line for line in ready)
    ids = [s.slide_id for s in summary.done]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 8 and not summary.failed
    pids = {read_status(job, stage_name("tiny"), i).pid for i in ids}
    assert len(pids) == 2  # both engines took slides
    got, ref = _bags(job), _bags(single)
    for key in ref:
        assert np.array_equal(got[key], ref[key]), key


def test_merged_summaries_count_each_slide_once():
    def status(i: str, state: str, t: float) -> Status:
        return Status("extract-x", i, state, finished_at=t)

    a = ExtractSummary(done=[status("s0", "done", 2)], busy=["s1", "s3"], skipped=["s2"], tiles=10, seconds=3)
    b = ExtractSummary(
        done=[status("s1", "done", 1)], failed=[status("s2", "failed", 3)], busy=["s0"], tiles=5
    )
    merged = merge_summaries([a, b])
    assert [s.slide_id for s in merged.done] == ["s1", "s0"] and [s.slide_id for s in merged.failed] == ["s2"]
    assert merged.busy == ["s3"] and merged.skipped == [] and merged.tiles == 15 and merged.seconds == 3
    assert isinstance(merged, BatchSummary)


def test_progress_counts_tiles_and_slides_to_do(job):
    seen = []
    cfg = _cfg()
    first = job_slides(job, [FINE, "mpp2.00_128px_0ov"])[:2]
    run_extraction(job, cfg, first, encoder=tiny_encoder())  # two slides already done: not counted
    summary = run_extraction(job, cfg, encoder=tiny_encoder(), on_progress=lambda p: seen.append(
        (p.tiles_done, p.tiles_total, p.slides_done, p.slides_total, p.eta)))  # fmt: skip
    total = sum(
        sum(s.info["tiles"].values()) + sum(map(len, s.info["skipped"].values())) for s in summary.done
    )
    assert seen[-1][:4] == (total, total, 6, 6) and seen[-1][4] == 0
    assert all(a <= b for a, b in zip([s[0] for s in seen], [s[0] for s in seen[1:]], strict=False))


def test_seeded_random_weights_are_the_same_and_say_so(job):
    a, b = (
        get_encoder("resnet18", pretrained=False, seed=3),
        get_encoder("resnet18", pretrained=False, seed=3),
    )
    assert a.weights_id == "random:seed=3"
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True)
    )
    c = get_encoder("resnet18", pretrained=False, seed=4)
    assert not torch.equal(next(iter(a.model.parameters())), next(iter(c.model.parameters())))
    assert get_encoder("resnet18", pretrained=False).weights_id == "random"


def test_transformers_get_fused_attention_and_cnns_channels_last():
    vit = get_encoder("vit_small", pretrained=False, seed=0)
    for module in vit.model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    assert prepare_model(vit, channels_last=True) is False
    assert all(m.fused_attn for m in vit.model.modules() if hasattr(m, "fused_attn"))
    runtime = Runtime(vit, torch.device("cpu"), channels_last=False)
    assert runtime.describe()["attention"] == "fused sdpa"
    cnn = tiny_encoder()
    assert prepare_model(cnn, channels_last=True) is True
    assert Runtime(cnn, torch.device("cpu")).describe()["attention"] is None


def test_batch_size_rule_and_devices():
    gib = 1 << 30
    assert batch_for_memory(per_tile=40e6, fixed=2 * gib, free=80 * gib) == 512  # capped
    assert batch_for_memory(per_tile=200e6, fixed=2 * gib, free=24 * gib) == 64  # 0.6·24 GiB − 2 → 66 tiles
    assert batch_for_memory(per_tile=1e12, fixed=0, free=gib) == 1
    enc = tiny_encoder()
    assert auto_batch_size(Runtime(enc, torch.device("cpu"))) == CPU_BATCH
    assert resolve_devices(None, "cpu") == ["cpu"] and resolve_devices("cpu,cpu") == ["cpu", "cpu"]
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_devices("all")
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_devices("0,1")
    assert split_cpus(3, cpus=16) == [6, 5, 5] and split_cpus(4, cpus=2) == [1, 1, 1, 1]


@pytest.mark.parametrize(
    ("mode", "device", "rates", "where"),
    [
        ("auto", "cpu", (None, None, None), "cpu"),  # no GPU: the CPU
        ("auto", "cuda", (15_000, 9_000, 2_000), "cpu"),  # ViT-L: CPU workers keep up
        ("auto", "cuda", (6_000, 20_000, 14_000), "gpu"),  # ResNet-50-trunc: they do not
        ("auto", "cuda", (6_000, 5_000, 14_000), "cpu"),  # … but the GPU decodes no faster
        ("auto", "cuda", (None, None, 14_000), "cpu"),  # no JPEG tiles a GPU decodes
        ("cpu", "cuda", (6_000, 20_000, 14_000), "cpu"),  # forced
        ("gpu", "cuda", (15_000, 9_000, 2_000), "gpu"),  # forced
    ],
)
def test_decoding_is_chosen_by_measurement(mode, device, rates, where):
    choice = choose_decode(mode, device, *rates)
    assert choice.where == where and choice.why


def test_decode_gpu_without_a_gpu_is_refused():
    with pytest.raises(DeviceError, match="--decode gpu needs a CUDA device"):
        choose_decode("gpu", "cpu")


def test_extractor_builds_once_and_describes_its_fast_path(job):
    ex = Extractor.build(_cfg(batch_size=None), encoder=tiny_encoder())
    assert ex.batch_size == CPU_BATCH and "batch 64" in ex.describe() and "channels-last" in ex.describe()
    entries = job_slides(job, [FINE, "mpp2.00_128px_0ov"])
    first = ex.run(entries[:4], job, [FINE, "mpp2.00_128px_0ov"])
    second = ex.run(entries, job, [FINE, "mpp2.00_128px_0ov"])  # the same model, a second run
    assert len(first.done) == 4 and len(second.done) == 4 and len(second.skipped) == 4
    assert first.done[0].info["decode"] == "cpu" and first.done[0].info["batch_size"] == CPU_BATCH


def test_cli_random_weights_seed_and_summary_line(job):
    from typer.testing import CliRunner

    from wsikit.cli.main import app

    args = [
        "extract",
        str(job),
        "-e",
        "resnet18",
        "--random-weights",
        "--seed",
        "3",
        "--spec",
        "2.0/128",
        "-j",
        "0",
    ]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "encoded" in result.output and "tiles/s" in result.output and "batch 64" in result.output
    bag = read_bag(next((job / "bags" / "mpp2.00_128px_0ov" / "resnet18").glob("*.h5")))
    assert bag.attrs["weights_id"] == "random:seed=3"


def test_unused_entries_are_not_claimed_after_stop(job):
    calls = []
    ex = Extractor.build(_cfg(), encoder=tiny_encoder())
    specs = [FINE, "mpp2.00_128px_0ov"]
    summary = ex.run(job_slides(job, specs), job, specs, on_start=calls.append, stop=lambda: len(calls) >= 1)
    assert 1 <= len(summary.done) < 8 and not list((job / "locks").rglob("*.lock"))


def test_gpu_decoding_path_ships_jpeg_streams(pyramids, tmp_path, monkeypatch):
    """``--decode gpu``'s data path on a CPU: workers ship whole JPEG tiles as bytes, the engine decodes
    and resizes them in batches (here with the CPU decoder), features within rounding of the CPU path."""
    import wsikit.stages.engine as engine
    from wsikit.stages.encode import DecodeChoice

    job = tmp_path / "job"
    cfg = TileConfig((parse_spec("0.5/256/0"),), min_tissue=0.25, align_native=True)  # whole file tiles
    assert not run_tiling([SlideEntry(pyramids["svs"], "svs")], job, cfg).failed
    ref = Path(shutil.copytree(job, tmp_path / "cpu"))
    assert not run_extraction(ref, _cfg(workers=1), encoder=tiny_encoder(256)).failed
    monkeypatch.setattr(engine, "choose_decode", lambda *a: DecodeChoice("gpu", "test"))
    shipped = []
    assemble = engine.assemble_batch
    monkeypatch.setattr(
        engine, "assemble_batch", lambda b, *a: shipped.append(len(b.streams)) or assemble(b, *a)
    )
    summary = run_extraction(job, _cfg(workers=1), encoder=tiny_encoder(256))
    assert len(summary.done) == 1 and summary.decode == "gpu" and sum(shipped) > 20
    got, want = _bags(job), _bags(ref)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=0.05)


def test_decode_measurement_on_a_jpeg_pyramid(pyramids):
    from wsikit.slide import open_slide
    from wsikit.stages.encode import measure_decode
    from wsikit.tiles import TileSource

    with open_slide(pyramids["svs"]) as slide:
        coords = np.array([(x, y) for y in range(0, 1024, 256) for x in range(0, 1024, 256)], np.int64)
        source = TileSource(slide, coords, 256, 256)
        cpu, gpu = measure_decode(source, Runtime(tiny_encoder(), torch.device("cpu")), workers=3)
        assert cpu > 0 and gpu > 0  # on a CPU both are CPU decoders; the choice is tested above
        shifted = TileSource(slide, coords + 100, 256, 256)  # crops of several file tiles: no streams
        assert measure_decode(shifted, Runtime(tiny_encoder(), torch.device("cpu")), workers=3) is None


def test_tiles_failed_beside_a_bad_one_are_read_again(cohort):
    """A reader that hit one bad tile may refuse later reads through the same handle (OpenSlide's error
    state): the tiles that failed beside it are read once more through a fresh handle."""
    grid = read_grid(grid_path(cohort, FINE, job_slides(cohort, [FINE])[0].slide_id))
    path = Path(grid.attrs["slide_path"])
    seg = Segment(1, 1, 0, 0, grid.coords[:3], grid.size_level0, 32, path, grid.slide_id, grid.slide_mpp,
                  "auto", "auto", False, 3)  # fmt: skip
    read = second_try(seg, [(None, i, "OpenSlideError: the slide is in an error state") for i in range(3)], 0)
    with open_slide(path) as slide:
        for (payload, i, error), xy in zip(read, grid.coords[:3], strict=True):
            assert not error and i in (0, 1, 2)
            np.testing.assert_array_equal(payload, read_tile(slide, tuple(xy), grid.size_level0, 32))
    gone = replace(seg, slide_path=path.with_name("gone.svs"))  # fails again: the first error is kept
    assert second_try(gone, [(None, 0, "first")], 0) == [(None, 0, "first")]
