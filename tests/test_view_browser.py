"""The viewer in headless Chromium (Debian's ``chromium``; skipped, saying why, where it is missing).

On the bundled slide with a trained model: the page loads, the hottest tile's overlay colour is where
that tile lies at two zoom levels (zoomed out, then after clicking it in the "highest" list), and turning
the layer off shows the slide there. The static export does the same from file://. Set
``WSIKIT_DOCS_SCREENSHOTS=docs`` to also write the README's two screenshots.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from wsikit.slide import open_slide

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets")

from chromium import CHROMIUM, Chromium
from view_server import Server

from wsikit.view.data import ViewJob
from wsikit.view.export import export_job

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason=f"{CHROMIUM} missing: apt-get install chromium (.ci/run does, as root)"
)
HOT = np.array([127, 0, 0])  # jet at 1.0: the highest-ranked tile at opacity 1
SCORES = "wsikitView.state.layers.find((l) => l.kind === 'scores')"


def patch(img: np.ndarray, xy: list[float], r: int = 3) -> np.ndarray:
    """Mean colour of the (2r+1)² pixels around page point ``xy``."""
    x, y = round(xy[0]), round(xy[1])
    return img[y - r : y + r + 1, x - r : x + r + 1].reshape(-1, 3).mean(0)


def hottest(b: Chromium) -> tuple[int, int, int]:
    return tuple(
        b.evaluate(
            f"(() => {{ const d = {SCORES}.data, i = d.order[0]; return [d.x[i], d.y[i], d.size0]; }})()"
        )
    )


def check_hot_tile(b: Chromium, shot: Path) -> tuple[np.ndarray, list[float], float]:
    """The hottest tile's centre has the top colour; returns the screenshot, that centre, tile side on screen."""
    x, y, side = hottest(b)
    centre = b.evaluate(f"wsikitView.toPage({x + side / 2}, {y + side / 2})")
    corner = b.evaluate(f"wsikitView.toPage({x}, {y})")
    img = b.screenshot(shot)
    assert np.abs(patch(img, centre) - HOT).max() < 12, (patch(img, centre), shot)
    return img, centre, 2 * (centre[0] - corner[0])


def prepare(b: Chromium) -> None:
    b.wait_for("window.wsikitView && wsikitView.settled()", 60)
    b.evaluate(
        "wsikitView.state.viewer.navigator.element.style.display = 'none'"
    )  # keep the view unobstructed
    b.evaluate("wsikitView.setLayer('mask', false)")
    b.evaluate(f"wsikitView.setLayer({SCORES}.name, true, 1)")


def test_viewer_in_chromium(view_job, sample_slide, tmp_path):
    from wsikit.bags import bag_path
    from wsikit.stages.heatmap import model_tile_scores

    sid = view_job["slide_id"]
    ts, _ = model_tile_scores(
        view_job["run"], bag_path(view_job["job"], "mpp0.50_224px_0ov", "efficientnet-lite0", sid), "cpu"
    )
    server = Server(ViewJob(view_job["job"], runs=[view_job["run"]]))
    try:
        with Chromium(1280, 800) as b:
            b.navigate(f"http://127.0.0.1:{server.port}/?token={server.token}")
            prepare(b)
            x, y, _ = hottest(b)
            assert [x, y] == ts.coords[np.argmax(ts.scores)].tolist()  # the page's top tile is the model's
            _, _, side_out = check_hot_tile(b, tmp_path / "zoomed_out.png")

            b.evaluate("document.querySelector('#top-list li').click()")  # zoom to it from the side panel
            b.wait_for("wsikitView.settled()", 60)
            _, centre, side_in = check_hot_tile(b, tmp_path / "zoomed_in.png")
            assert side_in > 2.5 * side_out and side_in > 120, (side_out, side_in)  # a zoom step in

            b.evaluate(f"document.getElementById('layer-' + {SCORES}.name).click()")  # the layer's checkbox
            b.wait_for(f"!{SCORES}.on && wsikitView.settled()")
            off = b.screenshot(tmp_path / "layer_off.png")
            with open_slide(sample_slide) as slide:
                tile = slide.read_region((x, y), 0, (224, 224))
            seen = patch(off, centre, r=int(side_in * 0.4))
            assert np.abs(patch(off, centre) - HOT).max() > 60  # the colour is gone ...
            assert (
                np.abs(seen - tile[22:202, 22:202].reshape(-1, 3).mean(0)).max() < 15
            )  # ... the slide is there
            assert b.evaluate("wsikitView.state.stats.failed_tiles || 0") == 0
            if os.environ.get("WSIKIT_DOCS_SCREENSHOTS"):
                docs_screenshots(b, Path(os.environ["WSIKIT_DOCS_SCREENSHOTS"]))
    finally:
        server.stop()


def docs_screenshots(b: Chromium, out: Path) -> None:
    """The README's pictures: the whole slide with outlines and scores, then the hottest tile close up."""
    b.evaluate("wsikitView.state.viewer.navigator.element.style.display = ''")
    b.evaluate(f"wsikitView.setLayer('mask', true); wsikitView.setLayer({SCORES}.name, true, 0.45)")
    b.evaluate("wsikitView.state.viewer.viewport.goHome(true); 0")
    b.wait_for("wsikitView.settled()", 60)
    small(b.screenshot(), out / "view-slide.png")
    b.evaluate(f"wsikitView.zoomToTile({SCORES}.data.order[0], true); 0")
    b.wait_for("wsikitView.settled()", 60)
    small(b.screenshot(), out / "view-zoom.png")


def small(img: np.ndarray, path: Path) -> None:
    """A screenshot as a 256-colour PNG (a third of the size)."""
    from PIL import Image

    Image.fromarray(img).quantize(256).save(path, optimize=True)


def test_static_export_from_disk(view_job, tmp_path):
    out = tmp_path / "export"
    export_job(ViewJob(view_job["job"], runs=[view_job["run"]]), out, max_mpp=1.0)
    with Chromium(1280, 800) as b:
        b.navigate((out / "index.html").as_uri())
        prepare(b)
        check_hot_tile(b, tmp_path / "export.png")
        assert b.evaluate("wsikitView.state.stats.failed_tiles || 0") == 0
        assert (
            b.evaluate("document.querySelector('#slide-table td:last-child').textContent") != "…"
        )  # prediction
