"""`wsikit view`: a job's slides in the browser, with masks, tile grids and model scores on top."""

from __future__ import annotations

import socket
from pathlib import Path

import typer

from wsikit.cli.common import console, fail, out

MISSING_EXTRA = "wsikit view needs the viewer extra: pip install 'wsikit[view]' (Starlette and uvicorn)"


def view(
    job: Path = typer.Argument(..., help="Job directory (`wsikit tile/run --out`)."),
    slides: list[str] = typer.Option(
        [],
        "--slides",
        help="Only these slides, and where their files are: files, folders, globs or a CSV list.",
    ),
    run: list[Path] = typer.Option(
        [], "--run", help="A `wsikit train` run or fold: per-tile scores and predictions (repeat to compare)."
    ),
    heatmaps: list[Path] = typer.Option(
        [], "--heatmaps", help="A folder of `wsikit heatmap` outputs (<id>_scores.csv or <id>/*_scores.csv)."
    ),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port)."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface; 0.0.0.0 serves other machines (token required)."
    ),
    no_token: bool = typer.Option(False, "--no-token", help="Serve without a token (loopback host only)."),
    export: Path | None = typer.Option(
        None, "--export", help="Write a static folder (open index.html from disk) instead of serving."
    ),
    export_mpp: float | None = typer.Option(
        None,
        "--export-mpp",
        help="Finest resolution exported (µm/px, e.g. 1.0): each doubling quarters the size.",
    ),
) -> None:
    """Open a job's slides in the browser: deep zoom, tissue masks, tile grids, scores, top/bottom tiles."""
    from wsikit.jobs import JobError, resolve_slides
    from wsikit.slide import SlideError
    from wsikit.view.base import ViewError
    from wsikit.view.data import ViewJob

    try:
        entries = resolve_slides(slides) if slides else None
        data = ViewJob(job, entries, run, heatmaps)
        if export is not None:
            from wsikit.view.export import export_job

            summary = export_job(data, export, export_mpp, say=lambda t: console.print(f"[cyan]·[/] {t}"))
            out.print(f"wrote {summary['tiles']} picture tiles for {summary['slides']} slide(s) to {export}")
            out.print(
                f"open {export / 'index.html'} in a browser (it works from disk: copy the folder anywhere)"
            )
            return
        _serve(data, host, port, no_token)
    except (ViewError, JobError, SlideError) as exc:
        raise fail(str(exc)) from exc


def _serve(data, host: str, port: int, no_token: bool) -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise fail(MISSING_EXTRA) from exc
    from wsikit.view.app import bind, build_app, is_loopback, make_server, new_token, warm_predictions

    token = None if no_token else new_token()
    app = build_app(data, token, host)
    sock = bind(host, port)
    port = sock.getsockname()[1]
    query = f"/?token={token}" if token else "/"
    if is_loopback(host):
        out.print(
            f"wsikit view: {len(data.slides)} slide(s) of {data.job} at http://127.0.0.1:{port}{query}",
            soft_wrap=True,
        )
        out.print(
            f"  from another computer: ssh -L {port}:localhost:{port} {socket.gethostname()}, "
            f"then open http://localhost:{port}{query}",
            soft_wrap=True,
        )
    else:
        out.print(
            f"wsikit view: {len(data.slides)} slide(s) at http://{socket.getfqdn()}:{port}{query}",
            soft_wrap=True,
        )
        out.print(
            "  [yellow]served beyond this machine: share the URL only with people who may see the data[/]"
        )
    out.print("  Ctrl+C stops it")
    if data.sources:
        warm_predictions(data)
    make_server(app).run(sockets=[sock])
