// wsikit view: the slide list, an OpenSeadragon viewer and the overlays drawn on one canvas above it.
// Data comes from the server (fetch api/...) or, in a static export, from data/*.js files that call
// wsikitData(path, payload) (browsers refuse fetch() on file:// pages). Per-tile layers arrive as typed
// arrays; each is drawn as one image of its grid's cells (one pixel a tile), so 100,000 tiles cost one
// drawImage per frame. window.wsikitView exposes the state for scripts and the browser test.
(function () {
  "use strict";
  const CFG = window.WSIKIT_CONFIG || { mode: "server" };
  const K = 10; // tiles in the highest / lowest lists
  const pending = {};
  const $ = (id) => document.getElementById(id);
  const S = {
    viewer: null, item: null, meta: null, key: null, layers: [], stats: {}, list: null,
    imgScale: 1, hoverTile: null, loading: 0, opened: 0,
  };

  window.wsikitData = function (path, payload) {
    const p = pending[path];
    if (p) { delete pending[path]; p.resolve(payload); }
  };

  function getData(path) {
    if (CFG.mode === "server") {
      return fetch("api/" + path, { credentials: "same-origin" }).then((r) =>
        r.ok ? r.json() : r.text().then((t) => { throw new Error(t); }));
    }
    return new Promise((resolve, reject) => {
      pending[path] = { resolve, reject };
      const s = document.createElement("script");
      s.src = "data/" + path + ".js";
      s.onerror = () => { delete pending[path]; reject(new Error("missing data/" + path + ".js")); };
      s.onload = () => s.remove();
      document.head.appendChild(s);
    });
  }

  function unpack(p) {
    const bin = atob(p.b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const T = { int32: Int32Array, float32: Float32Array, uint8: Uint8Array }[p.dtype];
    return new T(bytes.buffer);
  }

  function say(text) {
    const m = $("message");
    m.textContent = text || "";
    m.hidden = !text;
  }

  // -- slide list ---------------------------------------------------------------------------------------
  function renderList(list) {
    S.list = list;
    $("job").textContent = list.job;
    $("pred-head").hidden = !list.sources.length;
    const body = document.querySelector("#slide-table tbody");
    body.textContent = "";
    for (const row of list.slides) {
      const tr = document.createElement("tr");
      tr.dataset.key = row.key;
      if (row.key === S.key) tr.className = "current";
      const pred = row.predictions.find((p) => p);
      const cells = [row.id, row.tiles ?? "–", row.tissue_pct ?? "–", "",
        pred ? `${pred.class} ${pred.p.toFixed(2)}` : list.sources.length ? "…" : ""];
      cells.forEach((c, i) => {
        const td = document.createElement("td");
        td.textContent = c;
        if (i === 3) {
          for (const [stage, v] of Object.entries(row.states)) {
            const span = document.createElement("span");
            span.className = "state-" + (v === "done" ? "done" : "failed");
            span.title = `${stage}: ${v}`;
            span.textContent = `${stage.split("-")[0]} ${v === "done" ? "✓" : v} `;
            td.appendChild(span);
          }
        }
        if (i === 1 || i === 2) td.className = "num";
        if (i === 4 && !list.sources.length) td.hidden = true;
        tr.appendChild(td);
      });
      tr.addEventListener("click", () => openSlide(row.key));
      body.appendChild(tr);
    }
  }

  function refreshList(tries) {
    getData("slides").then((list) => {
      renderList(list);
      const waiting = list.sources.length && list.slides.some((r) => r.predictions.every((p) => !p));
      if (CFG.mode === "server" && waiting && tries > 0) setTimeout(() => refreshList(tries - 1), 3000);
    }).catch((e) => say(String(e.message || e)));
  }

  // -- one slide ----------------------------------------------------------------------------------------
  function openSlide(key) {
    const t0 = performance.now();
    S.key = key;
    S.opened += 1;
    const opened = S.opened;
    document.querySelectorAll("#slide-table tr").forEach((tr) => tr.classList.toggle("current", tr.dataset.key === key));
    say("");
    getData("slide/" + key).then((meta) => {
      if (opened !== S.opened) return;
      S.meta = meta;
      S.stats = { open_ms: null, first_picture_ms: null, layers: {} };
      $("slide-title").textContent = meta.id;
      history.replaceState(null, "", "#slide=" + encodeURIComponent(key));
      const d = meta.dzi;
      S.imgScale = 2 ** (d.max_level - d.levels);
      const src = {
        width: Math.ceil(d.width / S.imgScale), height: Math.ceil(d.height / S.imgScale),
        tileSize: d.tile_size, tileOverlap: d.overlap, minLevel: 0, maxLevel: d.levels,
        getTileUrl: (l, x, y) => `dzi/${key}/${l}/${x}_${y}.jpeg`,
      };
      S.item = null;
      S.viewer.open(src);
      S.viewer.addOnceHandler("open", () => {
        S.item = S.viewer.world.getItemAt(0);
        S.stats.open_ms = performance.now() - t0;
        S.item.addOnceHandler("fully-loaded-change", () => { S.stats.first_picture_ms = performance.now() - t0; });
        redraw();
      });
      buildLayers(meta, opened);
    }).catch((e) => say(String(e.message || e)));
  }

  function buildLayers(meta, opened) {
    S.layers = meta.layers.map((l) => ({
      ...l, on: l.kind !== "grid", opacity: l.kind === "scores" ? 0.5 : 1, data: null,
    }));
    const firstScores = S.layers.find((l) => l.kind === "scores");
    S.layers.forEach((l) => { if (l.kind === "scores" && l !== firstScores) l.on = false; });
    const box = $("layers");
    box.textContent = "";
    for (const l of S.layers) {
      const div = document.createElement("div");
      div.className = "layer";
      const label = document.createElement("label"), cb = document.createElement("input");
      const sl = document.createElement("input");
      cb.type = "checkbox"; cb.id = "layer-" + l.name;
      label.append(cb, " " + l.label);
      Object.assign(sl, { type: "range", id: "opacity-" + l.name, min: 0, max: 1, step: 0.05, title: "opacity" });
      div.append(label, sl);
      box.appendChild(div);
      cb.checked = l.on;
      sl.value = l.opacity;
      cb.addEventListener("change", () => setLayer(l.name, cb.checked));
      sl.addEventListener("input", () => setLayer(l.name, l.on, Number(sl.value)));
    }
    S.layers.filter((l) => l.on).forEach((l) => loadLayer(l, opened));
    updatePanel();
  }

  function loadLayer(l, opened) {
    if (l.data || l.promise) return l.promise;
    const t0 = performance.now();
    S.loading += 1;
    l.promise = getData(`slide/${S.key}/${l.name}`).then((payload) => {
      const t1 = performance.now();
      if (opened !== S.opened) return;
      l.data = prepare(payload);
      S.stats.layers[l.name] = { fetch_ms: t1 - t0, decode_ms: performance.now() - t1, tiles: payload.count ?? null };
      updatePanel();
      redraw();
    }).catch((e) => say(`${l.label}: ${e.message || e}`)).finally(() => { S.loading -= 1; });
    return l.promise;
  }

  function prepare(p) {
    if (p.kind !== "grid" && p.kind !== "scores") return p;
    const d = { ...p, x: unpack(p.x), y: unpack(p.y) };
    const [cols, rows] = p.cells;
    d.cellIndex = new Int32Array(cols * rows).fill(-1);
    for (let i = 0; i < d.count; i++) {
      const c = Math.floor((d.x[i] - p.origin[0]) / p.stride0), r = Math.floor((d.y[i] - p.origin[1]) / p.stride0);
      d.cellIndex[r * cols + c] = i;
    }
    const raster = document.createElement("canvas");
    raster.width = Math.max(1, cols);
    raster.height = Math.max(1, rows);
    const img = raster.getContext("2d").createImageData(raster.width, raster.height);
    if (p.kind === "scores") {
      d.value = unpack(p.value); d.raw = unpack(p.raw); d.rank = unpack(p.rank); d.lut = unpack(p.lut);
      d.order = Array.from(d.rank.keys()).sort((a, b) => d.rank[a] - d.rank[b] || a - b);
    } else {
      d.tissue = unpack(p.tissue);
    }
    for (let cell = 0; cell < d.cellIndex.length; cell++) {
      const i = d.cellIndex[cell];
      if (i < 0) continue;
      let rgb = [255, 215, 0];
      if (p.kind === "scores") {
        const v = Math.round(Math.min(1, Math.max(0, d.value[i])) * 255) * 3;
        rgb = [d.lut[v], d.lut[v + 1], d.lut[v + 2]];
      }
      img.data.set([rgb[0], rgb[1], rgb[2], p.kind === "scores" ? 255 : 90], cell * 4);
    }
    raster.getContext("2d").putImageData(img, 0, 0);
    d.raster = raster;
    return d;
  }

  function setLayer(name, on, opacity) {
    const l = S.layers.find((x) => x.name === name);
    if (!l) return null;
    l.on = on;
    if (opacity !== undefined) l.opacity = opacity;
    const cb = $("layer-" + name), sl = $("opacity-" + name);
    if (cb) cb.checked = on;
    if (sl) sl.value = l.opacity;
    if (on) loadLayer(l, S.opened);
    updatePanel();
    redraw();
    return l.promise || Promise.resolve();
  }

  function activeScores() {
    return S.layers.find((l) => l.kind === "scores" && l.on && l.data);
  }

  // -- side panel: legend and the highest / lowest tiles -------------------------------------------------
  function updatePanel() {
    const l = activeScores();
    $("legend").hidden = $("topk").hidden = !l;
    if (!l) return;
    const d = l.data;
    $("legend-title").textContent = `${l.label}: ${d.legend}`;
    const bar = $("legend-bar").getContext("2d");
    for (let i = 0; i < 256; i++) {
      bar.fillStyle = `rgb(${d.lut[3 * i]},${d.lut[3 * i + 1]},${d.lut[3 * i + 2]})`;
      bar.fillRect(i, 0, 1, 12);
    }
    const fill = (id, idx) => {
      const ol = $(id);
      ol.textContent = "";
      for (const i of idx) {
        const li = document.createElement("li");
        li.textContent = `${d.value[i].toFixed(3)} (${d.raw[i].toPrecision(3)}) @ ${d.x[i]}, ${d.y[i]}`;
        li.dataset.tile = i;
        li.addEventListener("click", () => zoomToTile(i));
        ol.appendChild(li);
      }
    };
    fill("top-list", d.order.slice(0, K));
    fill("bottom-list", d.order.slice(-K).reverse());
  }

  function zoomToTile(i, immediately) {
    const l = activeScores();
    if (!l || !S.item) return;
    const d = l.data, s = S.imgScale, side = d.size0;
    const rect = new OpenSeadragon.Rect((d.x[i] - 1.5 * side) / s, (d.y[i] - 1.5 * side) / s, 4 * side / s, 4 * side / s);
    S.viewer.viewport.fitBounds(S.item.imageToViewportRectangle(rect), !!immediately);
    S.hoverTile = { layer: l, i };
    redraw();
  }

  // -- drawing ------------------------------------------------------------------------------------------
  function transform() {
    // level-0 px → viewer element px (no rotation): screen = o + s * level0
    const a = S.item.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
    const b = S.item.imageToViewerElementCoordinates(new OpenSeadragon.Point(10000, 10000));
    return { ox: a.x, oy: a.y, s: (b.x - a.x) / (10000 * S.imgScale) };
  }

  function redraw() {
    const canvas = S.overlay, ctx = canvas.getContext("2d");
    const w = S.viewer.container.clientWidth, h = S.viewer.container.clientHeight, dpr = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
      canvas.style.width = w + "px"; canvas.style.height = h + "px";
    }
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    if (!S.item) return;
    const t0 = performance.now();
    const T = transform();
    for (const kind of ["grid", "scores", "mask", "skipped"]) {
      for (const l of S.layers) {
        if (l.kind !== kind || !l.on || !l.data) continue;
        ctx.save();
        ctx.globalAlpha = l.opacity;
        DRAW[kind](ctx, l.data, T, w, h);
        ctx.restore();
      }
    }
    if (S.hoverTile && S.hoverTile.layer.on) {
      const d = S.hoverTile.layer.data, i = S.hoverTile.i;
      ctx.strokeStyle = "#000"; ctx.lineWidth = 2;
      ctx.strokeRect(T.ox + d.x[i] * T.s, T.oy + d.y[i] * T.s, d.size0 * T.s, d.size0 * T.s);
    }
    S.stats.draw_ms = performance.now() - t0;
  }

  function visibleCells(d, T, w, h) {
    const [cols, rows] = d.cells, st = d.stride0, back = Math.ceil(d.size0 / st);
    const cx = (px) => Math.floor((px / T.s - d.origin[0] - (T.ox / T.s)) / st);
    const cy = (py) => Math.floor((py / T.s - d.origin[1] - (T.oy / T.s)) / st);
    return {
      c0: Math.max(0, cx(0) - back), c1: Math.min(cols, cx(w) + 1),
      r0: Math.max(0, cy(0) - back), r1: Math.min(rows, cy(h) + 1),
    };
  }

  function drawRaster(ctx, d, T, w, h) {
    const v = visibleCells(d, T, w, h);
    if (v.c1 <= v.c0 || v.r1 <= v.r0) return;
    ctx.imageSmoothingEnabled = false;
    const st = d.stride0 * T.s;
    ctx.drawImage(d.raster, v.c0, v.r0, v.c1 - v.c0, v.r1 - v.r0,
      T.ox + (d.origin[0] + v.c0 * d.stride0) * T.s, T.oy + (d.origin[1] + v.r0 * d.stride0) * T.s,
      (v.c1 - v.c0) * st, (v.r1 - v.r0) * st);
  }

  function ringPath(ctx, ring, T) {
    ctx.moveTo(T.ox + ring[0] * T.s, T.oy + ring[1] * T.s);
    for (let k = 2; k < ring.length; k += 2) ctx.lineTo(T.ox + ring[k] * T.s, T.oy + ring[k + 1] * T.s);
    ctx.closePath();
  }

  const DRAW = {
    scores: drawRaster,
    grid(ctx, d, T, w, h) {
      if (d.size0 * T.s < 5) { drawRaster(ctx, d, T, w, h); return; }
      const v = visibleCells(d, T, w, h), cols = d.cells[0];
      ctx.strokeStyle = "rgb(255, 200, 0)"; ctx.lineWidth = 1;
      ctx.beginPath();
      for (let r = v.r0; r < v.r1; r++) {
        for (let c = v.c0; c < v.c1; c++) {
          const i = d.cellIndex[r * cols + c];
          if (i >= 0) ctx.rect(T.ox + d.x[i] * T.s, T.oy + d.y[i] * T.s, d.size0 * T.s, d.size0 * T.s);
        }
      }
      ctx.stroke();
    },
    mask(ctx, d, T) {
      ctx.lineWidth = 2;
      for (const ex of d.excluded) {
        ctx.beginPath();
        ex.rings.forEach((r) => ringPath(ctx, r, T));
        ctx.fillStyle = `rgba(${ex.rgb[0]},${ex.rgb[1]},${ex.rgb[2]},0.35)`;
        ctx.strokeStyle = `rgb(${ex.rgb[0]},${ex.rgb[1]},${ex.rgb[2]})`;
        ctx.fill("evenodd"); ctx.stroke();
      }
      ctx.beginPath(); d.tissue.forEach((r) => ringPath(ctx, r, T));
      ctx.strokeStyle = "rgb(0, 200, 0)"; ctx.stroke();
      ctx.beginPath(); d.holes.forEach((r) => ringPath(ctx, r, T));
      ctx.strokeStyle = "rgb(0, 90, 255)"; ctx.stroke();
    },
    skipped(ctx, d, T) {
      ctx.strokeStyle = "rgb(230, 0, 0)"; ctx.lineWidth = 2;
      ctx.beginPath();
      for (const t of d.tiles) {
        const x = T.ox + t.x * T.s, y = T.oy + t.y * T.s, s = (t.size0 || 1) * T.s;
        ctx.rect(x, y, s, s); ctx.moveTo(x, y); ctx.lineTo(x + s, y + s); ctx.moveTo(x + s, y); ctx.lineTo(x, y + s);
      }
      ctx.stroke();
    },
  };

  // -- hover ----------------------------------------------------------------------------------------------
  function tileAt(px, py) {
    if (!S.item) return null;
    const T = transform(), X = (px - T.ox) / T.s, Y = (py - T.oy) / T.s;
    const layers = S.layers.filter((l) => l.on && l.data && (l.kind === "scores" || l.kind === "grid"));
    for (const l of layers.sort((a, b) => (a.kind === "scores" ? -1 : 1) - (b.kind === "scores" ? -1 : 1))) {
      const d = l.data, st = d.stride0, [cols, rows] = d.cells, back = Math.ceil(d.size0 / st) - 1;
      const c = Math.floor((X - d.origin[0]) / st), r = Math.floor((Y - d.origin[1]) / st);
      for (let dr = 0; dr <= back; dr++) {
        for (let dc = 0; dc <= back; dc++) {
          const cc = c - dc, rr = r - dr;
          if (cc < 0 || rr < 0 || cc >= cols || rr >= rows) continue;
          const i = d.cellIndex[rr * cols + cc];
          if (i >= 0 && X < d.x[i] + d.size0 && Y < d.y[i] + d.size0) return { layer: l, i, X, Y };
        }
      }
    }
    return null;
  }

  function onMove(ev) {
    const rect = S.viewer.container.getBoundingClientRect();
    const px = ev.clientX - rect.left, py = ev.clientY - rect.top;
    const hit = tileAt(px, py), box = $("hover");
    S.hoverTile = hit;
    redraw();
    if (!hit) { box.hidden = true; return; }
    const d = hit.layer.data, i = hit.i;
    let text = `tile ${d.x[i]}, ${d.y[i]} (level-0 px, ${d.size0} px side)`;
    if (hit.layer.kind === "scores") {
      text += `\nscore ${d.raw[i].toPrecision(4)}, normalised ${d.value[i].toFixed(3)}\nrank ${d.rank[i]} of ${d.count}`;
    } else if (d.tissue[i] >= 0) {
      text += `\ntissue ${(100 * d.tissue[i]).toFixed(0)} %`;
    }
    box.textContent = `${hit.layer.label}\n${text}`;
    box.style.left = px + 14 + "px"; box.style.top = py + 14 + "px";
    box.hidden = false;
  }

  // -- start ----------------------------------------------------------------------------------------------
  function start() {
    S.viewer = OpenSeadragon({
      element: $("viewer"), prefixUrl: "static/openseadragon/images/", showNavigator: true,
      drawer: "canvas", maxZoomPixelRatio: 4, animationTime: 0.5, visibilityRatio: 0.5,
      gestureSettingsMouse: { clickToZoom: false }, showRotationControl: false,
    });
    S.overlay = document.createElement("canvas");
    S.overlay.style.cssText = "position:absolute;left:0;top:0;pointer-events:none";
    S.viewer.canvas.appendChild(S.overlay);
    S.viewer.addHandler("update-viewport", redraw);
    S.viewer.addHandler("resize", redraw);
    S.viewer.addHandler("tile-load-failed", () => { S.stats.failed_tiles = (S.stats.failed_tiles || 0) + 1; });
    S.viewer.addHandler("tile-loaded", () => { S.stats.tiles_loaded = (S.stats.tiles_loaded || 0) + 1; });
    S.viewer.container.addEventListener("mousemove", onMove);
    S.viewer.container.addEventListener("mouseleave", () => { $("hover").hidden = true; S.hoverTile = null; redraw(); });
    getData("slides").then((list) => {
      renderList(list);
      const want = new URLSearchParams(location.hash.slice(1)).get("slide");
      const row = list.slides.find((r) => r.key === want) || list.slides[0];
      if (row) openSlide(row.key);
      if (CFG.mode === "server" && list.sources.length) setTimeout(() => refreshList(40), 3000);
    }).catch((e) => say(String(e.message || e)));
  }

  window.wsikitView = {
    state: S, open: openSlide, setLayer, zoomToTile, redraw,
    // true once the slide, its shown layers and every tile OpenSeadragon wants are loaded
    idle: () => !!(S.item && S.loading === 0 && S.item.getFullyLoaded() && S.layers.every((l) => !l.on || l.data)),
    // idle, and the viewport at the end of its animation
    settled: () => {
      const vp = S.viewer && S.viewer.viewport;
      return !!(vp && window.wsikitView.idle() && vp.getZoom(true) === vp.getZoom(false) &&
        vp.getCenter(true).equals(vp.getCenter(false)));
    },
    // level-0 px → page px
    toPage: (x, y) => {
      const T = transform(), r = S.viewer.container.getBoundingClientRect();
      return [r.left + T.ox + x * T.s, r.top + T.oy + y * T.s];
    },
  };
  start();
})();
