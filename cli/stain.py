"""`wsikit stain fit` and `wsikit stain apply`: fit a stain normalizer to target images, apply it to tiles."""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path

import typer

from wsikit.cli.common import console, fail, out

app = typer.Typer(
    help="Stain normalization (Macenko, Vahadane, Reinhard): fit to a target, apply to tiles.",
    no_args_is_help=True,
)


def _parse_params(method: str, pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings → the method's typed parameters."""
    from wsikit.stain.base import normalizer_class

    types = {f.name: f.type for f in fields(normalizer_class(method).params_type)}
    params: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types:
            raise fail(f"--set {pair!r}: use KEY=VALUE with KEY one of {', '.join(types)}")
        kind = str(types[key])
        try:
            params[key] = int(value) if kind == "int" else float(value) if kind == "float" else value
        except ValueError:
            raise fail(f"--set {pair!r}: {key} takes a {kind}") from None
    return params


@app.command("fit")
def fit_cmd(
    targets: list[Path] = typer.Argument(..., help="Target image(s): their tissue pixels are pooled."),
    method: str = typer.Option("macenko", "--method", "-m", help="macenko | vahadane | reinhard"),
    output: Path = typer.Option(..., "--out", "-o", help="Where to write the normalizer (JSON)."),
    source: str | None = typer.Option(
        None,
        help="tile: estimate each tile's stains; slide: once per slide (default: vahadane slide, others tile).",
    ),
    min_tissue: float | None = typer.Option(
        None, help="Tiles with less tissue than this fraction pass through."
    ),
    set_: list[str] = typer.Option([], "--set", help="Method parameter KEY=VALUE (repeatable), e.g. io=255."),
) -> None:
    """Fit a stain normalizer to target image(s) and save it as JSON (`wsikit stain apply`, `--stain`)."""
    from wsikit.stain import StainError, fit_normalizer

    try:
        params = _parse_params(method, set_)
        if source is not None:
            params["source"] = source
        if min_tissue is not None:
            params["min_tissue"] = min_tissue
        norm = fit_normalizer(method, [str(t) for t in targets], **params)
        norm.save(output)
    except StainError as exc:
        raise fail(str(exc)) from exc
    d = norm.describe()
    out.print(f"[bold]{norm.method}[/] fitted to {len(targets)} image(s) → {output}")
    for key, value in d["target"].items():
        out.print(f"  {key}: {json.dumps(value)}", highlight=False)
    out.print(f"  params: {json.dumps(d['params'])}", highlight=False)


@app.command("apply")
def apply_cmd(
    normalizer_json: Path = typer.Argument(..., help="A normalizer written by `wsikit stain fit`."),
    images: list[Path] = typer.Argument(..., help="Image files, folders of tiles (recursive) or globs."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder (same names and formats)."),
    batch: int = typer.Option(64, help="Tiles per batch."),
    device: str = typer.Option("cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps."),
    sample: int = typer.Option(64, help="Images sampled for a slide-level source estimate (vahadane)."),
    overwrite: bool = typer.Option(False, help="Rewrite outputs that exist (default: skip them, resume)."),
    compile_: bool = typer.Option(
        False, "--compile", help="Fuse the pixel work with torch.compile (long runs)."
    ),
    qc: bool = typer.Option(True, help="Write <out>/stain_qc.png: source | target | result."),
    target_image: Path | None = typer.Option(
        None, help="Target image for the QC picture (default: the fitted one)."
    ),
) -> None:
    """Normalize images with a fitted normalizer; tiles with too little tissue are copied unchanged."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from wsikit.stain import StainError, load_normalizer
    from wsikit.stain.files import find_images, normalize_files, qc_figure

    try:
        norm = load_normalizer(normalizer_json).compile(compile_)
        total = len(find_images(images))
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        t0 = time.perf_counter()
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(f"stain {norm.method}", total=total)
            result = normalize_files(
                norm, images, out_dir, batch, device, sample, overwrite, lambda k: progress.advance(task, k)
            )
        seconds = time.perf_counter() - t0
        qc_path = None
        if qc and result.examples:
            target = target_image or (Path(norm.fitted_on[0]) if norm.fitted_on else None)
            qc_path = qc_figure(norm, result.examples, out_dir / "stain_qc.png", target)
    except StainError as exc:
        raise fail(str(exc)) from exc
    n = len(result.written)
    rate = f", {n / seconds:.1f} images/s" if n and seconds > 0 else ""
    out.print(
        f"{n} normalized → {out_dir} ({seconds:.1f} s{rate}); {len(result.passed_through)} passed through "
        f"unchanged (too little tissue); {len(result.skipped)} skipped (already there; --overwrite to redo)"
    )
    for path in result.passed_through[:10]:
        console.print(f"[yellow]passed through[/] {path}", highlight=False)
    if qc_path:
        out.print(f"QC picture: {qc_path}")
