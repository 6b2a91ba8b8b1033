"""`wsikit train` and `wsikit evaluate`: slide-level models on feature bags, patient-level k-fold."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from wsikit.cli.common import (
    THREADS_HELP,
    build_settings,
    console,
    fail,
    layered_settings,
    options_of,
    out,
    warn,
)

TRAIN_NAMES = ("model", "epochs", "lr", "weight_decay", "schedule", "patience", "min_epochs", "monitor", "balance",
               "accumulate", "max_tiles", "folds", "test_fraction", "seed", "device", "threshold", "target",
               "calibrate", "bootstrap")  # fmt: skip


def _errors() -> tuple[type[Exception], ...]:
    from wsikit.bags import BagError
    from wsikit.mil.data import DataError
    from wsikit.mil.evaluate import CheckpointError
    from wsikit.mil.registry import ModelError
    from wsikit.mil.train import TrainError
    from wsikit.runtime import DeviceError
    from wsikit.splits import SplitError

    return (DataError, BagError, SplitError, TrainError, ModelError, CheckpointError, DeviceError)


def _list_models(value: bool) -> None:
    if value:
        from rich.table import Table

        from wsikit.mil.registry import list_models

        table = Table(title="models")
        table.add_column("name")
        table.add_column("what")
        for name, desc in list_models().items():
            table.add_row(name, desc)
        out.print(table)
        raise typer.Exit()


def _model_opts(items: list[str]) -> dict:
    opts = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise fail(f"--model-opt {item!r}: use key=value, e.g. dropout=0.1")
        try:
            opts[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            opts[key.strip()] = value
    return opts


def train(
    ctx: typer.Context,
    bags: Path = typer.Argument(
        ..., help="Job directory (uses <job>/bags/<spec>/<encoder>/) or a folder of bags."
    ),
    labels: Path = typer.Option(..., "--labels", "-l", help="CSV/TSV with slide_id, patient_id, label."),
    out_dir: Path = typer.Option(
        ..., "--out", "-o", help="Run directory for checkpoints, splits and reports."
    ),
    config: Path | None = typer.Option(
        None, "--config", help="YAML config whose 'mil' section sets defaults; options given here win."
    ),
    model: str = typer.Option("abmil-gated", "--model", "-m", help="Model name (see --list-models)."),
    model_opt: list[str] = typer.Option(
        [], "--model-opt", help="Model option key=value (repeat), e.g. dropout=0.1."
    ),
    folds: int = typer.Option(5, "--folds", "-k", help="Patient-level stratified folds."),
    test_fraction: float = typer.Option(
        0.0, "--test-fraction", help="Hold out this fraction of each class's patients as a test set."
    ),
    test_split: Path | None = typer.Option(
        None, "--test-split", help="CSV of test slides (slide_id[, split=test]) instead of --test-fraction."
    ),
    splits: Path | None = typer.Option(
        None, "--splits", help="Use folds from a splits CSV (slide_id, fold, split)."
    ),
    fold: list[int] = typer.Option(
        [],
        "--fold",
        help="Train only these folds (repeat; one cluster job per fold), then run once without it to report.",
    ),
    epochs: int = typer.Option(50, "--epochs"),
    lr: float = typer.Option(2e-4, "--lr"),
    weight_decay: float = typer.Option(1e-4, "--weight-decay"),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine | plateau | none"),
    patience: int = typer.Option(
        10, "--patience", help="Stop after this many epochs without validation improvement."
    ),
    min_epochs: int = typer.Option(5, "--min-epochs"),
    monitor: str = typer.Option("loss", "--monitor", help="loss | auroc on the validation fold."),
    balance: str = typer.Option(
        "loss", "--balance", help="loss (class-weighted) | sampler (balanced) | none"
    ),
    max_tiles: int | None = typer.Option(
        None, "--max-tiles", help="Randomly subsample larger training bags to this many tiles."
    ),
    accumulate: int = typer.Option(1, "--accumulate", help="Bags per optimizer step."),
    threshold: str = typer.Option(
        "youden", "--threshold", help="youden | sensitivity | specificity (chosen on validation)."
    ),
    target: float = typer.Option(0.9, "--target", help="Target sensitivity/specificity for --threshold."),
    calibrate: bool = typer.Option(
        True, "--calibrate/--no-calibrate", help="Temperature scaling fitted on validation."
    ),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for test CIs (0: none)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:1 ..."),
    workers: int = typer.Option(0, "--workers", help="DataLoader worker processes reading bags."),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
    spec: str | None = typer.Option(None, "--spec", help="Tile spec folder when the job has several."),
    encoder: str | None = typer.Option(None, "--encoder", help="Encoder folder when the job has several."),
    classes: str | None = typer.Option(
        None, "--classes", help="Comma-separated class order (default: sorted)."
    ),
    label_col: str = typer.Option("label", "--label-col"),
    patient_col: str = typer.Option("patient_id", "--patient-col"),
    skip_missing: bool = typer.Option(
        False, "--skip-missing", help="Leave out labelled slides without a bag."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete this run's previous results first."),
    list_models_: bool = typer.Option(
        False, "--list-models", callback=_list_models, is_eager=True, help="List models and exit."
    ),
) -> None:
    """Train a slide-level model with patient-level k-fold CV; resumable; reports with mean ± std."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from wsikit.mil.train import TrainConfig
    from wsikit.mil.workflow import BagSource, train_from_job
    from wsikit.runtime import set_threads

    values = [model, epochs, lr, weight_decay, schedule, patience, min_epochs, monitor, balance, accumulate,
              max_tiles, folds, test_fraction, seed, device, threshold, target, calibrate, bootstrap]  # fmt: skip
    options = options_of(TRAIN_NAMES, values)
    options["model_kwargs"] = (("model_opt",), _model_opts(model_opt))
    options["num_workers"] = (("workers",), workers)
    cfg = build_settings(TrainConfig, layered_settings(ctx, config, "mil", options), config, "mil")
    set_threads(threads)
    source = BagSource(bags, labels, spec, encoder, label_col, patient_col, classes.split(",") if classes else None,
                       skip_missing)  # fmt: skip

    def on_data(data) -> None:
        for w in data.warnings:
            warn(w)
        console.print(
            f"{len(data.paths)} slides, {len(set(data.table.patients))} patients, classes "
            f"{data.table.class_names}, {data.dim}-d features; model {cfg.model}, {cfg.folds} folds",
            highlight=False,
        )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        tasks: dict[int, int] = {}

        def on_epoch(k: int, rec: dict) -> None:
            tasks.setdefault(k, progress.add_task(f"fold {k}", total=cfg.epochs))
            mark = "*" if rec["improved"] else " "
            progress.update(
                tasks[k], completed=rec["epoch"] + 1,
                description=f"fold {k} loss {rec['train_loss']:.3f} val {rec['val_loss']:.3f} "
                f"AUROC {rec['val_auroc']:.3f}{mark}",
            )  # fmt: skip

        try:
            report = train_from_job(
                source, out_dir, cfg, splits, test_split, fold or None, overwrite, on_data, on_epoch
            )
        except _errors() as exc:
            raise fail(str(exc)) from exc
    if not report["complete"]:
        console.print(
            f"folds done: {report['folds_done']} of {report['n_folds']}; run again without --fold to report"
        )
        return
    _print_report(report, list(report["class_counts"]))
    out.print(f"report: {Path(out_dir) / 'report.md'}")


def _print_report(report: dict, class_names: list[str]) -> None:
    from rich.table import Table

    from wsikit.mil.evaluate import headline_keys
    from wsikit.reports import fmt_value

    table = Table(title=f"{report['model']}: {report['n_slides']} slides, {report['folds']} folds")
    table.add_column("metric")
    table.add_column("validation mean ± std", justify="right")
    has_test = "test_ensemble" in report
    if has_test:
        table.add_column("test mean ± std", justify="right")
        table.add_column("test ensemble [95% CI]", justify="right")
    for k in headline_keys(len(class_names)):
        row = [k, fmt_value(report["val_mean_std"].get(k))]
        if has_test:
            ens = report["test_ensemble"]
            ci = ens.get("auroc_ci" if k.startswith("auroc") else f"{k}_ci")
            row += [
                fmt_value(report["test_mean_std"].get(k)),
                fmt_value(ens.get(k)) + (f" {fmt_value(ci)}" if ci else ""),
            ]
        table.add_row(*row)
    out.print(table)


def evaluate(
    run_dir: Path = typer.Argument(..., help="Run directory of `wsikit train` (or one fold_<k> folder)."),
    bags: Path = typer.Option(..., "--bags", "-b", help="Job directory or folder of bags of the new slides."),
    labels: Path | None = typer.Option(
        None, "--labels", "-l", help="Labels table: also score the predictions."
    ),
    out_dir: Path | None = typer.Option(
        None, "--out", "-o", help="Where to write (default RUN_DIR/evaluate)."
    ),
    spec: str | None = typer.Option(None, "--spec"),
    encoder: str | None = typer.Option(None, "--encoder"),
    label_col: str = typer.Option("label", "--label-col"),
    patient_col: str = typer.Option("patient_id", "--patient-col"),
    skip_missing: bool = typer.Option(
        False, "--skip-missing", help="Leave out labelled slides without a bag."
    ),
    bootstrap: int = typer.Option(1000, "--bootstrap"),
    device: str = typer.Option("auto", "--device"),
    workers: int = typer.Option(0, "--workers"),
    threads: int | None = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Apply the trained fold models (validation-calibrated, validation thresholds) to new slides."""
    from wsikit.mil.evaluate import headline_keys
    from wsikit.mil.workflow import BagSource, evaluate_from_job
    from wsikit.reports import fmt_value
    from wsikit.runtime import set_threads

    set_threads(threads)
    source = BagSource(bags, labels, spec, encoder, label_col, patient_col, skip_missing=skip_missing)
    try:
        result = evaluate_from_job(run_dir, source, out_dir, device, workers, bootstrap, on_warning=warn)
    except _errors() as exc:
        raise fail(str(exc)) from exc
    out.print(f"{result['n_slides']} slides × {len(result['folds'])} fold models → {result['predictions']}")
    if "ensemble" in result:
        ens = result["ensemble"]
        keys = headline_keys(len(result["class_names"]))
        out.print(
            "  ".join(f"{k} {fmt_value(ens.get(k))}" for k in keys[:5])
            + f"  (AUROC 95% CI {fmt_value(ens.get('auroc_ci'))})"
        )
        out.print(f"report: {Path(result['predictions']).parent / 'report.md'}")
