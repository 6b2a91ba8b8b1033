"""Pieces every CLI command shares: the console, errors and exit codes, option layering over config files,
slide lists and shards, batch progress and summaries.

Start-up matters (``wsikit --help`` must not wait for torch): this module and the command modules import
only the standard library, typer and rich at the top; each command imports the library where it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from wsikit.jobs import BatchSummary, SlideEntry, Status

T = TypeVar("T")
console = Console(stderr=True)
out = Console()

THREADS_HELP = "CPU threads for torch (default: the CPUs allotted to this job). MIL models are small: 1-2 is often fastest."
SLIDE_MPP_HELP = (
    "Level-0 resolution (µm/px) of the slides given, over their files' own (a slide list's mpp column wins); "
    "needed where a file has none. A rerun with another value redoes the slides it applies to."
)


MAX_MESSAGE = 1000  # characters of one error or warning line; the rest is counted, not printed


def bounded(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` cut to ``limit`` characters (a value echoed in an error can be huge)."""
    return message if len(message) <= limit else f"{message[:limit]}… (+{len(message) - limit} characters)"


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    console.print(f"[bold red]error:[/] {escape(bounded(message))}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def warn(message: str) -> None:
    """Print a warning line (user text is never read as markup)."""
    console.print(f"[yellow]warning[/] {escape(bounded(message))}", highlight=False, soft_wrap=True)


def say(message: str) -> None:
    """Print a progress line on stderr (user text is never read as markup)."""
    console.print(escape(message), highlight=False, soft_wrap=True)


def slide_mpp_from(value: float | None, old_spelling: float | None) -> float | None:
    """The slide-resolution override, from ``--slide-mpp`` or its old spelling ``--mpp`` (hidden, kept for
    one release on `info` and `heatmap`)."""
    if old_spelling is not None:
        warn("--mpp is now --slide-mpp here (the slide's own resolution); the old spelling goes in 0.3")
    return value if value is not None else old_spelling


def select_slides(
    inputs: Sequence[str],
    recursive: bool = False,
    id_from: str = "stem",
    slide_mpp: float | None = None,
    shard_option: str | None = None,
) -> list[SlideEntry]:
    """This process's share of the slides (``--shard i/n`` or the scheduler's array task), with the
    ``--slide-mpp`` override applied; exits with the one-line error of a bad list or shard."""
    from wsikit.jobs import JobError, select_slides

    try:
        mine, total, shard = select_slides(inputs, recursive, id_from, slide_mpp, shard_option)
    except JobError as exc:
        raise fail(str(exc)) from exc
    if not total:
        raise fail(f"no slides found in {' '.join(inputs)}")
    if shard:
        say(f"shard {shard[0]}/{shard[1]}: {len(mine)} of {total} slides")
    return mine


def share_of(entries: Sequence[SlideEntry], shard_option: str | None) -> list[SlideEntry]:
    """This process's share of ``entries`` (``--shard i/n`` or the scheduler's array task)."""
    from wsikit.jobs import JobError, take_share

    try:
        mine, shard = take_share(entries, shard_option)
    except JobError as exc:
        raise fail(str(exc)) from exc
    if shard:
        say(f"shard {shard[0]}/{shard[1]}: {len(mine)} of {len(entries)} slides")
    return mine


def with_progress(
    label: str, entries: Sequence[SlideEntry], run: Callable[..., BatchSummary], **kwargs
) -> BatchSummary:
    """Call a batch function (``run(entries, on_start=, on_end=, **kwargs)``) under a rich progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from wsikit.jobs import JobError

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=len(entries))

        def on_start(entry: SlideEntry) -> None:
            progress.update(task, description=f"{label} {escape(entry.slide_id)}")

        def on_end(entry: SlideEntry, status: Status | None) -> None:
            progress.advance(task)

        try:
            summary = run(entries, on_start=on_start, on_end=on_end, **kwargs)
        except JobError as exc:  # the job directory itself failed (e.g. disk full): nothing more recorded
            raise fail(str(exc), 1) from exc
        progress.update(task, description=label)
    return summary


MAX_SKIPPED_ROWS = 50  # slides skipped as done earlier are listed up to this many (then counted)


def print_summary(title: str, summary: BatchSummary, columns: dict[str, Callable[[Status], str]]) -> None:
    """A table of done, failed and skipped slides (those done earlier only when few) with the given
    per-slide columns, then the failures listed."""
    from rich.table import Table

    table = Table(title=escape(title))
    table.add_column("slide")
    table.add_column("state")
    for name in columns:
        table.add_column(name, justify="right")
    table.add_column("time (s)", justify="right")
    for status in summary.done + summary.failed:
        cells = [escape(fn(status)) if status.state == "done" else "" for fn in columns.values()]
        state = "[green]done[/]" if status.state == "done" else "[red]failed[/]"
        if status.warnings:
            state += " [yellow](warnings)[/]"
        table.add_row(escape(status.slide_id), state, *cells, f"{status.seconds:.1f}")
    why = summary.why_skipped
    earlier_done = [sid for sid in summary.skipped if not why.get(sid, "").startswith("failed")]
    for sid in summary.skipped:
        if sid not in earlier_done or len(earlier_done) <= MAX_SKIPPED_ROWS:
            reason = why.get(sid, "done earlier")
            colour = "yellow" if reason.startswith("failed") else "dim"
            table.add_row(escape(sid), f"[{colour}]skipped: {escape(reason)}[/]", *[""] * len(columns), "")
    out.print(table)
    failed_before = len(summary.skipped) - len(earlier_done)
    say(
        f"{len(summary.done)} done, {len(summary.failed)} failed, {len(summary.skipped)} skipped "
        f"({len(earlier_done)} done earlier, {failed_before} failed earlier), {len(summary.busy)} busy "
        "(locked by another process)"
    )
    if failed_before:
        warn(
            f"{failed_before} slide(s) failed earlier and were not retried: fix what their error names and "
            "rerun with --retry-failed (a changed input, such as the --slide-mpp an error asked for, retries by itself)"
        )
    for status in summary.done:
        for warning in status.warnings:
            warn(f"{status.slide_id}: {warning}")
    for status in summary.failed:
        console.print(
            f"[red]failed[/] {escape(status.slide_id)}: {escape(status.error or '')}", soft_wrap=True
        )


def exit_for(summary: BatchSummary) -> None:
    """Exit non-zero when any slide failed, now or earlier (skipped without --retry-failed): the job is
    not done."""
    if not summary.ok or any(why.startswith("failed") for why in summary.why_skipped.values()):
        raise typer.Exit(1)


def layered_settings(
    ctx: typer.Context, config: Path | None, section: str, options: dict[str, tuple[tuple[str, ...], Any]]
) -> dict[str, Any]:
    """A stage's settings: the config file's ``section`` with the options given on the command line over it.

    ``options`` maps a dotted settings key (``mask.mpp``) to the command's option names that set it and
    the value they give. Without a config file every option's value (defaults included) is used.
    """
    from wsikit.config import ConfigError, load_yaml

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
    from wsikit.config import ConfigError, build

    try:
        return build(cls, data, f"{config}:{section}" if config else section)
    except ConfigError as exc:
        raise fail(str(exc)) from exc


def options_of(names: Sequence[str], values: Sequence[Any]) -> dict[str, tuple[tuple[str, ...], Any]]:
    """:func:`layered_settings` options for settings keys that are spelled like their options."""
    return {n: ((n,), v) for n, v in zip(names, values, strict=True)}
