"""`wsikit`: the command-line front of the library.

Commands are registered here in pipeline order (the order `wsikit --help` lists them). Every command module
imports the library inside its commands, so `wsikit --help`, `--version`, `status` and `config show`
start without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from wsikit import __version__
from wsikit.cli import (
    bags,
    batch,
    detect,
    embed,
    encoders,
    extract,
    heatmap,
    patches,
    run,
    stain,
    tile,
    train,
    view,
)
from wsikit.cli.common import console, fail, out, slide_mpp_from

app = typer.Typer(
    name="wsikit",
    help="Whole-slide images → tissue masks → tiles → feature bags → slide-level models → heatmaps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        out.print(f"wsikit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """wsikit: whole-slide pathology pipelines that are correct, fast and resumable."""


def _facts_table(facts: list[dict]) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="slides")
    for col in ("slide", "backend", "vendor", "levels (w×h @ downsample)", "MPP (µm/px)", "mag", "objective"):
        table.add_column(col)
    for f in facts:
        levels = "\n".join(
            f"{w}×{h} @ {ds:g}"
            for (w, h), ds in zip(f["level_dimensions"], f["level_downsamples"], strict=True)
        )
        mpp = f"{f['mpp'][0]:.4g} × {f['mpp'][1]:.4g}\n({f['mpp_source']})" if f["mpp"] else "[red]missing[/]"
        mag = f"{f['magnification']:g}x" if f["magnification"] else "-"
        objective = f"{f['objective_power']:g}x" if f["objective_power"] else "-"
        table.add_row(
            escape(f["slide_id"]), f["backend"], escape(f["vendor"] or "-"), levels, mpp, mag, objective
        )
    out.print(table)


def info(
    slides: list[Path] = typer.Argument(..., help="Slide files."),
    slide_mpp: float | None = typer.Option(
        None, "--slide-mpp", help="Override the slides' resolution (µm/px)."
    ),
    old_mpp: float | None = typer.Option(None, "--mpp", hidden=True),
    backend: str = typer.Option("auto", help="auto | openslide | tiffslide"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Print each slide's reader, levels, resolution (MPP) and magnification."""
    from wsikit.slide import describe_slides

    facts, errors = describe_slides(slides, backend, slide_mpp_from(slide_mpp, old_mpp))  # type: ignore[arg-type]
    if as_json:
        out.print_json(json.dumps({"slides": facts, "errors": errors}))
    else:
        _facts_table(facts)
        for f in facts:
            if not f["mpp"]:
                console.print(
                    f"[yellow]{f['path']}: no MPP in the file; pass --slide-mpp (tile, run, info) or add an "
                    "'mpp' column to a slide list[/]",
                    highlight=False,
                )
    for message in errors:
        fail(message)
    if errors:
        raise typer.Exit(1)


def demo(
    out_dir: Path = typer.Option(Path("demo_out"), "--out", help="Where to write the results."),
    labelled: bool = typer.Option(
        True, "--labelled/--no-labelled", help="Also run the PneumoniaMNIST example."
    ),
    full: bool = typer.Option(
        False,
        "--full",
        help="The documented PneumoniaMNIST run (all 3,882 training images, 2 epochs: about 7 min on 2 cores) "
        "instead of the quick one (600 images, 1 epoch: about 1 min).",
    ),
) -> None:
    """Run the pipeline on the bundled real slide (CMU-1-Small-Region.svs) and say what was written
    (one to two minutes on 2 CPU cores; --full: about 8)."""
    from rich.markup import escape

    from wsikit.demo import run_demo

    result = run_demo(
        out_dir, labelled=labelled, say=lambda text: console.print(f"[cyan]·[/] {escape(text)}"), full=full
    )
    f = result.facts
    out.print(
        f"[bold]{f['slide_id']}[/]: {f['dimensions'][0]}×{f['dimensions'][1]} px, {f['level_count']} level(s), "
        f"MPP {f['mpp'][0]:g} µm/px ({f['mpp_source']}), {f['magnification']:g}x, vendor {f['vendor']}"
    )
    for name, value in result.numbers.items():
        out.print(f"  {name:<28} {value}")
    out.print("[bold]written:[/]")
    for name, path in result.written.items():
        out.print(f"  {name:<28} {path}")
    out.print(
        f"[bold]next:[/] the slide, its mask and tiles in the browser: wsikit view {result.written['job directory']}"
    )


app.command()(info)
app.command("tile")(tile.tile)
app.add_typer(stain.app, name="stain")
app.command("extract")(extract.extract)
app.command("embed")(embed.embed)
app.command("train")(train.train)
app.command("evaluate")(train.evaluate)
app.command("heatmap")(heatmap.heatmap)
app.command("view")(view.view)
app.command("run")(run.run)
app.command("slurm")(run.slurm)
app.command()(batch.status)
app.add_typer(run.config_app, name="config")
app.add_typer(encoders.app, name="encoders")
app.add_typer(bags.app, name="bags")
app.add_typer(patches.app, name="patches")
app.add_typer(detect.app, name="detect")
app.command()(demo)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
