"""Batch commands: `wsikit status` (what is done, failed, running, pending in a job directory)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from wsikit.cli.common import fail, out


def status(
    job_dir: Path = typer.Argument(..., help="A job directory written by wsikit tile / extract / …"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Per stage: slides done / failed / running / pending, and each failure's one-line error."""
    from rich.markup import escape
    from rich.table import Table

    from wsikit.jobs import job_status

    if not job_dir.is_dir():
        raise fail(f"{job_dir}: no such job directory")
    report = job_status(job_dir)
    if as_json:
        out.print_json(json.dumps(report))
        return
    table = Table(title=escape(f"{job_dir} ({report['slides']} slides)"))
    for col in ("stage", "done", "failed", "running", "pending"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for stage, counts in report["stages"].items():
        table.add_row(stage, *(str(counts[k]) for k in ("done", "failed", "running", "pending")))
    out.print(table)
    for stage, counts in report["stages"].items():
        for slide_id, warnings in counts["warnings"].items():
            for warning in warnings:
                out.print(f"[yellow]{stage} warning[/] {escape(f'{slide_id}: {warning}')}", highlight=False)
        for slide_id, error in counts["failures"].items():
            out.print(f"[red]{stage} failed[/] {escape(f'{slide_id}: {error}')}", highlight=False)
