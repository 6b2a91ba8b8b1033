"""`wsikit run` (the chained pipeline from a config), `wsikit config show`, `wsikit slurm`."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import typer

from wsikit.cli.common import (
    SLIDE_MPP_HELP,
    console,
    exit_for,
    fail,
    out,
    print_summary,
    select_slides,
    with_progress,
)

config_app = typer.Typer(help="Inspect pipeline configs.", no_args_is_help=True)


def _load(config: Path | None, slide_mpp: float | None = None, weights: Path | None = None):
    from wsikit.config import ConfigError
    from wsikit.settings import load_pipeline_config

    try:
        cfg = load_pipeline_config(config, {"slide_mpp": slide_mpp})
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    if weights is None:
        return cfg
    if cfg.extract is None:
        raise fail(f"--weights: {config} has no extract section to use them")
    return dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, weights=weights))


@config_app.command("show")
def config_show(
    config: Path = typer.Argument(..., help="A YAML pipeline config or patch recipe (configs/)."),
) -> None:
    """Print the resolved config: every setting, defaults filled in, after validation."""
    import yaml

    from wsikit.config import ConfigError
    from wsikit.settings import resolved_config

    try:
        resolved = resolved_config(config)
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    out.print(yaml.safe_dump(resolved, sort_keys=False), highlight=False)


def run(
    config: Path = typer.Argument(..., help="A YAML pipeline config (see configs/)."),
    slides: list[str] = typer.Argument(..., help="Slide files, folders, globs or a CSV/TSV slide list."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Job directory."),
    slide_mpp: float | None = typer.Option(None, "--slide-mpp", help=SLIDE_MPP_HELP),
    shard: str | None = typer.Option(
        None, "--shard", help="i/n (default: from the scheduler's array variables)."
    ),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Search folders recursively."),
    id_from: str = typer.Option("stem", "--id-from", help="stem | relpath"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Redo slides already done (and run a job with new settings)."
    ),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry slides that failed before."),
    weights: Path | None = typer.Option(
        None,
        "--weights",
        help="Local checkpoint (.pth/.safetensors) for the encoder (the config's extract.weights).",
    ),
) -> None:
    """Tile → extract (→ heatmap) slide by slide, so the first bags appear early; resumable, shardable."""
    from wsikit.encoders import EncoderError
    from wsikit.runtime import DeviceError
    from wsikit.stages.extract import ExtractError
    from wsikit.stages.pipeline import run_pipeline

    cfg = _load(config, slide_mpp, weights)
    entries = select_slides(slides, recursive, id_from, None, shard)
    try:
        summary = with_progress(
            "run", entries, lambda e, **kw: run_pipeline(e, out_dir, cfg, overwrite, retry_failed, **kw)
        )
    except (EncoderError, ExtractError, DeviceError) as exc:  # the encoder cannot be built: before any slide
        raise fail(str(exc)) from exc
    for stage, part in summary.stages.items():
        print_summary(stage, part, {"outputs": lambda s: str(len(s.outputs))})
    console.print(f"job directory: {out_dir}  (wsikit status {out_dir})")
    for part in summary.stages.values():
        exit_for(part)


def slurm(
    config: Path = typer.Argument(..., help="A YAML pipeline config."),
    slides: list[str] = typer.Argument(..., help="Slide files, folders, globs or a CSV/TSV slide list."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Job directory (shared by all tasks)."),
    tasks: int = typer.Option(4, "--tasks", "-n", help="Array size: one shard of the slides per task."),
    cpus: int = typer.Option(4, "--cpus", help="CPUs per task."),
    mem: str = typer.Option("16G", "--mem", help="Memory per task."),
    gpus: int = typer.Option(0, "--gpus", help="GPUs per task."),
    time: str = typer.Option("04:00:00", "--time", help="Wall-time limit per task."),
    partition: str | None = typer.Option(None, "--partition", help="Partition / queue."),
    scheduler: str = typer.Option("slurm", "--scheduler", help="slurm | pbs | sge | lsf"),
    script: Path | None = typer.Option(
        None, "--script", help="Where to write it (default <out>/wsikit-array.sh)."
    ),
    submit: bool = typer.Option(False, "--submit", help="Submit it with sbatch and print the job id."),
) -> None:
    """Write a ready job-array script (one shard per task, each running `wsikit run`), and optionally submit it."""
    from wsikit.schedulers import ArrayJob, absolute_slides, write_script

    _load(config)  # refuse a bad config before anything is queued
    job = ArrayJob(
        config.absolute(),
        absolute_slides(slides),
        out_dir.absolute(),
        tasks,
        cpus,
        mem,
        gpus,
        time,
        partition,
    )
    try:
        path = write_script(job, script or out_dir / "wsikit-array.sh", scheduler)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    out.print(f"wrote {path} ({scheduler}, {tasks} tasks × {cpus} CPUs, {mem}, {gpus} GPU, {time})")
    if submit:
        if scheduler != "slurm":
            raise fail("--submit supports SLURM; submit other schedulers' scripts with their own command")
        result = subprocess.run(
            ["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise fail(f"sbatch failed: {result.stderr.strip() or result.stdout.strip()}")
        out.print(f"submitted array job {result.stdout.strip()}")
