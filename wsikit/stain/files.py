"""Normalize folders of image tiles with a fitted normalizer, and draw the QC picture (source | target | result).

Used by ``wsikit stain apply``; callable from Python. Outputs keep each input's name and format under the
output folder (relative paths of folder inputs are kept), are written atomically, and existing outputs
are skipped unless ``overwrite``, so an interrupted run resumes.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wsikit.io import atomic_path
from wsikit.stain.base import Normalizer, StainError, load_image
from wsikit.stain.reinhard import lab_to_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_PIL_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}


@dataclass
class ApplyResult:
    """What ``normalize_files`` did: outputs written, skipped (already there), passed through unchanged."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    passed_through: list[Path] = field(default_factory=list)
    examples: list[tuple[Path, Path]] = field(default_factory=list)  # (input, output) for the QC picture


def find_images(inputs: Iterable[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """(image path, output path relative to the output folder) for files, folders (recursive) and globs."""
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file() and not f.name.startswith("."):
                    found.append((f, f.relative_to(path)))
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            matches = sorted(glob.glob(str(item), recursive=True))
            if not matches:
                raise StainError(f"{item}: no such image, folder or glob match; check the path")
            found += [(Path(m), Path(Path(m).name)) for m in matches if Path(m).is_file()]
    if not found:
        raise StainError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, inputs))}")
    seen: dict[Path, Path] = {}
    for src, rel in found:
        if rel in seen and seen[rel] != src:
            raise StainError(
                f"{src} and {seen[rel]} would both be written as {rel}; pass their parent folder"
            )
        seen[rel] = src
    return found


def normalize_files(
    normalizer: Normalizer,
    inputs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    batch_size: int = 64,
    device: str = "cpu",
    sample: int = 64,
    overwrite: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> ApplyResult:
    """Normalize every image under ``inputs`` into ``out_dir``; images of one size are batched together.

    Slide-level normalizers (``source="slide"``) estimate the source stains once from up to ``sample``
    of the images, evenly spaced, treating the folder as one slide.
    """
    out = Path(out_dir)
    images = find_images(inputs)
    result = ApplyResult()
    todo = []
    for src, rel in images:
        dest = out / rel
        if dest.exists() and not overwrite:
            result.skipped.append(dest)
        else:
            todo.append((src, dest))
    if on_progress and result.skipped:
        on_progress(len(result.skipped))
    if not todo:
        return result
    if normalizer.params.source == "slide":
        pick = np.linspace(0, len(images) - 1, min(sample, len(images))).round().astype(int)
        normalizer = normalizer.for_slide(
            [torch.from_numpy(load_image(images[i][0])).permute(2, 0, 1) for i in pick]
        )
    by_size: dict[tuple[int, ...], list[tuple[Path, Path, np.ndarray]]] = {}

    def flush(group: list[tuple[Path, Path, np.ndarray]]) -> None:
        batch = torch.from_numpy(np.stack([g[2] for g in group])).permute(0, 3, 1, 2).to(device)
        normed, passed = normalizer.normalize(batch)
        arrays = normed.permute(0, 2, 3, 1).cpu().numpy()
        for (src, dest, _), arr, p in zip(group, arrays, passed.tolist(), strict=True):
            write_image(dest, arr)
            result.written.append(dest)
            if p:
                result.passed_through.append(src)
            elif len(result.examples) < 4:
                result.examples.append((src, dest))
        if on_progress:
            on_progress(len(group))
        group.clear()

    for src, dest in todo:
        img = load_image(src)
        group = by_size.setdefault(img.shape, [])
        group.append((src, dest, img))
        if len(group) >= batch_size:
            flush(group)
    for group in by_size.values():
        if group:
            flush(group)
    return result


def write_image(dest: Path, rgb: np.ndarray) -> None:
    """Write (H,W,3) uint8 atomically in the format its suffix names (JPEG at quality 95)."""
    from PIL import Image

    fmt = _PIL_FORMATS.get(dest.suffix.lower(), "PNG")
    with atomic_path(dest) as tmp:
        Image.fromarray(rgb).save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def qc_figure(
    normalizer: Normalizer,
    pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
    dest: str | os.PathLike,
    target_image: str | os.PathLike | None = None,
    height: int = 256,
) -> Path:
    """A PNG with one row per (source, result) pair: source | target | result, labelled."""
    from PIL import Image, ImageDraw

    if not pairs:
        raise StainError("no normalized images to show; the QC picture needs at least one")
    target = (
        load_image(target_image)
        if target_image and Path(target_image).is_file()
        else stain_swatch(normalizer)
    )
    rows = []
    for src, res in pairs:
        panels = [load_image(src), target, load_image(res)]
        scaled = [
            np.asarray(Image.fromarray(p).resize((max(1, round(p.shape[1] * height / p.shape[0])), height)))
            for p in panels
        ]
        gap = np.full((height, 8, 3), 255, np.uint8)
        rows.append(np.concatenate([scaled[0], gap, scaled[1], gap, scaled[2]], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 8), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    canvas = Image.fromarray(np.concatenate([np.full((24, width, 3), 255, np.uint8), *rows]))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 6), f"source | target | result  ({normalizer.method})", fill=(0, 0, 0))
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        canvas.save(tmp, format="PNG")
    return dest


def stain_swatch(normalizer: Normalizer, size: int = 256) -> np.ndarray:
    """A picture of the target when its image is not at hand: stain colours, or the mean L*a*b* colour."""
    t = normalizer.target
    if "stain_matrix" in t:
        io = float(getattr(normalizer.params, "io", 255.0))
        ramp = np.linspace(0.0, 1.0, size // 2)
        halves = []
        for vec, cmax in zip(np.asarray(t["stain_matrix"]), t["max_concentrations"], strict=True):
            rgb = io * np.exp(-np.outer(ramp * cmax, vec))  # (size/2, 3)
            halves.append(np.repeat(rgb[None], size // 2, axis=0))
        img = np.concatenate(halves, axis=0)
    else:
        lab = torch.tensor(t["lab_mean"], dtype=torch.float32).view(1, 3, 1)
        img = np.broadcast_to(lab_to_rgb(lab).view(1, 1, 3).numpy(), (size, size, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
