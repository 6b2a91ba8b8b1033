"""`wsikit extract`: encode a tiled job's tiles into feature bags (h5 or zarr), resumable and shardable."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from wsikit.cli.common import (
    build_settings,
    console,
    exit_for,
    fail,
    layered_settings,
    my_slides,
    print_summary,
)
from wsikit.encoders import EncoderError
from wsikit.extract import ExtractConfig, ExtractError, Extractor, job_slides, resolve_specs
from wsikit.jobs import JobError, Status
from wsikit.tiling import TilingError, parse_spec


def _spec_names(texts: list[str]) -> tuple[str, ...]:
    return tuple(parse_spec(t).name for t in texts)


def extract(
    ctx: typer.Context,
    job_dir: Path = typer.Argument(..., help="Job directory written by `wsikit tile`."),
    config: Path | None = typer.Option(
        None, "--config", help="YAML config whose 'extract' section sets defaults; options given here win."
    ),
    encoder: str = typer.Option(
        "resnet50-trunc",
        "--encoder",
        "-e",
        help="A registered encoder (`wsikit encoders` lists them) or timm:<model>.",
    ),
    weights: Path | None = typer.Option(
        None,
        "--weights",
        help="Local checkpoint (.safetensors/.bin/.pth) or downloaded repository folder for the encoder.",
    ),
    embedding: str | None = typer.Option(
        None, "--embedding", help="cls | cls+mean | mean | pooled (default: the encoder's own rule)."
    ),
    random_weights: bool = typer.Option(
        False,
        "--random-weights",
        help="Random initialisation, for timing and tests only (weights_id 'random').",
    ),
    spec: list[str] = typer.Option(
        [], "--spec", help="Tile spec(s) to encode, e.g. 20x/256 or mpp0.50_256px_0ov (default: all tiled)."
    ),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Tiles per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="auto (bf16/fp16 on GPU, bf16 on CPUs with native bf16) | fp32 | bf16 | fp16",
    ),
    fmt: str = typer.Option("h5", "--format", help="h5 | zarr"),
    fp16_features: bool = typer.Option(False, "--fp16-features", help="Store features as float16."),
    compression: str | None = typer.Option(None, "--compression", help="gzip | lzf (h5), zstd (zarr)."),
    stain: Path | None = typer.Option(
        None, "--stain", help="Fitted stain normalizer (JSON from `wsikit stain fit`) applied on the device."
    ),
    workers: int | None = typer.Option(
        None, "--workers", "-j", help="Tile-reading processes (default: from the CPUs allotted to this job)."
    ),
    multiscale: bool = typer.Option(
        True, "--multiscale/--no-multiscale", help="Also write bags joining fine tiles with parent features."
    ),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the encoder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo slides already done."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry slides that failed before."),
    shard: str | None = typer.Option(
        None, "--shard", help="i/n: this process's share (default: from SLURM/SGE/LSF/PBS array variables)."
    ),
    backend: str = typer.Option("auto", "--backend", help="auto | openslide | tiffslide"),
    reader: str = typer.Option(
        "auto",
        "--reader",
        help="auto | native | openslide | tiffslide: native decodes the file's compressed tiles where that "
        "is exact (auto: native there, --backend elsewhere); see docs/readers.md.",
    ),
    read_timeout: float = typer.Option(
        600.0,
        "--read-timeout",
        help="Seconds the reading workers may take for one batch before the slide fails (a stalled network "
        "read); 0: no limit.",
    ),
) -> None:
    """Encode every tile of a tiled job into one feature bag per slide and spec."""
    try:
        options = {
            "encoder": (("encoder",), encoder),
            "weights": (("weights",), weights),
            "embedding": (("embedding",), embedding),
            "pretrained": (("random_weights",), not random_weights),
            "specs": (("spec",), list(_spec_names(spec))),
            "batch_size": (("batch_size",), batch_size),
            "workers": (("workers",), workers),
            "device": (("device",), device),
            "precision": (("precision",), precision),
            "fmt": (("fmt",), fmt),
            "fp16_features": (("fp16_features",), fp16_features),
            "compression": (("compression",), compression),
            "stain": (("stain",), stain),
            "multiscale": (("multiscale",), multiscale),
            "compile": (("compile_model",), compile_model),
            "backend": (("backend",), backend),
            "reader": (("reader",), reader),
            "read_timeout": (("read_timeout",), read_timeout),
        }
        cfg = build_settings(
            ExtractConfig, layered_settings(ctx, config, "extract", options), config, "extract"
        )
        specs = resolve_specs(job_dir, cfg.specs)
        entries = job_slides(job_dir, specs)
        if not entries:
            raise JobError(f"{job_dir}: no slides tiled at {', '.join(specs)}; run `wsikit tile` first")
        mine = my_slides(entries, shard)
        extractor = Extractor.build(cfg)
    except (ExtractError, EncoderError, JobError, TilingError) as exc:
        raise fail(str(exc)) from exc
    rt = extractor.runtime
    console.print(
        f"{rt.encoder.name} ({rt.encoder.dim}-d, weights {rt.encoder.weights_id[:23]}) on {rt.device}, "
        f"{rt.describe()['autocast']}, {extractor.workers} reader(s), batch {cfg.batch_size}: "
        f"{len(mine)} slide(s) × {', '.join(specs)}"
    )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        slides_task = progress.add_task("slides", total=len(mine), rate="")
        tiles_task = progress.add_task("tiles", total=None, rate="")
        t0 = time.perf_counter()
        count = [0]

        def on_start(entry) -> None:
            progress.update(slides_task, description=f"slides ({entry.slide_id})")

        def on_end(entry, status: Status | None) -> None:
            progress.advance(slides_task)

        def on_tiles(n: int) -> None:
            count[0] += n
            rate = count[0] / max(1e-9, time.perf_counter() - t0)
            progress.update(tiles_task, advance=n, rate=f"{rate:.1f} tiles/s")

        try:
            summary = extractor.run(
                mine,
                job_dir,
                specs,
                overwrite,
                retry_failed,
                on_start=on_start,
                on_end=on_end,
                on_tiles=on_tiles,
            )
        except JobError as exc:  # the job directory itself failed (e.g. disk full)
            raise fail(str(exc), 1) from exc
    print_summary(
        f"wsikit extract → {job_dir}/bags",
        summary,
        {
            "tiles": lambda s: " / ".join(str(n) for n in s.info.get("tiles", {}).values()),
            "skipped": lambda s: str(sum(len(v) for v in s.info.get("skipped", {}).values())),
            "tiles/s": lambda s: " / ".join(str(v) for v in s.info.get("tiles_per_s", {}).values()),
        },
    )
    exit_for(summary)
