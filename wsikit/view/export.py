"""A static copy of the viewer: a folder that opens from disk (``index.html``), with no server.

Layout::

    index.html, config.js, static/…          the page (same files the server serves)
    data/slides.js, data/slide/<key>.js      the payloads, as scripts calling wsikitData(path, payload):
    data/slide/<key>/<layer>.js              browsers refuse fetch() of files on file:// pages
    dzi/<key>/<level>/<col>_<row>.jpeg       DeepZoom tiles, down to ``max_mpp`` when given

The folder is written under a temporary name beside the destination and renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import mimetypes
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

from wsikit.runtime import allotted_cpus
from wsikit.slide import SlideError
from wsikit.view.base import ViewError
from wsikit.view.data import ViewJob


def static_files() -> dict[str, tuple[bytes, str]]:
    """Every file of the page (``wsikit/view/static``) by its relative name, read once, with its media type."""
    table: dict[str, tuple[bytes, str]] = {}

    def walk(node: Any, prefix: str) -> None:
        for child in node.iterdir():
            name = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, f"{name}/")
            elif child.is_file() and not child.name.startswith("."):
                kind = mimetypes.guess_type(child.name)[0] or "application/octet-stream"
                table[name] = (child.read_bytes(), "text/javascript" if name.endswith(".js") else kind)

    walk(resources.files("wsikit.view") / "static", "")
    return table


def data_script(path: str, payload: Any) -> str:
    """A script that hands ``payload`` to the page: ``wsikitData("<path>", {...});``."""
    return f"wsikitData({json.dumps(path)}, {json.dumps(payload, separators=(',', ':'))});\n"


def finest_level(max_level: int, slide_mpp: float | None, max_mpp: float | None) -> int:
    """The finest DeepZoom level to export: every level, or the first at least as coarse as ``max_mpp``."""
    if not max_mpp or not slide_mpp or max_mpp <= slide_mpp:
        return max_level
    return max(0, max_level - math.floor(math.log2(max_mpp / slide_mpp) + 1e-9))


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)


def _export_slide(job: ViewJob, key: str, root: Path, max_mpp: float | None, pool: ThreadPoolExecutor) -> int:
    meta = job.meta(key)
    dz = job.deepzoom(key)
    levels = finest_level(dz.max_level, meta["dzi"]["mpp"], max_mpp)
    meta["dzi"]["levels"] = levels
    _write(root / "data" / "slide" / f"{key}.js", data_script(f"slide/{key}", meta))
    for layer in meta["layers"]:
        name = layer["name"]
        payload = job.layer(key, name)
        _write(root / "data" / "slide" / key / f"{name}.js", data_script(f"slide/{key}/{name}", payload))
    jobs = []
    for level in range(levels + 1):
        cols, rows = dz.tile_count(level)
        (root / "dzi" / key / str(level)).mkdir(parents=True, exist_ok=True)
        for col in range(cols):
            for row in range(rows):
                dest = root / "dzi" / key / str(level) / f"{col}_{row}.jpeg"
                jobs.append(pool.submit(lambda d=dest, a=(level, col, row): d.write_bytes(dz.tile(*a))))
    for j in jobs:
        j.result()
    return len(jobs)


def export_job(
    job: ViewJob,
    out: str | os.PathLike,
    max_mpp: float | None = None,
    threads: int | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, int]:
    """Write the static viewer of ``job`` to ``out`` (a new or empty folder); returns counts."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ViewError(f"{out}: exists and is not an empty folder; remove it or give a new --export folder")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, (data, _) in static_files().items():
        _write(tmp / ("index.html" if name == "index.html" else f"static/{name}"), data)
    _write(tmp / "config.js", 'window.WSIKIT_CONFIG = {"mode": "static"};\n')
    tiles, shown = 0, 0
    with ThreadPoolExecutor(max(1, threads or allotted_cpus())) as pool:
        for key, rec in job.slides.items():
            say(f"{rec.slide_id}: tiles and overlays")
            try:
                tiles += _export_slide(job, key, tmp, max_mpp, pool)
                shown += 1
            except (ViewError, SlideError) as exc:
                say(f"{rec.slide_id}: left out ({exc})")
    _write(tmp / "data" / "slides.js", data_script("slides", job.slide_list()))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return {"slides": shown, "tiles": tiles}
