"""`wsikit bags`: inspect feature bags of any supported layout and export them to the peers' layouts."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from wsikit.cli.common import console, fail, out

app = typer.Typer(help="Inspect and export feature bags.", no_args_is_help=True)


@app.command()
def inspect(
    paths: list[Path] = typer.Argument(..., help="Bag files or folders of bags."),
    as_json: bool = typer.Option(False, "--json", help="Print every attribute as JSON."),
) -> None:
    """Shape, layout, encoder and tile spec of each bag."""
    from rich.markup import escape
    from rich.table import Table

    from wsikit.bags import BagError, bag_files, read_bag

    table = Table(title="feature bags")
    for col in ("bag", "layout", "tiles × dim", "dtype", "encoder", "spec", "skipped"):
        table.add_column(col)
    dumps, failed = {}, False
    for path in bag_files(paths):
        try:
            bag = read_bag(path)
        except BagError as exc:
            console.print(f"[red]error[/] {escape(str(exc))}", highlight=False)
            failed = True
            continue
        a = bag.attrs
        dumps[str(path)] = {"shape": list(bag.features.shape), "attrs": a, "coords_attrs": bag.coords_attrs}
        table.add_row(
            escape(str(path)),
            str(a.get("source_format")),
            f"{len(bag)} × {bag.dim}",
            str(bag.features.dtype),
            str(a.get("encoder", a.get("extractor", "-"))),
            str(a.get("tile_spec", "-")),
            str(a.get("n_skipped", "-")),
        )
    if as_json:
        out.print_json(json.dumps(dumps, default=str))
    else:
        out.print(table)
    if failed:
        raise typer.Exit(1)


@app.command()
def export(
    paths: list[Path] = typer.Argument(..., help="wsikit bag files or folders of them."),
    layout: str = typer.Option(..., "--to", help="clam | trident | stamp | slideflow"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Destination folder."),
    slide_mpp: float | None = typer.Option(None, "--slide-mpp", help="µm/px for bags that lack it."),
    id_from: str = typer.Option(
        "auto",
        "--id-from",
        help="auto (the bag's slide_id, else its file name) | stem (file name) | parent (folder name, for "
        "slideA/features.h5 layouts). Two bags with one id are refused.",
    ),
) -> None:
    """Write bags in CLAM (h5_files + pt_files), TRIDENT, STAMP or slideflow layout (docs/feature-bag.md:
    what each export guarantees and refuses)."""
    from wsikit.bags import EXPORT_LAYOUTS, BagError, bag_files, export_bags

    if layout not in EXPORT_LAYOUTS:
        raise fail(f"--to {layout!r}: choose one of {', '.join(EXPORT_LAYOUTS)}")
    files = bag_files(paths)
    if not files:
        raise fail(f"no bags found in {' '.join(map(str, paths))}")
    try:
        written = export_bags(files, layout, out_dir, slide_mpp, id_from)
    except BagError as exc:
        raise fail(str(exc)) from exc
    console.print(f"{len(files)} bag(s) → {out_dir} ({layout}, {len(written)} files)", highlight=False)


@app.command()
def shape(paths: list[Path] = typer.Argument(..., help="Bag files or folders.")) -> None:
    """Print N and D of each bag without loading its features."""
    from wsikit.bags import BagError, bag_files, read_bag_shape

    for path in bag_files(paths):
        try:
            n, d = read_bag_shape(path)
        except BagError as exc:
            raise fail(str(exc)) from exc
        out.print(f"{path}\t{n}\t{d}")
