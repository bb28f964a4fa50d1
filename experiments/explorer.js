// forkpop's explorer: the lineage as a zoomable graph (generations as rows) beside the run's
// per-generation curves. Plain JavaScript, no library, no request to any host: the page's data
// sits in the #forkpop-data script element.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("forkpop-data").textContent);
  const V = D.nodes;
  const N = V.id.length;
  const ORIGIN = ["seed", "fork", "distill"];
  const F = { poisoned: 1, screened: 2, audited: 4, diverged: 8, failed: 16, teacher: 32, accepted: 64, rejected: 128 };
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"];
  const SPECIES = ["#2b6cb0", "#2f855a", "#b7791f", "#6b46c1", "#c53030", "#2c7a7b", "#97266d", "#4a5568"];
  const byId = new Map();
  for (let i = 0; i < N; i++) byId.set(V.id[i], i);
  const children = Array.from({ length: N }, () => []);
  for (let i = 0; i < N; i++) for (const p of V.parents[i]) children[p].push(i);
  const maxOf = (a) => a.reduce((m, x) => (x > m ? x : m), -Infinity);
  const minOf = (a) => a.reduce((m, x) => (x < m ? x : m), Infinity);
  const nGens = N ? maxOf(V.gen) + 1 : 0;
  const rowOf = (i) => (V.origin[i] === 1 ? 2 * V.gen[i] + 1 : 2 * V.gen[i]);
  const nRows = N ? maxOf(Array.from({ length: N }, (_, i) => rowOf(i))) + 1 : 0;
  const fitness = D.values.val_accuracy || new Array(N).fill(null);

  // -- the page -------------------------------------------------------------------------------
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const k of kids) e.append(k);
    return e;
  }
  const SVGNS = "http://www.w3.org/2000/svg";
  function sv(tag, attrs) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }
  function glyph(kind) {
    const s = sv("svg", { width: 14, height: 14, viewBox: "0 0 14 14" });
    const shapes = {
      fork: () => sv("circle", { cx: 7, cy: 7, r: 4, fill: "#2b6cb0" }),
      teacher: () => sv("circle", { cx: 7, cy: 7, r: 4, fill: "#2b6cb0", stroke: "#e09f00", "stroke-width": 2.2 }),
      seed: () => sv("rect", { x: 2, y: 2, width: 10, height: 10, fill: "#1d2430" }),
      distill: () => sv("rect", { x: 2, y: 2, width: 10, height: 10, fill: "#c53030" }),
      rejected: () => sv("rect", { x: 2.5, y: 2.5, width: 9, height: 9, fill: "#fff", stroke: "#8a94a3", "stroke-width": 1.5 }),
      poisoned: () => sv("circle", { cx: 7, cy: 7, r: 5, fill: "none", stroke: "#9b2c9b", "stroke-width": 2 }),
      screened: () => sv("circle", { cx: 7, cy: 7, r: 5, fill: "none", stroke: "#dd6b20", "stroke-width": 2, "stroke-dasharray": "2 1.5" }),
      audited: () => sv("polygon", { points: "7,1.5 12.5,7 7,12.5 1.5,7", fill: "none", stroke: "#2f855a", "stroke-width": 1.8 }),
      diverged: () => sv("path", { d: "M3 3L11 11M11 3L3 11", stroke: "#1d2430", "stroke-width": 2 }),
      failed: () => sv("path", { d: "M3 3L11 11M11 3L3 11", stroke: "#e53e3e", "stroke-width": 2 }),
    };
    s.append(shapes[kind]());
    return s;
  }

  const title = el("h1", {}, `forkpop explorer: ${D.run.name}`);
  const counts = {};
  for (let i = 0; i < N; i++) counts[ORIGIN[V.origin[i]]] = (counts[ORIGIN[V.origin[i]]] || 0) + 1;
  const marks = ["poisoned", "screened", "audited", "diverged", "failed"].map((k) => [k, V.flags.filter((f) => f & F[k]).length]);
  const sub = el(
    "div",
    { class: "sub" },
    `MLflow run ${D.run.id} (${D.run.status.toLowerCase()}) · ${N} births over ${nGens} generations · ` +
      `${counts.fork || 0} forks, ${(counts.seed || 0) + (counts.distill || 0)} seeds and students` +
      (D.run.world ? ` · world ${D.run.world}` : "") +
      marks.filter(([, n]) => n).map(([k, n]) => ` · ${n} ${k}`).join("")
  );
  const legend = el("div", { class: "legend" });
  for (const [k, label] of [
    ["seed", "first seed"], ["distill", "distilled seed"], ["rejected", "student not accepted"], ["fork", "fork"],
    ["teacher", "teacher (taught the next seed)"], ["poisoned", "poisoned niche"], ["screened", "screened from teaching"],
    ["audited", "labels audited"], ["diverged", "diverged"], ["failed", "failed"],
  ]) legend.append(el("span", {}, glyph(k), label));
  document.body.append(el("header", {}, title, sub, legend));

  const canvas = el("canvas", { id: "graph", "aria-label": "lineage graph" });
  const tooltip = el("div", { id: "tooltip" });
  const search = el("input", { id: "search", placeholder: "find a variant id", list: "ids" });
  const genLabel = el("span", { id: "gen-label" });
  const toolbar = el(
    "div",
    { class: "toolbar" },
    el("button", { id: "fit", title: "show the whole lineage", onclick: () => { fit(); draw(); } }, "fit"),
    el("button", { title: "zoom in", onclick: () => zoomAt(canvas.clientWidth / 2, canvas.clientHeight / 2, 1.6) }, "+"),
    el("button", { title: "zoom out", onclick: () => zoomAt(canvas.clientWidth / 2, canvas.clientHeight / 2, 1 / 1.6) }, "−"),
    search,
    genLabel,
    el("span", { class: "hint" }, "drag to pan · wheel to zoom · click a variant · click a generation's label")
  );
  const pane = el("section", { id: "graph-pane" }, toolbar, canvas, tooltip);
  const details = el("div", { id: "details", class: "card" }, el("h2", {}, "Variant"), el("div", { class: "empty" }, "Click a variant in the graph."));
  const genPanel = el("div", { id: "gen-panel", class: "card" });
  document.body.append(el("main", {}, pane, el("aside", {}, details, genPanel)));
  const curves = el("section", { id: "curves" });
  document.body.append(curves);
  search.addEventListener("keydown", (e) => {
    if (e.key !== "Enter") return;
    const q = search.value.trim();
    const i = byId.has(q) ? byId.get(q) : V.id.findIndex((id) => id.includes(q));
    if (i >= 0) { select(i); center(i); }
  });

  // -- layout: rows are generations (its seeds above its forks), x by parent then niche ------
  const X = new Float64Array(N);
  const rows = Array.from({ length: nRows }, () => []);
  for (let i = 0; i < N; i++) rows[rowOf(i)].push(i);
  let width = 1;
  for (const r of rows) if (r.length && V.origin[r[0]] === 1) width = Math.max(width, r.length);
  const seedSpan = (row) => {
    const m = row.length;
    const step = m > 1 ? Math.max(3, width / m) : 0;
    row.forEach((i, k) => (X[i] = (k - (m - 1) / 2) * step));
  };
  const mean = (a) => a.reduce((s, x) => s + x, 0) / a.length;
  for (let r = 0; r < nRows; r++) {
    const row = rows[r];
    if (!row.length) continue;
    if (r % 2 === 1) {
      const key = (i) => (V.parents[i].length ? X[V.parents[i][0]] : 0);
      row.sort((a, b) => key(a) - key(b) || (V.niche[a] ?? -1) - (V.niche[b] ?? -1) || (V.id[a] < V.id[b] ? -1 : 1));
      row.forEach((i, k) => (X[i] = k - (row.length - 1) / 2));
    } else {
      const key = (i) => (V.parents[i].length ? mean(V.parents[i].map((p) => X[p])) : 0);
      // accepted students and seeds first, then those not accepted, each by their teachers' place
      row.sort((a, b) => ((V.flags[a] & F.rejected) - (V.flags[b] & F.rejected)) || (V.species[a] ?? 0) - (V.species[b] ?? 0) || key(a) - key(b) || (V.id[a] < V.id[b] ? -1 : 1));
      seedSpan(row);
    }
  }
  const rowX = rows.map((r) => Float64Array.from(r.map((i) => X[i]).sort((a, b) => a - b)));
  const rowIdx = rows.map((r) => r.slice().sort((a, b) => X[a] - X[b]));
  const xMin = N ? minOf(X) : 0, xMax = N ? maxOf(X) : 1;

  // -- view ------------------------------------------------------------------------------------
  const view = { sx: 1, sy: 40, tx: 0, ty: 0 };
  const PAD_L = 56;
  // the last generation with forks is the one shown first
  let hover = -1, selected = -1, dirty = true;
  let selGen = Math.max(0, ...rows.map((r, k) => (k % 2 === 1 && r.length ? (k - 1) / 2 : 0)));
  function fit() {
    const w = canvas.clientWidth - PAD_L - 20, h = canvas.clientHeight - 40;
    view.sx = w / Math.max(1, xMax - xMin + 2);
    view.sy = Math.max(8, Math.min(60, h / Math.max(1, nRows - 1)));
    view.tx = PAD_L + 10 - (xMin - 1) * view.sx;
    view.ty = 20;
  }
  const sx = (x) => x * view.sx + view.tx;
  const sy = (r) => r * view.sy + view.ty;
  function zoomAt(px, py, f, onlyX) {
    const wx = (px - view.tx) / view.sx, wy = (py - view.ty) / view.sy;
    view.sx = Math.min(400, Math.max(0.01, view.sx * f));
    if (!onlyX) view.sy = Math.min(600, Math.max(2, view.sy * f));
    view.tx = px - wx * view.sx;
    view.ty = py - wy * view.sy;
    touch();
    draw();
  }
  function center(i) {
    view.sx = Math.max(view.sx, 12);
    view.sy = Math.max(view.sy, 40);
    view.tx = canvas.clientWidth / 2 - X[i] * view.sx;
    view.ty = canvas.clientHeight / 2 - rowOf(i) * view.sy;
    draw();
  }

  function sizes() {
    const fr = Math.max(1.2, Math.min(6, view.sx * 0.38));
    const sr = Math.max(4, Math.min(8, view.sx * 0.6, view.sy * 0.3));
    return { fr, sr };
  }

  function resize() {
    const dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(canvas.clientWidth * dpr);
    canvas.height = Math.round(canvas.clientHeight * dpr);
    draw();
  }

  function draw() {
    dirty = true;
    window.requestAnimationFrame(paint);
  }

  function related(i) {
    // What a hovered variant highlights: a seed its teachers, a fork its seed and the students it taught.
    if (i < 0) return new Set();
    return new Set([i, ...V.parents[i], ...(V.origin[i] === 1 ? children[i] : [])]);
  }

  // The graph is drawn in two layers: the base (bands, edges, nodes, marks), rendered into an
  // offscreen canvas with a margin around the view, and the overlay (hover, selection, the
  // generation labels) drawn over it each frame. While the view moves, the base is only
  // moved and scaled (cheap at any size); it is rendered again once the view rests.
  const MARGIN = 0.5;
  const base = document.createElement("canvas");
  let baseView = null, interacting = false, idleTimer = 0;
  function touch() {
    interacting = true;
    clearTimeout(idleTimer);
    idleTimer = setTimeout(() => { interacting = false; draw(); }, 140);
  }
  const forkColor = new Array(N);
  const spec = new Set(V.species.filter((x) => x !== null)).size > 1;
  for (let i = 0; i < N; i++) {
    forkColor[i] = V.flags[i] & (F.diverged | F.failed) ? "#a0aab6"
      : spec && V.species[i] !== null ? SPECIES[V.species[i] % SPECIES.length] : "#2b6cb0";
  }
  const forkColors = [...new Set(forkColor.filter((c, i) => V.origin[i] === 1))];
  const forkSpan = new Map(); // a seed: the x extent of its forks (the fan drawn when forks are dense)
  for (let i = 0; i < N; i++) {
    if (V.origin[i] !== 1 || !V.parents[i].length) continue;
    const p = V.parents[i][0], e = forkSpan.get(p) || [Infinity, -Infinity, rowOf(i)];
    forkSpan.set(p, [Math.min(e[0], X[i]), Math.max(e[1], X[i]), e[2]]);
  }

  function renderBase(W, H, dpr) {
    const mx = W * MARGIN, my = H * MARGIN;
    base.width = Math.round((W + 2 * mx) * dpr);
    base.height = Math.round((H + 2 * my) * dpr);
    const ctx = base.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, dpr * mx, dpr * my);
    const x0 = -mx, x1 = W + mx, y0 = -my, y1 = H + my;
    for (let g = 0; g < nGens; g++) {
      const a = sy(2 * g - 0.5), b = sy(2 * g + 1.5);
      if (b < y0 || a > y1) continue;
      ctx.fillStyle = g === selGen ? "#e3edfb" : g % 2 ? "#f6f8fa" : "#ffffff";
      ctx.fillRect(x0, a, x1 - x0, b - a);
    }
    const { fr, sr } = sizes();
    const dense = view.sx < 2.5; // forks closer than 2.5 px: a seed's forks as one fan
    const cut = (xa, ya, xb, yb) => (ya < y0 && yb < y0) || (ya > y1 && yb > y1) || (xa < x0 && xb < x0) || (xa > x1 && xb > x1);
    if (dense) {
      ctx.fillStyle = "rgba(110,120,135,0.16)";
      ctx.beginPath();
      for (const [p, [lo, hi, r]] of forkSpan) {
        const xp = sx(X[p]), yp = sy(rowOf(p)), yc = sy(r);
        if (cut(Math.min(xp, sx(lo)), yp, Math.max(xp, sx(hi)), yc)) continue;
        ctx.moveTo(xp, yp);
        ctx.lineTo(sx(lo), yc);
        ctx.lineTo(sx(hi), yc);
        ctx.closePath();
      }
      ctx.fill();
    }
    ctx.lineWidth = 0.6;
    for (const [style, teach] of [["rgba(110,120,135,0.35)", false], ["rgba(224,159,0,0.45)", true]]) {
      if (dense && !teach) continue;
      ctx.strokeStyle = style;
      ctx.beginPath();
      for (let c = 0; c < N; c++) {
        if ((V.origin[c] !== 1) !== teach) continue;
        const yc = sy(rowOf(c)), xc = sx(X[c]);
        for (const p of V.parents[c]) {
          const yp = sy(rowOf(p)), xp = sx(X[p]);
          if (cut(xp, yp, xc, yc)) continue;
          ctx.moveTo(xp, yp);
          ctx.lineTo(xc, yc);
        }
      }
      ctx.stroke();
    }
    const vis = (x, y, m) => x > x0 - m && x < x1 + m && y > y0 - m && y < y1 + m;
    // forks: one path per colour (rectangles when small, discs when not), then teacher rings
    for (const color of forkColors) {
      ctx.fillStyle = color;
      ctx.beginPath();
      for (let i = 0; i < N; i++) {
        if (V.origin[i] !== 1 || forkColor[i] !== color) continue;
        const x = sx(X[i]), y = sy(rowOf(i));
        if (!vis(x, y, 8)) continue;
        if (fr < 2) ctx.rect(x - fr, y - fr, 2 * fr, 2 * fr);
        else {
          ctx.moveTo(x + fr, y);
          ctx.arc(x, y, fr, 0, 2 * Math.PI);
        }
      }
      ctx.fill();
    }
    ctx.strokeStyle = "#e09f00";
    ctx.lineWidth = Math.max(1, fr * 0.45);
    ctx.beginPath();
    for (let i = 0; i < N; i++) {
      if (V.origin[i] !== 1 || !(V.flags[i] & F.teacher)) continue;
      const x = sx(X[i]), y = sy(rowOf(i)), r = fr + ctx.lineWidth / 2;
      if (!vis(x, y, 8)) continue;
      ctx.moveTo(x + r, y);
      ctx.arc(x, y, r, 0, 2 * Math.PI);
    }
    ctx.stroke();
    for (let i = 0; i < N; i++) {
      const x = sx(X[i]), y = sy(rowOf(i));
      if (!vis(x, y, 12)) continue;
      const o = V.origin[i], f = V.flags[i];
      if (o !== 1 && f & F.rejected) {
        ctx.fillStyle = "#fff";
        ctx.strokeStyle = "#8a94a3";
        ctx.lineWidth = 1.5;
        ctx.fillRect(x - sr, y - sr, 2 * sr, 2 * sr);
        ctx.strokeRect(x - sr, y - sr, 2 * sr, 2 * sr);
      } else if (o !== 1) {
        ctx.fillStyle = o === 0 ? "#1d2430" : "#c53030";
        ctx.fillRect(x - sr, y - sr, 2 * sr, 2 * sr);
      }
      if (f & (F.poisoned | F.screened | F.audited | F.diverged | F.failed)) mark(ctx, x, y, o === 1 ? fr : sr, f);
    }
    baseView = { sx: view.sx, sy: view.sy, tx: view.tx, ty: view.ty, selGen, W, H, dpr, mx, my };
  }

  function paint() {
    if (!dirty) return;
    dirty = false;
    const dpr = window.devicePixelRatio || 1;
    const ctx = canvas.getContext("2d");
    const W = canvas.clientWidth, H = canvas.clientHeight;
    if (!W || !H) { dirty = true; return; } // not laid out yet: the canvas's ResizeObserver paints it once it is
    const same = baseView && baseView.sx === view.sx && baseView.sy === view.sy && baseView.tx === view.tx
      && baseView.ty === view.ty && baseView.selGen === selGen && baseView.W === W && baseView.H === H && baseView.dpr === dpr;
    if (!same && (!interacting || !baseView || baseView.W !== W || baseView.H !== H || baseView.dpr !== dpr)) renderBase(W, H, dpr);
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.fillStyle = "#fafbfc";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    // the base, moved and scaled from the view it was rendered for to this one
    const kx = view.sx / baseView.sx, ky = view.sy / baseView.sy;
    ctx.setTransform(kx, 0, 0, ky, dpr * (view.tx - baseView.tx * kx - baseView.mx * kx), dpr * (view.ty - baseView.ty * ky - baseView.my * ky));
    ctx.drawImage(base, 0, 0);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const rel = related(hover);
    if (hover >= 0) {
      ctx.strokeStyle = "#e09f00";
      ctx.lineWidth = 2;
      ctx.beginPath();
      const pairs = [...V.parents[hover].map((p) => [p, hover]), ...children[hover].filter((c) => rel.has(c)).map((c) => [hover, c])];
      for (const [p, c] of pairs) {
        ctx.moveTo(sx(X[p]), sy(rowOf(p)));
        ctx.lineTo(sx(X[c]), sy(rowOf(c)));
      }
      ctx.stroke();
    }
    for (const i of rel) ring(ctx, i, i === hover ? "#e09f00" : "rgba(224,159,0,0.9)", 2);
    if (selected >= 0) ring(ctx, selected, "#1d2430", 2.5);
    // the generation labels, over the graph's left edge
    ctx.fillStyle = "rgba(250,251,252,0.92)";
    ctx.fillRect(0, 0, PAD_L, H);
    ctx.textBaseline = "middle";
    for (let g = 0; g < nGens; g++) {
      const y = sy(2 * g + 0.5);
      if (y < -10 || y > H + 10) continue;
      ctx.fillStyle = g === selGen ? "#1f5fbf" : "#5b6573";
      ctx.font = (g === selGen ? "600 " : "") + "12px system-ui, sans-serif";
      ctx.fillText(`gen ${g}`, 8, y);
    }
  }

  function ring(ctx, i, color, w) {
    const { fr, sr } = sizes();
    const r = (V.origin[i] === 1 ? fr : sr) + 3;
    ctx.strokeStyle = color;
    ctx.lineWidth = w;
    ctx.beginPath();
    ctx.arc(sx(X[i]), sy(rowOf(i)), r, 0, 2 * Math.PI);
    ctx.stroke();
  }

  function mark(ctx, x, y, r, f) {
    const R = Math.max(r + 2.5, 4);
    if (f & F.poisoned) {
      ctx.strokeStyle = "#9b2c9b";
      ctx.lineWidth = 1.8;
      ctx.beginPath();
      ctx.arc(x, y, R, 0, 2 * Math.PI);
      ctx.stroke();
    }
    if (f & F.screened) {
      ctx.strokeStyle = "#dd6b20";
      ctx.lineWidth = 1.6;
      ctx.setLineDash([2, 1.5]);
      ctx.beginPath();
      ctx.arc(x, y, R + 2, 0, 2 * Math.PI);
      ctx.stroke();
      ctx.setLineDash([]);
    }
    if (f & F.audited) {
      ctx.strokeStyle = "#2f855a";
      ctx.lineWidth = 1.5;
      const a = R + 3.5;
      ctx.beginPath();
      ctx.moveTo(x, y - a); ctx.lineTo(x + a, y); ctx.lineTo(x, y + a); ctx.lineTo(x - a, y); ctx.closePath();
      ctx.stroke();
    }
    if (f & (F.diverged | F.failed)) {
      ctx.strokeStyle = f & F.failed ? "#e53e3e" : "#1d2430";
      ctx.lineWidth = 1.8;
      const a = Math.max(3, r);
      ctx.beginPath();
      ctx.moveTo(x - a, y - a); ctx.lineTo(x + a, y + a); ctx.moveTo(x + a, y - a); ctx.lineTo(x - a, y + a);
      ctx.stroke();
    }
  }

  // -- hit testing: the row under the pointer, then the nearest x in it -------------------------
  function hit(px, py) {
    const r = Math.round((py - view.ty) / view.sy);
    if (r < 0 || r >= nRows || !rowX[r].length) return -1;
    if (Math.abs(sy(r) - py) > Math.max(9, sizes().sr + 3)) return -1;
    const wx = (px - view.tx) / view.sx, xs = rowX[r];
    let lo = 0, hi = xs.length - 1;
    while (lo < hi) {
      const m = (lo + hi) >> 1;
      if (xs[m] < wx) lo = m + 1;
      else hi = m;
    }
    let best = -1, bd = Infinity;
    for (const k of [lo - 1, lo]) {
      if (k < 0 || k >= xs.length) continue;
      const d = Math.abs(sx(xs[k]) - px);
      if (d < bd) { bd = d; best = rowIdx[r][k]; }
    }
    const i = best;
    const tol = Math.max(7, V.origin[i] === 1 ? sizes().fr + 3 : sizes().sr + 3);
    return bd <= tol ? i : -1;
  }

  let drag = null;
  canvas.addEventListener("pointerdown", (e) => {
    drag = { x: e.clientX, y: e.clientY, tx: view.tx, ty: view.ty, moved: false };
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener("pointermove", (e) => {
    const b = canvas.getBoundingClientRect(), px = e.clientX - b.left, py = e.clientY - b.top;
    if (drag) {
      const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
      if (drag.moved) {
        touch();
        canvas.classList.add("dragging");
        view.tx = drag.tx + dx;
        view.ty = drag.ty + dy;
        draw();
        return;
      }
    }
    const i = hit(px, py);
    if (i !== hover) {
      hover = i;
      draw();
    }
    if (i >= 0) {
      const fit_ = fitness[i] === null ? "" : ` · fitness ${fitness[i].toFixed(4)}`;
      const more = V.origin[i] === 2 ? ` · ${V.parents[i].length} teachers` : V.niche[i] !== null ? ` · niche ${V.niche[i]}` : "";
      tooltip.textContent = `${V.id[i]} (${ORIGIN[V.origin[i]]})${more}${fit_}`;
      tooltip.style.display = "block";
      tooltip.style.left = `${Math.min(px + 14, b.width - 200)}px`;
      tooltip.style.top = `${py + 40}px`;
    } else tooltip.style.display = "none";
  });
  canvas.addEventListener("pointerup", (e) => {
    const moved = drag && drag.moved;
    drag = null;
    canvas.classList.remove("dragging");
    if (moved) return;
    const b = canvas.getBoundingClientRect(), px = e.clientX - b.left, py = e.clientY - b.top;
    if (px < PAD_L) {
      const g = Math.floor(((py - view.ty) / view.sy + 0.5) / 2);
      if (g >= 0 && g < nGens) selectGeneration(g);
      return;
    }
    const i = hit(px, py);
    if (i >= 0) select(i);
  });
  canvas.addEventListener("pointerleave", () => {
    tooltip.style.display = "none";
    if (hover >= 0) { hover = -1; draw(); }
  });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const b = canvas.getBoundingClientRect();
    zoomAt(e.clientX - b.left, e.clientY - b.top, Math.exp(-e.deltaY * 0.0015), e.shiftKey);
  }, { passive: false });
  window.addEventListener("resize", resize);
  if (window.ResizeObserver) new ResizeObserver(() => resize()).observe(canvas);

  // -- a variant's card --------------------------------------------------------------------------
  function fmt(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(3) : v.toPrecision(4);
  }
  function short(v) {
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e4 || a < 1e-2) return v.toExponential(1);
    return String(Number(v.toPrecision(3)));
  }
  function vlink(i) {
    return el("a", { class: "vid", onclick: () => { select(i); center(i); } }, V.id[i]);
  }
  function mlflowBase() {
    if (D.mlflow_ui) return D.mlflow_ui;
    // Inside MLflow's artifact view the page is a blob: URL of the UI's own origin.
    if (location.protocol === "blob:") {
      try { return new URL(location.href.slice(5)).origin; } catch (e) { return ""; }
    }
    return "";
  }
  function select(i) {
    selected = i;
    const g = V.origin[i] === 2 && V.gen[i] > 0 ? V.gen[i] - 1 : V.gen[i];
    if (g !== selGen) {
      selGen = g;
      showGeneration();
      drawCurves();
    }
    markRow();
    const kv = el("table", { class: "kv" });
    const row = (k, v) => kv.append(el("tr", {}, el("td", {}, k), el("td", {}, v)));
    const o = ORIGIN[V.origin[i]], f = V.flags[i];
    row("born", `${o === "distill" ? "distilled" : o === "fork" ? "forked" : "first seed"}, generation ${V.gen[i]}`);
    if (V.niche[i] !== null) row("niche", String(V.niche[i]));
    if (V.species[i] !== null) row("species", String(V.species[i]));
    const what = D.run.world === "text" ? "−bits/byte" : "accuracy";
    if (fitness[i] !== null) row(o === "fork" ? `fitness (val. ${what})` : `val. ${what}`, fmt(fitness[i]));
    const chips = el("span");
    const chip = (t, c) => chips.append(el("span", { class: `chip ${c || ""}` }, t));
    if (V.status[i]) chip(V.status[i], V.status[i] === "ok" ? "good" : "bad");
    if (f & F.teacher) chip("teacher", "good");
    if (f & F.accepted) chip("accepted", "good");
    if (f & F.rejected) chip("not accepted", "warn");
    if (f & F.poisoned) chip("poisoned niche", "bad");
    if (f & F.screened) chip("screened from teaching", "warn");
    if (f & F.audited) chip("labels audited", "warn");
    if (chips.childNodes.length) row("status", chips);
    if (V.reason[i]) row("reason", V.reason[i]);
    if (V.audit[i]) row("label audit", V.audit[i]);
    if (V.parents[i].length) {
      const ps = el("span");
      V.parents[i].forEach((p, k) => { if (k) ps.append(", "); ps.append(vlink(p)); });
      row(V.origin[i] === 2 ? `teachers (${V.parents[i].length})` : "parent", ps);
    }
    if (children[i].length) {
      const cs = el("span");
      children[i].slice(0, 40).forEach((c, k) => { if (k) cs.append(", "); cs.append(vlink(c)); });
      if (children[i].length > 40) cs.append(` … ${children[i].length - 40} more`);
      row(`${V.origin[i] === 1 ? "taught" : "forks"} (${children[i].length})`, cs);
    }
    const genome = el("table", { class: "kv", id: "genome" });
    D.genes.forEach((g, k) => genome.append(el("tr", {}, el("td", {}, g), el("td", {}, fmt(D.genome[i][k])))));
    const figs = el("table", { class: "kv" });
    for (const k of D.figures) {
      const v = D.values[k][i];
      if (v !== null && k !== "val_accuracy") figs.append(el("tr", {}, el("td", {}, k), el("td", {}, fmt(v))));
    }
    const rid = D.mlflow_runs[V.id[i]];
    let runInfo;
    if (rid) {
      const base = mlflowBase();
      const path = `#/experiments/${D.run.experiment_id}/runs/${rid}?workflowType=machine_learning`;
      // MLflow's artifact view frames the page without pop-ups: there the address is shown to copy
      const framed = location.protocol === "blob:";
      runInfo = base
        ? el("div", { class: "runlink" }, el("a", { href: `${base}/${path}`, target: "_blank", rel: "noopener", id: "mlflow-link" }, `MLflow run ${rid}`),
          ...(framed ? [el("div", { class: "note" }, `MLflow's frame opens no new tab; the run's address: ${base}/${path}`)] : []))
        : el("div", { class: "runlink" }, `MLflow run ${rid} (experiment ${D.run.experiment_id}; in MLflow's UI: ${path})`);
    } else {
      runInfo = el("div", { class: "note" }, "No nested MLflow run (tracking.variant_runs): this birth is a row of the parent run's " +
        `variants/gen-${String(o === "distill" ? V.gen[i] - 1 : V.gen[i]).padStart(4, "0")}.json table.`);
    }
    details.replaceChildren(
      el("h2", {}, V.id[i]), kv, el("h2", { style: "margin-top:8px" }, "Genome"), genome,
      ...(figs.childNodes.length ? [el("h2", { style: "margin-top:8px" }, "Figures"), figs] : []),
      el("div", { style: "margin-top:6px" }, runInfo)
    );
    details.dataset.variant = V.id[i];
    draw();
  }

  // -- a generation: its disagreement heat map and its variants ----------------------------------
  let sortKey = "fitness";
  function selectGeneration(g) {
    selGen = g;
    showGeneration();
    drawCurves();
    draw();
  }
  function genMembers(g) {
    return rows[2 * g + 1] ? rows[2 * g + 1].slice() : [];
  }
  function showGeneration() {
    genLabel.textContent = `generation ${selGen}`;
    const g = selGen;
    const kids = [];
    const m = D.matrices[String(g)];
    const heatWrap = el("div", { id: "heat-wrap" });
    if (m) {
      const n = m.n, bytes = atob(m.q);
      let top = 0;
      for (let k = 0; k < n * n; k++) top = Math.max(top, bytes.charCodeAt(k));
      const vmax = Math.max(13, top); // as the report's heat maps: at least 0.05
      const size = Math.min(240, Math.max(120, n * 4));
      const c = el("canvas", { id: "heat", width: n, height: n, style: `width:${size}px;height:${size}px` });
      const ctx = c.getContext("2d");
      const img = ctx.createImageData(n, n);
      for (let k = 0; k < n * n; k++) {
        const [r, gg, b] = viridis(bytes.charCodeAt(k) / vmax);
        img.data[4 * k] = r; img.data[4 * k + 1] = gg; img.data[4 * k + 2] = b; img.data[4 * k + 3] = 255;
      }
      ctx.putImageData(img, 0, 0);
      const tip = el("div", { class: "note", id: "heat-tip" }, `pairwise disagreement on the probe, ${n} variants` + (n < genMembers(g).length ? " (a subsample)" : "") + `; 0 dark, ${(vmax / 255).toFixed(2)} bright`);
      const cell = (e) => {
        const b = c.getBoundingClientRect();
        const a = Math.floor(((e.clientY - b.top) / b.height) * n), q = Math.floor(((e.clientX - b.left) / b.width) * n);
        return a >= 0 && a < n && q >= 0 && q < n ? [a, q] : null;
      };
      c.addEventListener("mousemove", (e) => {
        const ab = cell(e);
        if (ab) tip.textContent = `${m.ids[ab[0]]} vs ${m.ids[ab[1]]}: ≈${(bytes.charCodeAt(ab[0] * n + ab[1]) / 255).toFixed(3)}`;
      });
      c.addEventListener("click", (e) => {
        const ab = cell(e);
        if (ab && byId.has(m.ids[ab[0]])) select(byId.get(m.ids[ab[0]]));
      });
      heatWrap.append(c, tip);
    } else heatWrap.append(el("div", { class: "empty" }, "No disagreement matrix recorded for this generation."));
    kids.push(el("h2", {}, `Generation ${g}`), heatWrap);
    const members = genMembers(g);
    const seeds = (rows[2 * g] || []).concat(rows[2 * g + 2] || []).filter((i) => V.origin[i] !== 1 && (V.gen[i] === g || V.parents[i].some((p) => V.gen[p] === g)));
    const key = {
      fitness: (i) => -(fitness[i] ?? -1),
      niche: (i) => V.niche[i] ?? -1,
      id: (i) => i,
    }[sortKey];
    members.sort((a, b) => key(a) - key(b));
    const tbody = el("tbody");
    for (const i of seeds.concat(members)) {
      const f = V.flags[i];
      const notes = [];
      if (V.origin[i] !== 1) notes.push(f & F.rejected ? "student, not accepted" : V.gen[i] === g ? "seed" : "student, accepted");
      if (f & F.teacher) notes.push("teacher");
      for (const k of ["poisoned", "screened", "audited", "diverged", "failed"]) if (f & F[k]) notes.push(k);
      const tr = el("tr", { "data-i": i, onclick: () => { select(i); center(i); } },
        el("td", {}, V.id[i]), el("td", {}, V.niche[i] === null ? "" : String(V.niche[i])),
        el("td", {}, fitness[i] === null ? "" : fitness[i].toFixed(4)), el("td", {}, notes.join(", ")));
      tbody.append(tr);
    }
    const th = (label, k) => el("th", { onclick: () => { sortKey = k; showGeneration(); } }, label + (sortKey === k ? " ▾" : ""));
    const table = el("table", {}, el("thead", {}, el("tr", {}, th("variant", "id"), th("niche", "niche"), th("fitness", "fitness"), el("th", {}, ""))), tbody);
    kids.push(el("div", { id: "variant-list" }, table));
    genPanel.replaceChildren(...kids);
    markRow();
  }
  function markRow() {
    for (const tr of genPanel.querySelectorAll("tr[data-i]")) tr.classList.toggle("sel", Number(tr.dataset.i) === selected);
  }
  // matplotlib's viridis, sampled at 9 points and interpolated
  const VIR = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141], [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];
  function viridis(t) {
    const x = Math.max(0, Math.min(1, t)) * (VIR.length - 1), k = Math.min(VIR.length - 2, Math.floor(x)), u = x - k;
    return VIR[k].map((c, j) => Math.round(c + (VIR[k + 1][j] - c) * u));
  }

  // -- the curves --------------------------------------------------------------------------------
  const groups = D.groups;
  const charts = [];
  function drawCurves() {
    for (const c of charts) c();
  }
  for (const [name, keys, scaled] of groups) {
    const box = el("div", { class: "chart" }, el("h3", {}, name + (scaled ? " · each curve over its own range" : "")));
    const svg = sv("svg", { viewBox: "0 0 340 170", preserveAspectRatio: "none" });
    const keyRow = el("div", { class: "keys" });
    keys.forEach((k, j) => keyRow.append(el("span", {}, el("i", { style: `background:${COLORS[j % COLORS.length]}` }), k.replace(/^div\./, ""))));
    box.append(svg, keyRow);
    curves.append(box);
    const raw = keys.map((k) => D.metrics[k].filter(([, v]) => v !== null));
    const all = raw.flat();
    if (!all.length) continue;
    // a scaled chart draws each curve over its own range, 0 to 1 (values in the hover text)
    const pts = raw.map((p) => {
      if (!scaled) return p.map(([s, v]) => [s, v, v]);
      const lo = minOf(p.map(([, v]) => v)), hi = maxOf(p.map(([, v]) => v));
      return p.map(([s, v]) => [s, hi > lo ? (v - lo) / (hi - lo) : 0.5, v]);
    });
    const steps = all.map(([s]) => s), vals = pts.flat().map(([, v]) => v);
    const s0 = minOf(steps), s1 = Math.max(maxOf(steps), s0 + 1);
    let v0 = minOf(vals), v1 = maxOf(vals);
    if (v1 - v0 < 1e-12) { v0 -= 0.5; v1 += 0.5; }
    const L = 46, R = 332, T = 8, B = 150;
    const X_ = (s) => L + ((s - s0) / (s1 - s0)) * (R - L);
    const Y_ = (v) => B - ((v - v0) / (v1 - v0)) * (B - T);
    const render = () => {
      svg.replaceChildren();
      svg.append(sv("line", { x1: L, y1: B, x2: R, y2: B, stroke: "#c8cfd8" }), sv("line", { x1: L, y1: T, x2: L, y2: B, stroke: "#c8cfd8" }));
      for (const v of [v0, (v0 + v1) / 2, v1]) {
        const t = sv("text", { x: L - 3, y: Y_(v) + 3, "text-anchor": "end", "font-size": 9, fill: "#5b6573" });
        t.textContent = scaled ? (v === v0 ? "min" : v === v1 ? "max" : "") : short(v);
        svg.append(t);
      }
      for (const s of [s0, Math.round((s0 + s1) / 2), s1]) {
        const t = sv("text", { x: X_(s), y: B + 12, "text-anchor": "middle", "font-size": 9, fill: "#5b6573" });
        t.textContent = String(s);
        svg.append(t);
      }
      svg.append(sv("line", { x1: X_(selGen), y1: T, x2: X_(selGen), y2: B, stroke: "#1f5fbf", "stroke-dasharray": "3 2" }));
      pts.forEach((p, j) => {
        if (!p.length) return;
        const color = COLORS[j % COLORS.length];
        svg.append(sv("polyline", { points: p.map(([s, v]) => `${X_(s)},${Y_(v)}`).join(" "), fill: "none", stroke: color, "stroke-width": 1.6, "vector-effect": "non-scaling-stroke" }));
        for (const [s, v, value] of p) {
          const c = sv("circle", { cx: X_(s), cy: Y_(v), r: s === selGen ? 3.2 : 1.8, fill: color });
          const t = sv("title", {});
          t.textContent = `${keys[j]} at generation ${s}: ${fmt(value)}`;
          c.append(t);
          svg.append(c);
        }
      });
    };
    svg.addEventListener("click", (e) => {
      const b = svg.getBoundingClientRect();
      const s = Math.round(s0 + (((e.clientX - b.left) / b.width) * 340 - L) / (R - L) * (s1 - s0));
      selectGeneration(Math.max(0, Math.min(nGens - 1, s)));
    });
    render();
    charts.push(render);
  }

  // -- start ---------------------------------------------------------------------------------------
  fit();
  resize();
  showGeneration();
  document.body.dataset.nodes = String(N);
  // For scripts (and tests): where a variant is drawn, and the same actions as a click.
  window.forkpopExplorer = {
    nodeCount: () => N,
    edgeCount: () => V.parents.reduce((s, p) => s + p.length, 0),
    screenPosition: (id) => {
      const i = byId.get(id);
      if (i === undefined) return null;
      const b = canvas.getBoundingClientRect();
      return { x: b.left + sx(X[i]), y: b.top + sy(rowOf(i)) };
    },
    center: (id) => byId.has(id) && (center(byId.get(id)), true),
    panBy: (dx, dy) => { touch(); view.tx += dx; view.ty += dy; draw(); },
    select: (id) => byId.has(id) && (select(byId.get(id)), true),
    selectGeneration,
    // one frame's drawing; ``full``: the base rendered again too (as when the view rests)
    paintMs: (full) => { const t = performance.now(); if (full) baseView = null; dirty = true; paint(); return performance.now() - t; },
    view,
  };
  document.body.dataset.ready = "true";
})();
