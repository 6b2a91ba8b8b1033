"""`wsikit embed`: one vector per slide from a job's feature bags (mean pooling or a slide encoder)."""

from __future__ import annotations

from pathlib import Path

import typer

from wsikit.cli.common import exit_for, fail, print_summary, with_progress


def embed(
    job_dir: Path = typer.Argument(..., help="Job directory with bags from `wsikit extract`."),
    slide_encoder: str = typer.Option("mean", "--slide-encoder", help="mean (built in) or a registered one."),
    spec: str = typer.Option("", "--spec", help="Tile spec folder under bags/ (default: the only one)."),
    patch_encoder: str = typer.Option("", "--patch-encoder", help="Encoder folder under bags/<spec>/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo slides already embedded."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry slides that failed before."),
) -> None:
    """Write <job>/slide_embeddings/<slide encoder>/<spec>/<patch encoder>/<slide>.h5, resumable."""
    from wsikit.jobs import SlideEntry
    from wsikit.slide_embed import EmbedConfig, SlideEmbedError, resolve_bags, run_embedding

    try:
        cfg, bags = resolve_bags(job_dir, EmbedConfig(slide_encoder, spec, patch_encoder))
    except SlideEmbedError as exc:
        raise fail(str(exc)) from exc
    entries = [SlideEntry(path, slide_id) for slide_id, path in bags.items()]

    def run(chosen: list[SlideEntry], **callbacks):
        ids = [e.slide_id for e in chosen]
        return run_embedding(job_dir, cfg, ids, overwrite, retry_failed, **callbacks)[1]

    summary = with_progress("embed", entries, run)
    print_summary(
        f"wsikit embed → {job_dir}/slide_embeddings/{cfg.slide_encoder}/{cfg.spec}/{cfg.patch_encoder}",
        summary,
        {"dim": lambda s: str(s.info.get("dim", "")), "tiles": lambda s: str(s.info.get("n_tiles", ""))},
    )
    exit_for(summary)
