"""Per-tile score layers: a trained run's attention / tile scores, or a ``wsikit heatmap`` scores CSV.

A run (``wsikit train`` output, or one ``fold_<k>``) scores the slide's bag from the job: the bag named by
the run's provenance (``bags/<spec_name>/<encoder>/<id>.h5``), else the slide's only bag in the job. The
scores are :func:`wsikit.heatmap.model_tile_scores` (folds averaged) rank-normalised as ``wsikit heatmap``
does by default, coloured with the same colour map (jet), so the viewer and the heatmap PNG agree. A
heatmap folder holds ``<id>_scores.csv`` or ``<id>/<name>_scores.csv`` as ``wsikit heatmap --out`` writes
them; its ``score_norm`` column is drawn.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsikit.bags import BagError, bag_path
from wsikit.io import read_table
from wsikit.jobs import JobError
from wsikit.view.base import SlideRecord, ViewError, inside, pack, tile_arrays

if TYPE_CHECKING:
    from wsikit.view.data import ViewJob

CMAP = "jet"
CSV_COLUMNS = ("x", "y", "width", "score", "score_norm")


def colour_table(cmap: str = CMAP) -> np.ndarray:
    """(256, 3) uint8: the colour of each normalised score step (``value × 255`` rounded)."""
    import matplotlib

    return matplotlib.colormaps[cmap](np.linspace(0, 1, 256), bytes=True)[:, :3]


def _has_model(run: Path) -> bool:
    return (run / "best.pt").is_file() or any((p / "best.pt").is_file() for p in run.glob("fold_*"))


@dataclass
class ScoreSource:
    """Where one score layer comes from, with the payloads computed so far (one per slide)."""

    label: str
    kind: str  # "run" | "heatmap"
    path: Path
    provenance: dict[str, Any] = field(default_factory=dict)
    _cache: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def for_run(cls, run: Path) -> ScoreSource:
        if not run.is_dir() or not _has_model(run):
            raise ViewError(
                f"{run}: no trained model (best.pt or fold_<k>/best.pt); give a `wsikit train --out` folder"
            )
        config = run / "config.json" if (run / "config.json").is_file() else run.parent / "config.json"
        provenance = {}
        if config.is_file():
            try:
                provenance = json.loads(config.read_text()).get("provenance") or {}
            except (OSError, ValueError) as exc:
                raise ViewError(f"{config}: unreadable run config ({exc}); is the run complete?") from exc
        name = f"{run.parent.name}/{run.name}" if run.name.startswith("fold_") else run.name
        return cls(f"model {name}", "run", run, provenance)

    @classmethod
    def for_heatmaps(cls, folder: Path) -> ScoreSource:
        if not folder.is_dir():
            raise ViewError(f"{folder}: no such folder; give the folder of `wsikit heatmap --out` outputs")
        return cls(f"heatmap {folder.name}", "heatmap", folder)

    # -- which file serves a slide ---------------------------------------------------------------------
    def bag_for(self, rec: SlideRecord, job: ViewJob) -> Path | None:
        """The slide's bag this run scores: the one its provenance names, else the slide's only bag."""
        attrs = self.provenance.get("attrs") or {}
        spec, encoder = attrs.get("spec_name"), attrs.get("encoder")
        if spec and encoder:
            path = bag_path(job.job, str(spec), str(encoder), rec.slide_id)
            return path if job.job_file(*path.relative_to(job.job).parts) else None
        found = [
            p
            for suffix in ("h5", "zarr")
            for p in sorted((job.job / "bags").glob(f"*/*/{rec.slide_id}.{suffix}"))
            if inside(p, job.job / "bags")
        ]
        return found[0] if len(found) == 1 else None

    def csv_for(self, rec: SlideRecord) -> Path | None:
        """``<folder>/<id>_scores.csv``, else the only ``<folder>/<id>/*_scores.csv``."""
        direct = self.path / f"{rec.slide_id}_scores.csv"
        found = [direct] if direct.is_file() else sorted((self.path / rec.slide_id).glob("*_scores.csv"))
        found = [p for p in found if p.is_file() and inside(p, self.path)]
        return found[0] if len(found) == 1 else None

    def has(self, rec: SlideRecord, job: ViewJob) -> bool:
        return (self.bag_for(rec, job) if self.kind == "run" else self.csv_for(rec)) is not None

    def cached_prediction(self, rec: SlideRecord) -> dict[str, Any] | None:
        """The slide-level prediction once the slide has been scored (runs only), else None."""
        payload = self._cache.get(rec.key)
        return payload.get("prediction") if payload else None

    # -- payloads --------------------------------------------------------------------------------------
    def payload(self, rec: SlideRecord, job: ViewJob) -> dict[str, Any]:
        """The slide's score layer (computed once, then cached); ``KeyError`` when this source lacks it."""
        with self._lock:
            if rec.key not in self._cache:
                self._cache[rec.key] = self._compute(rec, job)
            return self._cache[rec.key]

    def _compute(self, rec: SlideRecord, job: ViewJob) -> dict[str, Any]:
        if self.kind == "run":
            coords, raw, norm, size0, prediction = self._from_run(rec, job)
        else:
            coords, raw, norm, size0, prediction = self._from_csv(rec)
        from scipy.stats import rankdata

        rank = rankdata(-raw, method="min").astype(np.int32) if len(raw) else np.zeros(0, np.int32)
        return {
            "kind": "scores",
            "label": self.label,
            "source": str(self.path.name),
            **tile_arrays(coords, size0),
            "value": pack(norm, "float32"),
            "raw": pack(raw, "float32"),
            "rank": pack(rank, "int32"),
            "lut": pack(colour_table(), "uint8"),
            "legend": "score rank (0 = lowest, 1 = highest)" if self.kind == "run" else "score_norm",
            "prediction": prediction,
        }

    def _from_run(self, rec: SlideRecord, job: ViewJob) -> tuple:
        from wsikit.mil.evaluate import CheckpointError
        from wsikit.stages.heatmap import HeatmapError, model_tile_scores, normalize_scores

        bag = self.bag_for(rec, job)
        if bag is None:
            raise KeyError(self.label)
        try:
            ts, info = model_tile_scores(self.path, bag, device="cpu")
        except (HeatmapError, CheckpointError, BagError) as exc:
            raise ViewError(str(exc)) from exc
        probs = info["probabilities"]
        best = max(probs, key=probs.get)
        prediction = {
            "class": best,
            "p": round(probs[best], 4),
            "probabilities": probs,
            "model": info["model"],
        }
        return ts.coords, ts.scores, normalize_scores(ts.scores, "rank"), ts.size_level0, prediction

    def _from_csv(self, rec: SlideRecord) -> tuple:
        path = self.csv_for(rec)
        if path is None:
            raise KeyError(self.label)
        try:
            rows = read_table(path, "heatmap scores CSV")
        except JobError as exc:
            raise ViewError(str(exc)) from exc
        missing = [c for c in CSV_COLUMNS if rows and c not in rows[0]]
        if missing:
            raise ViewError(
                f"{path}: no column(s) {', '.join(missing)}; give a `wsikit heatmap` *_scores.csv"
            )
        try:
            coords = np.array([[int(r["x"]), int(r["y"])] for r in rows], np.int64).reshape(-1, 2)
            raw = np.array([float(r["score"]) for r in rows], np.float64)
            norm = np.array([float(r["score_norm"]) for r in rows], np.float32)
            size0 = int(rows[0]["width"]) if rows else 1
        except ValueError as exc:
            raise ViewError(f"{path}: unreadable scores CSV ({exc}); re-run `wsikit heatmap`") from exc
        return coords, raw, np.clip(norm, 0, 1), size0, None
