"""`wsikit extract`: encode a tiled job's tiles into feature bags (h5 or zarr), resumable and shardable."""

from __future__ import annotations

import contextlib
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
def _progress() -> Iterator[dict[str, Any]]:
    """Rich progress over the run's tiles (rate, ETA) and slides; yields the run's callbacks."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        tiles = progress.add_task("tiles", total=None, rate="")
        slides = progress.add_task("slides", total=None, rate="")

        def on_progress(p: Any) -> None:
            progress.update(tiles, total=p.tiles_total, completed=p.tiles_done, rate=f"{p.rate:.1f} tiles/s")
            progress.update(slides, total=p.slides_total, completed=p.slides_done)

        yield {
            "on_start": lambda e: progress.update(slides, description=f"slides ({escape(e.slide_id)})"),
            "on_progress": on_progress,
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
        help="Random initialisation from --seed, for timing and tests only (weights_id 'random:seed=N').",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of --random-weights (the same weights in every run)."),
    spec: list[str] = typer.Option(
        [], "--spec", help="Tile spec(s) to encode, e.g. 20x/256 or mpp0.50_256px_0ov (default: all tiled)."
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        "-b",
        help="Tiles per forward pass (default: 64 on a CPU; on a GPU the largest power of two ≤ 512 that "
        "fits in 60% of its free memory, measured; halved if the device runs out of memory).",
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    devices: str | None = typer.Option(
        None,
        "--devices",
        help="Several GPUs, one engine each sharing the slides: 0,1,2,3 or all (CPU workers are split "
        "between them).",
    ),
    decode: str = typer.Option(
        "auto",
        "--decode",
        help="auto | cpu | gpu: decode JPEG tiles in CPU workers or on the GPU (nvJPEG); "
        "auto measures both on the first slide.",
    ),
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
    compile_model: bool = typer.Option(
        False, "--compile", help="torch.compile the encoder (built and warmed up once per run)."
    ),
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
    from wsikit.stages.extract import ExtractError, extraction_slides, run_extraction

    names = ("encoder", "weights", "seed", "batch_size", "workers", "device", "devices", "decode", "precision",
             "fmt", "fp16_features", "compression", "stain", "multiscale", "backend", "reader",
             "read_timeout")  # fmt: skip
    values = (encoder, weights, seed, batch_size, workers, device, devices, decode, precision, fmt,
              fp16_features, compression, stain, multiscale, backend, reader, read_timeout)  # fmt: skip
    errors = (ExtractError, EncoderError, JobError, TilingError, SettingsError, DeviceError)
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
    except errors as exc:
        raise fail(str(exc)) from exc
    mine = share_of(entries, shard)
    if not cfg.specs:
        _warn_stale(job_dir)

    def on_ready(engine: str) -> None:
        say(f"{engine}: {len(mine)} slide(s) × {', '.join(specs)}")

    with _progress() as callbacks:
        try:
            summary = run_extraction(
                job_dir, cfg, mine, overwrite, retry_failed, on_ready=on_ready, **callbacks
            )
        except JobError as exc:  # the job directory itself failed (e.g. disk full)
            raise fail(str(exc), 1) from exc
        except errors as exc:
            raise fail(str(exc)) from exc
    print_summary(
        f"wsikit extract → {job_dir}/bags",
        summary,
        {
            "tiles": lambda s: " / ".join(str(n) for n in s.info.get("tiles", {}).values()),
            "skipped": lambda s: str(sum(len(v) for v in s.info.get("skipped", {}).values())),
            "tiles/s": lambda s: " / ".join(str(v) for v in s.info.get("tiles_per_s", {}).values()),
        },
    )
    if summary.tiles:
        say(
            f"encoded {summary.tiles} tiles in {summary.seconds:.2f} s: {summary.tiles_per_s:.1f} tiles/s "
            f"(batch {summary.batch_size}, decoding on {summary.decode}; model built in "
            f"{summary.build_seconds:.1f} s before)"
        )
    exit_for(summary)
