"""`wsikit encoders`: list the registered encoders; `wsikit encoders check NAME` builds and runs one."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from wsikit.cli.common import console, fail, out

app = typer.Typer(
    help="The tile encoders wsikit can build (offline), and a check of one.", no_args_is_help=False
)


@app.callback(invoke_without_command=True)
def encoders(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """List every registered encoder: size, input, resolution, licence, gating, extra, weights here."""
    if ctx.invoked_subcommand is not None:
        return
    from wsikit.encoders.check import catalog_rows

    rows = catalog_rows()
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="encoders (`wsikit encoders check NAME` builds one; docs/encoders.md)")
    for col in ("name", "dim", "params (M)", "input", "µm/px", "licence", "gated", "extra", "weights"):
        table.add_column(
            col, justify="right" if col in ("dim", "params (M)", "input", "µm/px") else "left", no_wrap=True
        )
    for r in rows:
        table.add_row(
            r["name"], str(r["dim"]), f"{r['params_m']:g}" if r["params_m"] else "-", str(r["input"]),
            f"{r['mpp']:g}" if r["mpp"] else "-", r["licence"], r["gated"], r["extra"], r["weights"],
        )  # fmt: skip
    (out if out.is_terminal else Console(width=160)).print(table)  # a pipe gets every column
    console.print("timm:<model> and timm:hf-hub:<repo> are accepted too.")


@app.command()
def check(
    name: str = typer.Argument(..., help="Registered encoder name (see `wsikit encoders`)."),
    weights: str | None = typer.Option(
        None, "--weights", help="Local checkpoint or downloaded repository folder."
    ),
    random_weights: bool = typer.Option(False, "--random-weights", help="Do not look for weights."),
    batch: int = typer.Option(4, "--batch-size", "-b", help="Tiles per timed batch."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Build NAME (its weights when present, else random), run a batch, print dim, parameters, tiles/s."""
    from wsikit.encoders import EncoderError
    from wsikit.encoders.check import check_encoder

    try:
        result = check_encoder(name, weights, batch=batch, random_weights=random_weights)
    except EncoderError as exc:
        raise fail(str(exc)) from exc
    if as_json:
        out.print_json(json.dumps(result))
        return
    out.print(
        f"[bold]{result['name']}[/]: {result['dim']}-d ({result['embedding']}), {result['params']:,} parameters, "
        f"{result['input']} px input, {result['tiles_per_s']} tiles/s on {result['threads']} CPU thread(s), "
        f"weights {result['weights_id']}"
    )
    if result["note"]:
        console.print(f"[yellow]{result['note']}[/]")
