"""Bundled slide → tiles → bags with a pathology encoder's identity → one mean vector per slide."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from wsikit.bags import read_bag, write_bag
from wsikit.cli.main import app
from wsikit.jobs import SlideEntry, read_status
from wsikit.settings import ExtractConfig, TileConfig
from wsikit.slide import SAMPLE_SLIDE
from wsikit.slide_embed import (
    EmbedConfig,
    SlideEmbedError,
    SlideEncoder,
    embedding_path,
    mean_pool,
    read_embedding,
    register_slide_encoder,
    run_embedding,
    stage_name,
)
from wsikit.specs import TileSpec
from wsikit.stages.extract import run_extraction
from wsikit.stages.tile import run_tiling

FINE, COARSE = "mpp0.50_224px_0ov", "mpp1.00_224px_0ov"


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> Path:
    """The bundled slide tiled at 0.5 and 1.0 µm/px and encoded by kaiko ViT-S/16 (random weights)."""
    job = tmp_path_factory.mktemp("embed") / "job"
    summary = run_tiling(
        [SlideEntry(SAMPLE_SLIDE, "cmu")], job, TileConfig((TileSpec(0.5, 224), TileSpec(1.0, 224)))
    )
    assert not summary.failed
    cfg = ExtractConfig("kaiko-vits16", embedding="cls+mean", pretrained=False, workers=0, multiscale=False)
    summary = run_extraction(job, cfg)
    assert not summary.failed
    return job


@pytest.fixture
def job(extracted, tmp_path) -> Path:
    shutil.copytree(extracted, tmp_path / "job")
    return tmp_path / "job"


def test_bag_records_the_encoder_identity_and_a_resolution_warning(extracted):
    bag = read_bag(extracted / "bags" / FINE / "kaiko-vits16" / "cmu.h5")
    assert bag.features.shape[1] == 768 and bag.attrs["encoder_dim"] == 768
    assert bag.attrs["encoder"] == "kaiko-vits16" and bag.attrs["encoder_arch"] == "vit_small_patch16_224"
    assert bag.attrs["encoder_embedding"] == "cls+mean" and bag.attrs["weights_id"] == "random:seed=0"
    assert bag.attrs["encoder_expected_mpp"] == 0.5 and abs(bag.attrs["encoder_input_mpp"] - 0.5) < 0.01
    status = read_status(extracted, "extract-kaiko-vits16", "cmu")
    assert status is not None
    warned = [w for w in status.warnings if "trained at 0.5 µm/px" in w]
    assert len(warned) == 1 and COARSE in warned[0] and "sees 0.998 µm/px" in warned[0]


def test_mean_embedding_end_to_end_through_the_cli_and_resume(job):
    runner = CliRunner()
    result = runner.invoke(app, ["embed", str(job)])
    assert result.exit_code == 2 and "several bag sets match" in result.output
    result = runner.invoke(app, ["embed", str(job), "--spec", FINE])
    assert result.exit_code == 0, result.output
    cfg = EmbedConfig("mean", FINE, "kaiko-vits16")
    vector, attrs = read_embedding(embedding_path(job, cfg, "cmu"))
    bag = read_bag(job / "bags" / FINE / "kaiko-vits16" / "cmu.h5")
    np.testing.assert_allclose(vector, bag.features.astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)
    assert vector.dtype == np.float32 and attrs["n_tiles"] == len(bag.features)
    assert attrs["patch_encoder"] == "kaiko-vits16" and attrs["patch_embedding"] == "cls+mean"
    assert attrs["slide_encoder"] == "mean" and attrs["tile_spec"] == FINE
    _, again = run_embedding(job, cfg)
    assert again.skipped == ["cmu"] and not again.done
    bag_file = job / "bags" / FINE / "kaiko-vits16" / "cmu.h5"
    os.utime(bag_file, ns=(bag_file.stat().st_atime_ns, bag_file.stat().st_mtime_ns + 10**9))
    _, redone = run_embedding(job, cfg)
    assert [s.slide_id for s in redone.done] == ["cmu"]  # the bag changed: its embedding is redone


def test_a_slide_encoder_refuses_bags_it_was_not_trained_on(job):
    register_slide_encoder(SlideEncoder("needs-uni", "test", mean_pool, "uni", 0.5, 256), overwrite=True)
    _, summary = run_embedding(job, EmbedConfig("needs-uni", FINE))
    assert len(summary.failed) == 1
    assert "needs bags from patch encoder uni, this one is from kaiko-vits16" in summary.failed[0].error
    register_slide_encoder(SlideEncoder("needs-256", "test", mean_pool, None, 0.5, 256), overwrite=True)
    _, summary = run_embedding(job, EmbedConfig("needs-256", FINE))
    assert "needs 256-px tiles, this bag's are 224 px" in summary.failed[0].error
    register_slide_encoder(SlideEncoder("needs-2um", "test", mean_pool, None, 2.0), overwrite=True)
    _, summary = run_embedding(job, EmbedConfig("needs-2um", COARSE))
    assert "needs tiles at 2 µm/px" in summary.failed[0].error
    assert (
        read_status(job, stage_name(EmbedConfig("needs-2um", COARSE, "kaiko-vits16")), "cmu").state
        == "failed"
    )


def test_an_empty_bag_has_no_embedding_and_unknown_names_fail(job):
    bag_file = job / "bags" / FINE / "kaiko-vits16" / "cmu.h5"
    bag = read_bag(bag_file)
    write_bag(
        bag_file,
        replace(bag, features=bag.features[:0], coords=bag.coords[:0], tile_index=bag.tile_index[:0]),
    )
    _, summary = run_embedding(job, EmbedConfig("mean", FINE), overwrite=True)
    assert "no tiles, so no slide embedding" in summary.failed[0].error
    with pytest.raises(SlideEmbedError, match="unknown slide encoder"):
        run_embedding(job, EmbedConfig("titan", FINE))
    with pytest.raises(SlideEmbedError, match="no h5 bags match"):
        run_embedding(job, EmbedConfig("mean", "mpp9.00_224px_0ov"))
