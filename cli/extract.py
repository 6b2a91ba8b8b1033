"""`wsikit extract`: encode a tiled job's tiles into feature bags (h5 or zarr), resumable and shardable."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from wsikit.cli.common import (
    build_settings,
    console,
    exit_for,
    fail,
    layered_settings,
    options_of,
    print_summary,
    say,
    share_of,
    warn,
)


@contextlib.contextmanager
def _progress(n_slides: int) -> Iterator[dict[str, Any]]:
    """Rich progress over slides and tiles; yields the run's ``on_start``/``on_end``/``on_tiles`` callbacks."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        slides = progress.add_task("slides", total=n_slides, rate="")
        tiles = progress.add_task("tiles", total=None, rate="")
        t0, count = time.perf_counter(), [0]

        def on_tiles(n: int) -> None:
            count[0] += n
            rate = count[0] / max(1e-9, time.perf_counter() - t0)
            progress.update(tiles, advance=n, rate=f"{rate:.1f} tiles/s")

        yield {
            "on_start": lambda e: progress.update(slides, description=f"slides ({escape(e.slide_id)})"),
            "on_end": lambda e, status: progress.advance(slides),
            "on_tiles": on_tiles,
        }


def _warn_stale(job_dir: Path) -> None:
    """Name the spec folders an earlier tiling left (not encoded: the job's tiling no longer makes them)."""
    from wsikit.grids import tiled_specs

    for name, ids in tiled_specs(job_dir)[1].items():
        shown = ", ".join(ids[:3]) + (f", … ({len(ids)} in all)" if len(ids) > 3 else "")
        warn(
            f"{job_dir}/tiles/{name}: stale, left from an earlier tiling ({shown}); not encoded, as the job's "
            "current tiling does not make it (delete the folder, or re-tile with that spec)"
        )


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
    from wsikit.encoders import EncoderError
    from wsikit.jobs import JobError
    from wsikit.runtime import DeviceError
    from wsikit.settings import ExtractConfig, SettingsError
    from wsikit.specs import TilingError, parse_spec
    from wsikit.stages.extract import ExtractError, Extractor, extraction_slides

    names = ("encoder", "weights", "batch_size", "workers", "device", "precision", "fmt", "fp16_features",
             "compression", "stain", "multiscale", "backend", "reader", "read_timeout")  # fmt: skip
    values = (encoder, weights, batch_size, workers, device, precision, fmt, fp16_features, compression, stain,
              multiscale, backend, reader, read_timeout)  # fmt: skip
    try:
        options = options_of(names, values)
        options["pretrained"] = (("random_weights",), not random_weights)
        options["specs"] = (("spec",), [parse_spec(t).name for t in spec])
        options["compile"] = (("compile_model",), compile_model)
        options["embedding"] = (("embedding",), embedding)
        cfg = build_settings(
            ExtractConfig, layered_settings(ctx, config, "extract", options), config, "extract"
        )
        specs, entries = extraction_slides(job_dir, cfg)
        mine = share_of(entries, shard)
        extractor = Extractor.build(cfg)
    except (ExtractError, EncoderError, JobError, TilingError, SettingsError, DeviceError) as exc:
        raise fail(str(exc)) from exc
    if not cfg.specs:
        _warn_stale(job_dir)
    say(f"{extractor.describe()}: {len(mine)} slide(s) × {', '.join(specs)}")
    with _progress(len(mine)) as callbacks:
        try:
            summary = extractor.run(mine, job_dir, specs, overwrite, retry_failed, **callbacks)
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
