"""Pieces every CLI command shares: the console, batch progress, summaries and exit codes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from wsikit.config import ConfigError, build, load_yaml
from wsikit.jobs import BatchSummary, JobError, SlideEntry, Status, parse_shard, scheduler_shard, select_shard

T = TypeVar("T")
console = Console(stderr=True)
out = Console()


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def shard_from(option: str | None) -> tuple[int, int] | None:
    """``--shard i/n`` if given, else the scheduler array's task, else None (all slides)."""
    try:
        return parse_shard(option) if option else scheduler_shard()
    except JobError as exc:
        raise fail(str(exc)) from exc


def my_slides(entries: Sequence[SlideEntry], shard_option: str | None) -> list[SlideEntry]:
    shard = shard_from(shard_option)
    mine = select_shard(entries, shard)
    if shard:
        console.print(f"shard {shard[0]}/{shard[1]}: {len(mine)} of {len(entries)} slides")
    return mine


def with_progress(
    label: str, entries: Sequence[SlideEntry], run: Callable[..., BatchSummary], **kwargs
) -> BatchSummary:
    """Call a batch function (``run(entries, on_start=, on_end=, **kwargs)``) under a rich progress bar."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=len(entries))

        def on_start(entry: SlideEntry) -> None:
            progress.update(task, description=f"{label} {entry.slide_id}")

        def on_end(entry: SlideEntry, status: Status | None) -> None:
            progress.advance(task)

        try:
            summary = run(entries, on_start=on_start, on_end=on_end, **kwargs)
        except (
            JobError
        ) as exc:  # the job directory itself failed (e.g. disk full): nothing more can be recorded
            raise fail(str(exc), 1) from exc
        progress.update(task, description=label)
    return summary


def print_summary(title: str, summary: BatchSummary, columns: dict[str, Callable[[Status], str]]) -> None:
    """A table of done and failed slides with the given per-slide columns, then the failures listed."""
    table = Table(title=title)
    table.add_column("slide")
    table.add_column("state")
    for name in columns:
        table.add_column(name, justify="right")
    table.add_column("time (s)", justify="right")
    for status in summary.done + summary.failed:
        cells = [fn(status) if status.state == "done" else "" for fn in columns.values()]
        state = "[green]done[/]" if status.state == "done" else "[red]failed[/]"
        if status.warnings:
            state += " [yellow](warnings)[/]"
        table.add_row(status.slide_id, state, *cells, f"{status.seconds:.1f}")
    out.print(table)
    console.print(
        f"{len(summary.done)} done, {len(summary.failed)} failed, {len(summary.skipped)} skipped "
        f"(already recorded), {len(summary.busy)} busy (locked by another process)"
    )
    for status in summary.done:
        for warning in status.warnings:
            console.print(f"[yellow]warning[/] {status.slide_id}: {warning}", highlight=False, soft_wrap=True)
    for status in summary.failed:
        console.print(f"[red]failed[/] {status.slide_id}: {status.error}", highlight=False, soft_wrap=True)


def exit_for(summary: BatchSummary) -> None:
    """Exit non-zero when any slide failed."""
    if not summary.ok:
        raise typer.Exit(1)


def layered_settings(
    ctx: typer.Context, config: Path | None, section: str, options: dict[str, tuple[tuple[str, ...], Any]]
) -> dict[str, Any]:
    """A stage's settings: the config file's ``section`` with the options given on the command line over it.

    ``options`` maps a dotted settings key (``mask.mpp``) to the command's option names that set it and
    the value they give. Without a config file every option's value (defaults included) is used.
    """
    try:
        data = (load_yaml(config).get(section) or {}) if config else {}
    except ConfigError as exc:
        raise fail(str(exc)) from exc
    if not isinstance(data, dict):
        raise fail(f"{config}: section '{section}' must be a mapping of settings")
    for key, (names, value) in options.items():
        given = any(getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE" for n in names)
        if config is None or given:
            *parents, leaf = key.split(".")
            node = data
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    return data


def build_settings(cls: type[T], data: dict[str, Any], config: Path | None, section: str) -> T:
    """Validate layered settings into the stage's dataclass, or exit with the one-line error."""
    try:
        return build(cls, data, f"{config}:{section}" if config else section)
    except ConfigError as exc:
        raise fail(str(exc)) from exc
