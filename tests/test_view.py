"""`wsikit view`: DeepZoom tiles, overlay payloads, the static export and the server's security rules.

The server is the real app under uvicorn on a free loopback port; requests are sent with http.client so
that paths reach it exactly as written (no client-side normalisation of ``..``).
"""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from wsikit.grids import read_grid
from wsikit.jobs import SlideEntry, Status, write_status
from wsikit.slide import open_slide
from wsikit.view.base import ViewError, lattice
from wsikit.view.data import INK_RGB, ViewJob
from wsikit.view.dzi import OVERLAP, TILE, DeepZoom, TileCache
from wsikit.view.export import export_job, finest_level

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from view_server import Server

from wsikit.view.app import build_app

SPEC = "mpp0.50_224px_0ov"


def unpack(p: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(p["b64"]), np.dtype(p["dtype"]).newbyteorder("<"))


@pytest.fixture(scope="module")
def served(view_job):
    server = Server(ViewJob(view_job["job"], runs=[view_job["run"]]))
    yield server
    server.stop()


# -- payloads ------------------------------------------------------------------------------------------
def test_slide_list_meta_and_grid(served, view_job):
    sid = view_job["slide_id"]
    meta = served.json(f"/api/slide/{sid}")
    assert meta["dzi"]["width"] == 2220 and meta["dzi"]["max_level"] == 12 and meta["dzi"]["levels"] == 12
    assert [layer["name"] for layer in meta["layers"]] == ["mask", f"grid-{SPEC}", "scores-0"]
    grid = read_grid(view_job["job"] / "tiles" / SPEC / f"{sid}.h5")
    payload = served.json(f"/api/slide/{sid}/grid-{SPEC}")
    assert payload["count"] == len(grid) and payload["stride0"] == 224 and payload["size0"] == 224
    assert np.array_equal(np.c_[unpack(payload["x"]), unpack(payload["y"])], grid.coords)
    assert np.allclose(unpack(payload["tissue"]), grid.tissue_fraction)
    mask = served.json(f"/api/slide/{sid}/mask")
    assert mask["tissue"] and all(len(r) % 2 == 0 for r in mask["tissue"])
    served.json(f"/api/slide/{sid}/scores-0")  # scored: the list now carries the prediction
    row = served.json("/api/slides")["slides"][0]
    assert row["tiles"] == len(grid) and 0 < row["tissue_pct"] < 100
    assert row["states"] == {"extract-efficientnet-lite0": "done", "tile": "done"}
    assert row["predictions"][0]["class"] in ("normal", "tumour") and 0.5 <= row["predictions"][0]["p"] <= 1


def test_scores_layer_is_the_models(served, view_job):
    from matplotlib import colormaps

    from wsikit.bags import bag_path
    from wsikit.stages.heatmap import model_tile_scores, normalize_scores

    sid = view_job["slide_id"]
    p = served.json(f"/api/slide/{sid}/scores-0")
    ts, _ = model_tile_scores(
        view_job["run"], bag_path(view_job["job"], SPEC, "efficientnet-lite0", sid), "cpu"
    )
    coords = np.c_[unpack(p["x"]), unpack(p["y"])]
    assert np.array_equal(coords, ts.coords)
    assert np.allclose(unpack(p["raw"]), ts.scores, atol=1e-6)
    assert np.allclose(unpack(p["value"]), normalize_scores(ts.scores, "rank"))
    rank = unpack(p["rank"])
    assert rank[np.argmax(ts.scores)] == 1 and rank.max() <= len(rank)
    lut = unpack(p["lut"]).reshape(256, 3)
    assert lut[255].tolist() == list(colormaps["jet"](1.0, bytes=True)[:3])


def test_dzi_tiles_shapes_pixels_cache_and_404(served, view_job, sample_slide):
    sid = view_job["slide_id"]
    status, headers, body = served.get(f"/dzi/{sid}/12/1_2.jpeg")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    tile = np.asarray(Image.open(io.BytesIO(body)))
    assert tile.shape == (TILE + 2 * OVERLAP, TILE + 2 * OVERLAP, 3)  # inner tile: overlap on both sides
    with open_slide(sample_slide) as slide:
        ref = slide.read_region((TILE - OVERLAP, 2 * TILE - OVERLAP), 0, (TILE + 2, TILE + 2))
    assert np.abs(tile.astype(int) - ref).mean() < 6  # JPEG at quality 85
    last = served.get(f"/dzi/{sid}/12/8_11.jpeg")  # bottom-right: 2220 = 8×254 + 188, 2967 = 11×254 + 173
    assert np.asarray(Image.open(io.BytesIO(last[2]))).shape == (173 + OVERLAP, 188 + OVERLAP, 3)
    top = served.get(f"/dzi/{sid}/0/0_0.jpeg")
    assert np.asarray(Image.open(io.BytesIO(top[2]))).shape[:2] == (1, 1)
    for bad in ("/dzi/{sid}/13/0_0.jpeg", "/dzi/{sid}/12/9_0.jpeg", "/dzi/{sid}/12/0_12.jpeg", "/dzi/nope/1/0_0.jpeg",
                "/dzi/{sid}/-1/0_0.jpeg", "/dzi/{sid}/1/0_0.png"):  # fmt: skip
        assert served.get(bad.format(sid=sid))[0] == 404, bad


def test_deepzoom_levels_on_a_pyramid_and_cache(pyramids):
    cache = TileCache(max_bytes=10**9)
    dz = DeepZoom(pyramids["svs"], "svs", cache=cache)
    with open_slide(pyramids["svs"]) as slide:
        assert slide.level_count == 3
        full = slide.read_region((0, 0), 0, slide.dimensions)
    # level max-3 (downsample 8): read from slide level 2 (downsample 4) and halved
    level = dz.max_level - 3
    _, _, w, h = dz.tile_box(level, 0, 0)
    expected = np.asarray(Image.fromarray(full[: h * 8, : w * 8]).resize((w, h), Image.Resampling.BOX))
    assert np.abs(dz.pixels(level, 0, 0).astype(int) - expected).mean() < 4
    first = dz.tile(level, 0, 0)
    assert dz.tile(level, 0, 0) is first and cache.hits == 1 and cache.misses == 1
    small = TileCache(max_bytes=len(first) + 10)  # room for one tile: the older one is evicted
    dz.cache = small
    dz.tile(level, 0, 0)
    dz.tile(dz.max_level, 0, 0)
    assert len(small._items) == 1 and small.bytes <= small.max_bytes


def test_single_level_slide_coarse_levels_from_the_base_picture(sample_slide):
    dz = DeepZoom(sample_slide, "s")
    with open_slide(sample_slide) as slide:
        full = slide.read_region((0, 0), 0, slide.dimensions)
    level = dz.max_level - 4  # downsample 16 from a one-level slide: cut from the base picture
    _, _, w, h = dz.tile_box(level, 0, 0)
    expected = np.asarray(Image.fromarray(full).resize((w, h), Image.Resampling.BOX))  # one tile: all
    assert dz._base is None
    got = dz.pixels(level, 0, 0)
    assert dz._base is not None and np.abs(got.astype(int) - expected).mean() < 4


def test_lattice():
    assert lattice(np.array([[448, 0], [672, 224], [448, 448]]), 224) == (224, (448, 0), (2, 3))
    assert lattice(np.array([[0, 0], [100, 0]]), 224)[0] == 100  # overlapping tiles: the stride
    assert lattice(np.zeros((0, 2)), 256) == (256, (0, 0), (0, 0))


# -- other sources: ink, heatmap CSVs, skipped tiles ------------------------------------------------------
@pytest.fixture
def job_copy(view_job, tmp_path):
    job = tmp_path / "job"
    shutil.copytree(view_job["job"], job, ignore=shutil.ignore_patterns("bags"))
    return job


def test_mask_with_holes_and_ink(job_copy, view_job):
    sid = view_job["slide_id"]
    square = lambda x0, y0, s: [[x0, y0], [x0 + s, y0], [x0 + s, y0 + s], [x0, y0 + s], [x0, y0]]  # noqa: E731
    gj = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square(0, 0, 1000), square(100, 100, 50)]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[square(1200, 0, 300)], [square(0, 1500, 80)]]},
         "properties": {"classification": {"name": "Ink", "color": [0, 0, 0]}, "ink_colour": "blue"}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square(5, 5, 5)]},
         "properties": {"classification": {"name": "Ink", "color": [10, 20, 30]}, "ink_colour": "other"}},
    ]}  # fmt: skip
    (job_copy / "masks" / f"{sid}.geojson").write_text(json.dumps(gj))
    mask = ViewJob(job_copy).layer(sid, "mask")
    assert mask["tissue"] == [[v for pt in square(0, 0, 1000) for v in pt]] and len(mask["holes"]) == 1
    blue, other = mask["excluded"]
    assert blue["name"] == "Ink" and blue["rgb"] == list(INK_RGB["blue"]) and len(blue["rings"]) == 2
    assert other["rgb"] == [10, 20, 30]  # no colour of its own name: the classification's


def test_heatmap_csv_source_and_skipped_tiles(job_copy, view_job, tmp_path):
    sid = view_job["slide_id"]
    hm = tmp_path / "hm"
    hm.mkdir()
    rows = ["x,y,width,height,score,score_norm,rank", "0,0,512,512,0.1,0.25,2", "512,512,512,512,0.9,1.0,1"]
    (hm / f"{sid}_scores.csv").write_text("\n".join(rows) + "\n")
    write_status(job_copy, Status("extract-x", sid, "done", info={"skipped": {SPEC: [[224, 448]]}}))
    job = ViewJob(job_copy, heatmaps=[hm])
    names = [layer["name"] for layer in job.meta(sid)["layers"]]
    assert names == ["mask", f"grid-{SPEC}", "scores-0", "skipped"]
    p = job.layer(sid, "scores-0")
    assert p["stride0"] == 512 and p["cells"] == [2, 2] and unpack(p["value"]).tolist() == [0.25, 1.0]
    assert unpack(p["rank"]).tolist() == [2, 1] and p["prediction"] is None
    assert job.layer(sid, "skipped")["tiles"] == [{"spec": SPEC, "size0": 224, "x": 224, "y": 448}]
    (hm / f"{sid}_scores.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ViewError, match="no column"):
        ViewJob(job_copy, heatmaps=[hm]).layer(sid, "scores-0")


def test_slides_option_and_refusals(job_copy, view_job, sample_slide, tmp_path):
    job = ViewJob(job_copy, slides=[SlideEntry(sample_slide, view_job["slide_id"])])
    assert (
        list(job.slides) == [view_job["slide_id"]] and job.slides[view_job["slide_id"]].path == sample_slide
    )
    with pytest.raises(ViewError, match="no such job directory"):
        ViewJob(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ViewError, match="no slides"):
        ViewJob(tmp_path / "empty")
    with pytest.raises(ViewError, match="no trained model"):
        ViewJob(job_copy, runs=[tmp_path / "empty"])
    with pytest.raises(ViewError, match="needs the token"):
        build_app(job, None, "0.0.0.0")


# -- security ------------------------------------------------------------------------------------------
TRAVERSALS = (
    "/static/../data.py", "/static/%2e%2e/data.py", "/static/..%2fdata.py", "/static/%2e%2e%2f%2e%2e%2fjobs.py",
    "/static//etc/passwd", "/static/%2Fetc%2Fpasswd", "/static/..%5c..%5cdata.py", "/../../etc/passwd",
    "/api/slide/..%2f..%2fetc%2fpasswd", "/api/slide/%2e%2e/mask", "/api/slide/CMU-1-Small-Region/..%2f..%2fmasks",
    "/api/slide/CMU-1-Small-Region/%2e%2e%2fstatus", "/dzi/..%2fjob/0/0_0.jpeg", "/dzi/%2e%2e/0/0_0.jpeg",
    "/api/slide//etc/passwd", "/static/openseadragon/../../data.py", "/static/openseadragon/%2e%2e/%2e%2e/app.py",
)  # fmt: skip


@pytest.mark.parametrize("path", TRAVERSALS)
def test_no_path_from_the_url_reaches_a_file(served, path):
    status, _, body = served.get(path)
    assert status in (400, 404), (path, status)
    assert b"import" not in body and b"root:" not in body


def test_token_required_then_cookie(served, view_job):
    for path in (
        "/",
        "/api/slides",
        "/static/view.js",
        f"/dzi/{view_job['slide_id']}/0/0_0.jpeg",
        "/config.js",
    ):
        assert served.get(path, token=False)[0] == 403, path
        assert served.get(path, token=False, headers={"x-wsikit-token": "wrong"})[0] == 403, path
        assert served.get(path)[0] == 200, path
    status, headers, _ = served.get("/?token=secret-token", token=False)
    assert status == 303 and headers["location"] == "/"
    assert "HttpOnly" in headers["set-cookie"] and "samesite=strict" in headers["set-cookie"].lower()
    cookie = headers["set-cookie"].split(";")[0]
    assert served.get("/api/slides", token=False, headers={"Cookie": cookie})[0] == 200
    assert served.get("/api/slides", headers={"Host": "attacker.example"})[0] == 400  # DNS rebinding
    assert served.get("/", headers={})[1]["content-security-policy"].startswith("default-src 'self'")


def test_symlinks_out_of_the_job_are_not_read(job_copy, view_job, sample_slide, tmp_path):
    sid = view_job["slide_id"]
    outside = tmp_path / "outside.geojson"
    outside.write_text('{"type": "FeatureCollection", "features": [], "secret": "SECRET"}')
    mask = job_copy / "masks" / f"{sid}.geojson"
    mask.unlink()
    mask.symlink_to(outside)
    grid = job_copy / "tiles" / SPEC / f"{sid}.h5"
    shutil.move(grid, tmp_path / "grid.h5")
    grid.symlink_to(tmp_path / "grid.h5")
    server = Server(ViewJob(job_copy, slides=[SlideEntry(sample_slide, sid)]))
    try:
        meta = server.json(f"/api/slide/{sid}")
        assert meta["layers"] == []
        for layer in ("mask", f"grid-{SPEC}"):
            status, _, body = server.get(f"/api/slide/{sid}/{layer}")
            assert status == 404 and b"SECRET" not in body
    finally:
        server.stop()


# -- static export and the CLI -------------------------------------------------------------------------
def test_export(view_job, tmp_path):
    sid = view_job["slide_id"]
    out = tmp_path / "export"
    summary = export_job(ViewJob(view_job["job"], runs=[view_job["run"]]), out, max_mpp=2.0)
    assert summary["slides"] == 1
    assert (out / "config.js").read_text().strip() == 'window.WSIKIT_CONFIG = {"mode": "static"};'
    assert (out / "index.html").is_file() and (
        out / "static" / "openseadragon" / "openseadragon.min.js"
    ).is_file()
    assert (out / "static" / "openseadragon" / "LICENSE.txt").is_file()
    text = (out / "data" / "slides.js").read_text()
    assert text.startswith('wsikitData("slides", ') and text.endswith(");\n")
    slides = json.loads(text[len('wsikitData("slides", ') : -3])
    assert slides["slides"][0]["predictions"][0]["class"] in ("normal", "tumour")
    meta = json.loads(
        (out / "data" / "slide" / f"{sid}.js").read_text()[len(f'wsikitData("slide/{sid}", ') : -3]
    )
    assert meta["dzi"]["levels"] == 10  # 0.499 µm/px → 2 µm/px: two levels fewer
    assert (out / "data" / "slide" / sid / "scores-0.js").is_file()
    assert (out / "dzi" / sid / "10" / "0_0.jpeg").is_file() and not (out / "dzi" / sid / "11").exists()
    assert summary["tiles"] == sum(len(list((out / "dzi" / sid / str(lv)).iterdir())) for lv in range(11))
    assert not list(tmp_path.glob(".export.partial-*"))
    with pytest.raises(ViewError, match="not an empty folder"):
        export_job(ViewJob(view_job["job"]), out)
    assert (
        finest_level(12, 0.25, None) == 12
        and finest_level(12, 0.25, 1.0) == 10
        and finest_level(12, 0.25, 0.1) == 12
    )


def test_cli(view_job, tmp_path):
    from wsikit.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["view", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "no such job directory" in res.output
    res = runner.invoke(app, ["view", str(view_job["job"]), "--host", "0.0.0.0", "--no-token", "--port", "0"])
    assert res.exit_code == 2 and "needs the token" in res.output
    res = runner.invoke(
        app, ["view", str(view_job["job"]), "--export", str(tmp_path / "ex"), "--export-mpp", "8"]
    )
    assert res.exit_code == 0, res.output
    assert "index.html" in res.output and (tmp_path / "ex" / "index.html").is_file()


def test_cli_starts_without_the_viewer_libraries():
    import subprocess
    import sys

    code = (
        "import sys, wsikit.cli.main; bad = {'starlette', 'uvicorn'} & set(sys.modules); assert not bad, bad"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_missing_extra_is_one_line(view_job, monkeypatch):
    import sys

    from wsikit.cli.main import app

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if `pip install 'wsikit[view]'` was not run
    res = CliRunner().invoke(app, ["view", str(view_job["job"]), "--port", "0"])
    assert res.exit_code == 2 and "pip install 'wsikit[view]'" in res.output
