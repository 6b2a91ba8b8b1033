"""The demo: the whole pipeline on the bundled real slide, writing pictures a person can look at."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from wsikit.slide import SAMPLE_SLIDE, open_slide, slide_facts


@dataclass
class DemoResult:
    """Where the demo wrote what, and the facts it printed."""

    out_dir: Path
    facts: dict[str, Any]
    written: dict[str, Path] = field(default_factory=dict)


def run_demo(out_dir: str | Path, slide_path: str | Path = SAMPLE_SLIDE) -> DemoResult:
    """Run the pipeline on one slide (the bundled sample by default) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_slide(slide_path) as slide:
        result = DemoResult(out, slide_facts(slide))
        thumb = out / f"{slide.slide_id}_thumbnail.png"
        Image.fromarray(slide.thumbnail(max_side=1024)).save(thumb)
        result.written["thumbnail"] = thumb
    return result
