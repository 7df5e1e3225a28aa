// alto dashboard: the pipeline as a graph of stages with their instances, live from
// GET /api/stream (Server-Sent Events); recent and slowest requests with each one's
// timeline (GET /api/requests, GET /api/requests/{id}); scale events. No framework, no
// build step, works offline.
(function () {
  "use strict";

  const HISTORY_S = 300;          // sparklines and charts show the last five minutes
  const TOKEN_KEY = "alto.token";

  const state = {
    pipeline: null,               // GET /api/pipeline
    stats: null,                  // latest `stats` event
    depthHistory: new Map(),      // instance id -> [[time, depth], ...]
    stageDepth: new Map(),        // stage -> [[time, total depth], ...] (compact cards)
    selected: null,               // the instance whose cell was clicked (compact cards)
    columnNodes: [],              // the graph's columns, ingress to sink
    layout: null,                 // how they are laid out: see layoutGraph
    rateHistory: [],              // [[time, req/s]]
    latencyHistory: [],           // [[time, p50, p99]]
    layoutKey: "",
    requestOrder: "recent",       // the request list: "recent" or "slowest"
    selectedRequest: null,        // the request whose timeline is shown
    timeline: null,               // its GET /api/requests/{id}
    finishedSeen: -1,             // requests finished when the list was last loaded
    requestsLoadedAt: 0,          // performance.now() of that load
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children || []) node.append(child);
    return node;
  }

  // -- token and commands ----------------------------------------------------------

  const tokenInput = $("token");
  tokenInput.value = localStorage.getItem(TOKEN_KEY) || "";
  tokenInput.addEventListener("input", () => {
    localStorage.setItem(TOKEN_KEY, tokenInput.value.trim());
  });

  let toastTimer = null;
  function toast(message, isError) {
    const node = $("toast");
    node.textContent = message;
    node.className = "toast show" + (isError ? " error" : "");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { node.className = "toast"; }, 3500);
  }

  // `onRefused(message)` also gets a refusal's text, for a control to show it where it was used.
  async function command(path, body, onRefused) {
    const headers = { "Content-Type": "application/json" };
    const token = tokenInput.value.trim();
    if (token) headers.Authorization = "Bearer " + token;
    let response;
    try {
      response = await fetch(path, { method: "POST", headers, body: JSON.stringify(body || {}) });
    } catch (err) {
      toast("Control plane unreachable: " + err, true);
      return null;
    }
    let data = {};
    try { data = await response.json(); } catch (_) { /* not JSON */ }
    if (!response.ok) {
      const hint = response.status === 401 ? " (enter the token above)" : "";
      const message = `${response.status}: ${data.error || response.statusText}${hint}`;
      toast(message, true);
      if (onRefused) onRefused(message);
      return null;
    }
    return data;
  }

  async function scaleStage(stage, delta) {
    const current = stageStats(stage);
    if (!current || current.autoscale) return;
    const target = Math.max(1, current.target_instances + delta);
    const data = await command(`/api/stages/${encodeURIComponent(stage)}/scale`, { instances: target },
      (message) => showRefusal(stage, message));
    if (data) {
      showRefusal(stage, "");
      toast(`${stage}: scaling to ${data.target_instances} instance${data.target_instances === 1 ? "" : "s"}`);
    }
  }

  // A refused scale request (past max_instances, say) stays on its stage's card until the
  // next one succeeds: the toast alone is gone after a few seconds.
  function showRefusal(stage, message) {
    const node = document.querySelector(`.stage[data-stage="${CSS.escape(stage)}"] .scale-refusal`);
    if (!node) return;
    node.textContent = message ? `Scaling refused: ${message}` : "";
    node.hidden = !message;
  }

  async function drainInstance(id) {
    const data = await command(`/api/instances/${id}/drain`);
    if (data) toast(`instance ${id}: ${data.state}`);
  }

  // -- helpers ---------------------------------------------------------------------

  function stageStats(name) {
    return state.stats && state.stats.stages.find((s) => s.name === name);
  }

  function fmt(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    return Number(value).toFixed(digits);
  }

  function ms(seconds) {
    return seconds === null || seconds === undefined ? "–" : fmt(seconds * 1000, seconds < 0.1 ? 1 : 0);
  }

  function trim(history, now) {
    while (history.length && history[0][0] < now - HISTORY_S) history.shift();
  }

  // The time axis grows with the data from one minute up to HISTORY_S, so that a page
  // opened a moment ago is not a flat line squeezed against the right edge.
  function windowSpan(history, now) {
    const span = history.length ? now - history[0][0] : 0;
    return span <= 30 ? 30 : Math.min(HISTORY_S, Math.ceil(span / 60) * 60);
  }

  function spanLabel(span) {
    return span < 60 ? `-${span} s` : `-${span / 60} min`;
  }

  // -- graph layout ----------------------------------------------------------------

  // The graph fits the width of the panel; it never scrolls sideways. Its columns (the
  // layers of the pipeline, ingress to sink) go into as few rows as fit, wrapping like
  // text: cards narrow down to CARD_MIN and the gaps between columns to GAP_MIN before
  // another row is opened. Width to spare goes to the gaps first (up to GAP_ROOMY, where
  // an arrow's routing label fits under its queue name), then to the cards (up to
  // CARD_MAX), then to the gaps again. Only a panel too narrow for one card per row
  // zooms the graph out (a CSS scale), so the text stays as large as the page's wherever
  // a layout can fit it.
  const CARD_MIN = 192;           // a stage's name, its scale controls, a row of 6 cells
  const CARD_MAX = 300;
  const GAP_MIN = 80;             // a queue name fits between two cards (shrunk to 9.5 px)
  const GAP_ROOMY = 124;          // ... and the routing label under it, at 11 px
  const GAP_MAX = 160;
  const GUTTER = 30;              // left and right of every row when there are several:
                                  // the arrows from one row to the next run there
  const COMPACT_ABOVE = 6;        // more instances than this: one small cell per instance

  function layers(pipeline) {
    // Longest path from the ingress: each stage sits one column right of its deepest input.
    const depth = new Map([["ingress", 0]]);
    for (let round = 0; round < pipeline.stages.length + 2; round++) {
      for (const edge of pipeline.edges) {
        if (!depth.has(edge.from)) continue;
        const d = depth.get(edge.from) + 1;
        if (edge.to !== "sink" && (depth.get(edge.to) || 0) < d) depth.set(edge.to, d);
      }
    }
    let last = 0;
    for (const stage of pipeline.stages) {
      if (!depth.has(stage.name)) depth.set(stage.name, 1);
      last = Math.max(last, depth.get(stage.name));
    }
    depth.set("sink", last + 1);
    const columns = [];
    for (const [name, d] of depth) (columns[d] = columns[d] || []).push(name);
    return columns.filter(Boolean);
  }

  function buildGraph() {
    const pipeline = state.pipeline;
    const byName = new Map(pipeline.stages.map((s) => [s.name, s]));
    state.columnNodes = layers(pipeline).map((names, index) => {
      const column = el("div", { class: "column", "data-col": String(index) });
      for (const name of names) {
        if (name === "ingress" || name === "sink") {
          column.append(el("div", { class: "endpoint", id: "node-" + name, "data-node": name, text: name }));
        } else {
          column.append(stageCard(byName.get(name)));
        }
      }
      return column;
    });
    state.layout = null;
    state.layoutKey = "";
    layoutGraph();
    drawEdges();                  // the arrows need no stats: draw them before the first event
  }

  // Splits columns 0..n-1 into k consecutive rows, the widest as narrow as possible.
  function partition(n, k, cost) {
    // best[j][i]: [widest row, cuts] for the first i columns in j rows
    const best = [[[0, []]]];
    for (let j = 1; j <= k; j++) {
      best[j] = [];
      for (let i = j; i <= n - (k - j); i++) {
        let choice = null;
        for (let m = j - 1; m < i; m++) {
          const prev = best[j - 1][m];
          if (!prev) continue;
          const widest = Math.max(prev[0], cost(m, i));
          if (!choice || widest < choice[0]) choice = [widest, [...prev[1], [m, i]]];
        }
        best[j][i] = choice;
      }
    }
    return best[k][n][1];
  }

  function layoutGraph() {
    const graph = $("graph"), inner = $("graph-inner"), columns = $("columns");
    const nodes = state.columnNodes || [];
    if (!nodes.length) return;
    // The pills are measured where they stand: put every column in the document first.
    if (!nodes[0].isConnected) columns.replaceChildren(el("div", { class: "row" }, nodes));
    const avail = graph.clientWidth;
    if (state.layout && state.layout.avail === avail) return;
    const fixed = nodes.map((col) => (col.querySelector(".stage") ? null : col.offsetWidth));
    const n = nodes.length;
    const width = (a, b, card, gap, gutters) => {
      let w = gutters ? 2 * GUTTER : 0;
      for (let i = a; i < b; i++) w += fixed[i] ?? card;
      return w + (b - a - 1) * gap;
    };
    let rows = null;
    for (let k = 1; k <= n && !rows; k++) {
      const cost = (a, b) => width(a, b, CARD_MIN, GAP_MIN, k > 1);
      const split = partition(n, k, cost);
      if (Math.max(...split.map(([a, b]) => cost(a, b))) <= avail) rows = split;
    }
    let scale = 1, card = CARD_MIN, gap = GAP_MIN;
    if (!rows) {                  // not even one card per row fits: zoom out
      rows = nodes.map((_, i) => [i, i + 1]);
      scale = Math.max(0.3, avail / Math.max(...rows.map(([a, b]) => width(a, b, card, gap, n > 1))));
    } else {
      // The same card width and gap in every row, so that the rows line up.
      const multi = rows.length > 1;
      const cards = (a, b) => nodes.slice(a, b).filter((_, i) => fixed[a + i] === null).length;
      const growGap = (limit) => {
        for (const [a, b] of rows) {
          if (b - a > 1) gap = Math.min(gap, (avail - width(a, b, card, 0, multi)) / (b - a - 1));
        }
        gap = Math.max(GAP_MIN, Math.min(limit, gap));
      };
      gap = GAP_ROOMY; growGap(GAP_ROOMY);
      card = CARD_MAX;
      for (const [a, b] of rows) {
        const c = cards(a, b);
        if (c) card = Math.min(card, CARD_MIN + (avail - width(a, b, CARD_MIN, gap, multi)) / c);
      }
      card = Math.floor(Math.max(CARD_MIN, card));
      gap = GAP_MAX; growGap(GAP_MAX);
      gap = Math.floor(gap);
    }
    graph.style.setProperty("--card-w", `${card}px`);
    graph.style.setProperty("--col-gap", `${gap}px`);
    graph.style.setProperty("--gutter", `${rows.length > 1 ? GUTTER : 0}px`);
    const key = rows.map(([a, b]) => `${a}-${b}`).join(",");
    if (!state.layout || state.layout.key !== key || columns.children.length !== rows.length) {
      columns.replaceChildren(...rows.map(([a, b], r) =>
        el("div", { class: "row", "data-row": String(r) }, nodes.slice(a, b))));
    }
    inner.style.transform = scale < 1 ? `scale(${scale})` : "";
    graph.classList.toggle("zoomed", scale < 1);
    state.layout = { avail, key, rows, card, gap, scale };
  }

  function stageCard(stage) {
    const badges = [el("span", { class: "badge", title: "routing into this stage", text: stage.scheduler })];
    if (stage.stateful) {
      badges.push(el("span", {
        class: "badge stateful",
        title: "aggregation-aware: groups are pinned to one instance",
        text: "stateful" + (stage.aggregate_level !== null ? " · level " + stage.aggregate_level : ""),
      }));
    }
    if (stage.fanout) badges.push(el("span", { class: "badge", text: "fan-out" }));
    if (stage.autoscale) {
      badges.push(el("span", {
        class: "badge autoscale",
        title: `the runtime scales this stage between ${stage.autoscale.min} and ${stage.autoscale.max} instances by its queue depth ([stages.${stage.name}.autoscale]); manual scaling is refused`,
        text: `autoscale ${stage.autoscale.min}–${stage.autoscale.max}`,
      }));
    }
    const scale = el("span", { class: "scale" }, [
      el("button", {
        type: "button", "data-action": "scale-down", title: "remove an instance",
        "aria-label": `scale ${stage.name} down`, text: "−",
        onclick: () => scaleStage(stage.name, -1),
      }),
      el("span", { class: "count", title: "ready instances / target", text: "–" }),
      el("button", {
        type: "button", "data-action": "scale-up", title: "add an instance",
        "aria-label": `scale ${stage.name} up`, text: "+",
        onclick: () => scaleStage(stage.name, +1),
      }),
    ]);
    return el("div", { class: "stage", "data-stage": stage.name, id: "stage-" + stage.name }, [
      el("div", { class: "stage-head" }, [el("span", { class: "stage-name", text: stage.name }), scale]),
      el("div", { class: "scale-refusal", role: "alert", hidden: "" }),
      el("div", { class: "stage-badges" }, badges),
      el("div", { class: "stage-meta" }, [
        el("span", { class: "stage-rate", text: "0 frames/s" }),
        el("span", { class: "errors-count", text: "0 errors" }),
      ]),
      el("div", { class: "instances" }),
      // Past COMPACT_ABOVE instances: a summary, one cell per instance coloured by its
      // depth, the stage's total depth over time, and the numbers of the selected cell.
      el("div", { class: "cells-panel", hidden: "" }, [
        el("div", { class: "cells-summary" }, [
          el("div", { class: "tile" }, [el("b", { class: "n-instances" }), el("span", { text: "instances" })]),
          el("div", { class: "tile", title: "total queue depth: frames dispatched to the stage, not yet acknowledged" },
            [el("b", { class: "n-total" }), el("span", { text: "depth" })]),
          el("div", { class: "tile", title: "the deepest queue of an instance" },
            [el("b", { class: "n-max" }), el("span", { class: "n-max-of", text: "max" })]),
        ]),
        el("div", { class: "cells-meta" }, [
          el("span", { class: "m-credits", title: "credits in use / credits, all instances" }),
          el("span", { class: "m-backlog", title: "frames waiting in the runtime for a credit" }),
          el("span", { class: "m-groups", title: "open aggregation groups" }),
          el("span", { class: "m-states" }),
        ]),
        el("div", { class: "cells", role: "list", "aria-label": `${stage.name} instances` }),
        el("div", { class: "cells-spark", title: "total queue depth of the stage" }, [
          el("span", { class: "depth-label", text: "total" }),
          el("canvas", { class: "spark" }),
        ]),
        el("div", { class: "cell-detail" }, [
          el("span", { class: "cell-info" }),
          el("button", {
            type: "button", "data-action": "drain", title: "drain: finish pinned work, then stop",
            text: "drain", onclick: (event) => drainInstance(Number(event.target.dataset.instance)),
          }),
        ]),
      ]),
    ]);
  }

  function instanceCard(inst) {
    return el("div", { class: "instance", "data-instance": String(inst.id), "data-stage": inst.stage }, [
      el("div", { class: "inst-head" }, [
        el("span", { class: "inst-id", text: "#" + inst.id }),
        el("span", { class: "inst-state" }),
        el("button", {
          type: "button", "data-action": "drain", title: "drain: finish pinned work, then stop",
          text: "drain", onclick: () => drainInstance(inst.id),
        }),
      ]),
      el("div", { class: "inst-body" }, [
        el("div", { class: "depth-box", title: "queue depth: frames dispatched, not yet acknowledged" }, [
          el("span", { class: "depth", text: "0" }),
          el("span", { class: "depth-label", text: "queued" }),
        ]),
        el("canvas", { class: "spark" }),
      ]),
      el("div", { class: "inst-meta" }, [
        el("span", { class: "m-credits", title: "credits in use / credits" }),
        el("span", { class: "m-backlog", title: "frames waiting in the runtime for a credit" }),
        el("span", { class: "m-groups", title: "open aggregation groups pinned here" }),
      ]),
      el("div", { class: "inst-error" }),
    ]);
  }

  function cellFor(inst) {
    return el("div", {
      class: "cell", role: "listitem", tabindex: "0", "data-instance": String(inst.id), "data-stage": inst.stage,
      onclick: () => selectInstance(inst.id),
      onkeydown: (event) => { if (event.key === "Enter" || event.key === " ") selectInstance(inst.id); },
    });
  }

  function selectInstance(id) {
    state.selected = state.selected === id ? null : id;
    if (state.stats) updateInstances(state.stats);
  }

  // -- arrows ----------------------------------------------------------------------

  // An arrow between neighbouring columns of a row is a plain curve. One that skips
  // columns of its row would run behind the cards in between (and its labels would land
  // inside them): it leaves its source low, runs in a lane under the lowest card it
  // skips, and rises to its target. One that goes on to a later row runs through the
  // band under its row: out of the source's bottom (or, from a row's last column, out
  // of its side into the right gutter), along a lane of the band, down the left gutter
  // past rows it skips, and into the target's top (or, into a row's first column, its
  // left side). Lanes that share a stretch of a band are stacked, and each row grows at
  // the bottom to make room for its band.
  const LANE_GAP = 24;            // from the bottom of the cards passed to a lane
  const LANE_STEP = 34;           // between stacked lanes (room for both labels)
  const LABEL_ROOM = 22;          // below a lane: the routing label
  const PAD_BOTTOM = 8;           // a row's own padding at the bottom
  const ROW_SPACE = 20;           // at least this much between two rows
  const LABEL_FONT = 11;          // px, as .edges text in style.css
  const LABEL_FONT_MIN = 9.5;     // a label shrinks to this to fit between two cards
  const PARALLEL = 8;             // between arrows that share a bottom, a top or a gap
  const PARALLEL_GUTTER = 5;      // ... or a gutter (GUTTER wide)

  // The k-th of several parallel arrows: 0, -1, +1, -2, +2 ... steps from the middle.
  const spread = (k, step) => step * (k % 2 ? -(k + 1) / 2 : k / 2);

  let measureCtx = null;
  function textWidth(text, size, bold) {
    measureCtx = measureCtx || document.createElement("canvas").getContext("2d");
    measureCtx.font = `${bold ? "600 " : ""}${size}px ${getComputedStyle(document.body).fontFamily}`;
    return measureCtx.measureText(text).width;
  }

  // The largest font size (LABEL_FONT_MIN..LABEL_FONT) at which `text` fits in `room`.
  function fitFont(text, room, bold) {
    const size = LABEL_FONT * room / textWidth(text, LABEL_FONT, bold);
    return size >= LABEL_FONT_MIN ? Math.min(LABEL_FONT, Math.floor(size * 2) / 2) : null;
  }

  function sampleCubic(p0, p1, p2, p3, n) {
    const points = [];
    for (let i = 1; i < n; i++) {
      const t = i / n, u = 1 - t;
      const a = u * u * u, b = 3 * u * u * t, c = 3 * u * t * t, d = t * t * t;
      points.push([a * p0[0] + b * p1[0] + c * p2[0] + d * p3[0], a * p0[1] + b * p1[1] + c * p2[1] + d * p3[1]]);
    }
    return points;
  }

  function inside(point, rect, margin) {
    return point[0] > rect.left - margin && point[0] < rect.right + margin &&
      point[1] > rect.top - margin && point[1] < rect.bottom + margin;
  }

  // An orthogonal polyline with rounded corners.
  function roundedPath(points, radius) {
    const pts = points.filter((p, i) => i === 0 || p[0] !== points[i - 1][0] || p[1] !== points[i - 1][1]);
    let d = `M${pts[0][0]},${pts[0][1]}`;
    for (let i = 1; i < pts.length - 1; i++) {
      const [px, py] = pts[i - 1], [x, y] = pts[i], [nx, ny] = pts[i + 1];
      const r = Math.min(radius, Math.hypot(x - px, y - py) / 2, Math.hypot(nx - x, ny - y) / 2);
      const ax = x - Math.sign(x - px) * r, ay = y - Math.sign(y - py) * r;
      const bx = x + Math.sign(nx - x) * r, by = y + Math.sign(ny - y) * r;
      d += ` L${ax},${ay} Q${x},${y} ${bx},${by}`;
    }
    const last = pts[pts.length - 1];
    return `${d} L${last[0]},${last[1]}`;
  }

  // Where every card, endpoint and row is, in the unscaled coordinates of #graph-inner.
  function measure() {
    const inner = $("graph-inner");
    const scale = state.layout ? state.layout.scale : 1;
    const box = inner.getBoundingClientRect();
    const place = (elem) => {
      const r = elem.getBoundingClientRect();
      const left = (r.left - box.left) / scale, top = (r.top - box.top) / scale;
      const width = r.width / scale, height = r.height / scale;
      return { left, top, right: left + width, bottom: top + height, width, height };
    };
    const rowNodes = [...$("columns").children];
    const rows = rowNodes.map((row) => {
      const r = place(row);
      const pad = parseFloat(getComputedStyle(row).paddingBottom) || 0;
      return { ...r, node: row, contentBottom: r.bottom - pad, cardsBottom: r.top, firstCol: Infinity, lastCol: -1 };
    });
    const boxes = new Map();
    for (const elem of $("columns").querySelectorAll(".stage, .endpoint")) {
      const col = elem.closest(".column");
      const b = { ...place(elem), elem, column: Number(col.dataset.col),
        row: rowNodes.indexOf(col.closest(".row")), endpoint: elem.classList.contains("endpoint") };
      boxes.set(elem, b);
      const row = rows[b.row];
      row.cardsBottom = Math.max(row.cardsBottom, b.bottom);
      row.firstCol = Math.min(row.firstCol, b.column);
      row.lastCol = Math.max(row.lastCol, b.column);
    }
    // The svg covers the rows (centred in #graph-inner), and no more: it must not make
    // the graph wider than the rows.
    const columns = $("columns");
    return { rows, boxes, width: columns.offsetLeft + columns.offsetWidth,
      height: columns.offsetTop + columns.offsetHeight };
  }

  function routeEdges(geo) {
    const { rows, boxes } = geo;
    const node = (name) => document.querySelector(`[data-stage="${CSS.escape(name)}"].stage`) ||
      document.querySelector(`[data-node="${CSS.escape(name)}"]`);
    const bands = rows.map(() => []);         // per row: the lanes under it, [left, right, y]
    const needed = rows.map(() => 0);         // per row: the lowest point its band reaches
    const shared = new Map();                 // how many arrows already use a gutter, bottom, top
    const taken = [];                         // label boxes placed so far
    const paths = [];
    const labels = [];
    const nextSlot = (key) => { const k = shared.get(key) || 0; shared.set(key, k + 1); return k; };
    const lane = (r, left, right, y0, routing) => {
      let y = y0;
      for (let moved = true; moved;) {
        moved = false;
        for (const [l, rr, ly] of bands[r]) {
          if (l < right && rr > left && Math.abs(ly - y) < LANE_STEP) { y = ly + LANE_STEP; moved = true; }
        }
      }
      bands[r].push([left, right, y]);
      needed[r] = Math.max(needed[r], y + (routing !== null ? LABEL_ROOM : 14));
      return y;
    };
    const addLabel = (x, y, text, cls, size) => {
      const w = textWidth(text, size, cls === "queue");
      labels.push({ x, y, text, cls, size });
      taken.push({ left: x - w / 2, right: x + w / 2, top: y - size, bottom: y + 2 });
    };
    const overlaps = (list, r) => list.some((t) => t.left < r.right && t.right > r.left && t.top < r.bottom && t.bottom > r.top);
    // Both labels of a lane, at the first place along it where they overlap nothing; if
    // every place overlaps another label, in the middle (never on a card).
    const laneLabels = (left, right, y, queue, routing) => {
      const wq = textWidth(queue, LABEL_FONT, true), wr = routing === null ? 0 : textWidth(routing, LABEL_FONT, false);
      const half = Math.max(wq, wr) / 2 + 4;
      if (right - left < 2 * half) return;
      const cards = [...boxes.values()];
      const at = (f) => {
        const x = Math.min(right - half, Math.max(left + half, left + (right - left) * f));
        return { x, left: x - half, right: x + half, top: y - 8 - LABEL_FONT, bottom: y + (routing === null ? 0 : 18) };
      };
      const place = [0.5, 0.3, 0.7, 0.15, 0.85, 0.05, 0.95].map(at).find((b) => !overlaps(taken, b) && !overlaps(cards, b)) ||
        [at(0.5)].find((b) => !overlaps(cards, b));
      if (!place) return;
      addLabel(place.x, y - 8, queue, "queue", LABEL_FONT);
      if (routing !== null) addLabel(place.x, y + 16, routing, null, LABEL_FONT);
    };

    const cross = [];
    for (const edge of state.pipeline.edges) {
      const a = node(edge.from), b = node(edge.to);
      if (!a || !b || !boxes.has(a) || !boxes.has(b)) continue;
      const ra = boxes.get(a), rb = boxes.get(b);
      const routing = edge.to === "sink" ? null : edge.routing +
        (edge.aggregate_level !== null && edge.aggregate_level !== undefined ? " @" + edge.aggregate_level : "");
      const id = `${edge.from}->${edge.to}`;
      if (rb.row > ra.row) { cross.push([edge, ra, rb, routing, id]); continue; }
      let x1 = ra.right, y1 = ra.top + ra.height / 2;
      let x2 = rb.left - 2, y2 = rb.top + rb.height / 2;
      // The cards of the columns between the two ends, if the edge skips any.
      const between = [...boxes.values()]
        .filter((r) => r !== ra && r !== rb && r.row === ra.row && r.column > ra.column && r.column < rb.column);
      const dx = Math.max(30, (x2 - x1) / 2);
      const curve = [[x1, y1], [x1 + dx, y1], [x2 - dx, y2], [x2, y2]];
      const [mx, my] = [(x1 + x2) / 2, (y1 + y2) / 2];
      // The plain curve is kept while it, and its labels, stay clear of those cards.
      const blocked = between.some((r) =>
        sampleCubic(...curve, 32).some((p) => inside(p, r, 6)) ||
        inside([mx, my], r, 24));
      if (!blocked) {
        paths.push({ id, d: `M${x1},${y1} C${curve[1]} ${curve[2]} ${x2},${y2}` });
        // Between two close cards the labels shrink a little, or the routing label (also
        // on the target's card, as its first badge) is left out.
        const room = x2 - x1 - 6;
        const qs = fitFont(edge.queue, room, true);
        if (qs !== null) addLabel(mx, my - 8, edge.queue, "queue", qs);
        const rs = routing === null ? null : fitFont(routing, room, false);
        if (rs !== null) addLabel(mx, my + 16, routing, null, rs);
        continue;
      }
      const left = Math.min(...between.map((r) => r.left));
      const right = Math.max(...between.map((r) => r.right));
      const y = lane(ra.row, left, right, Math.max(...between.map((r) => r.bottom)) + LANE_GAP, routing);
      // Leave and enter a card low, clear of the labels of its straight edges.
      if (!ra.endpoint) y1 = Math.min(ra.bottom - 6, Math.max(y1 + 28, ra.bottom - 14));
      if (!rb.endpoint) y2 = Math.min(rb.bottom - 6, Math.max(y2 + 28, rb.bottom - 14));
      const c1 = (left - x1) / 2, c2 = (x2 - right) / 2;
      paths.push({ id, d: `M${x1},${y1} C${x1 + c1},${y1} ${left - c1},${y} ${left},${y} ` +
        `L${right},${y} C${right + c2},${y} ${x2 - c2},${y2} ${x2},${y2}`, lane: [left, right, y, edge.queue, routing] });
    }

    // Arrows to later rows, after the others: their lanes stack under the in-row ones.
    for (const [edge, ra, rb, routing, id] of cross) {
      const rs = rows[ra.row], rt = rows[rb.row];
      const gutterLeft = rt.left + GUTTER / 2;
      const column = (r) => [...boxes.values()].filter((o) => o !== r && o.column === r.column);
      const points = [];
      // Out of the source: sideways from a row's last column (or a card with another
      // under it), else out of its bottom.
      let exitX;
      if (ra.column === rs.lastCol || column(ra).some((o) => o.top >= ra.bottom)) {
        const next = [...boxes.values()].filter((o) => o.row === ra.row && o.column === ra.column + 1);
        const k = nextSlot(`side:${ra.row}:${ra.column}`);
        exitX = next.length ? (ra.right + Math.min(...next.map((o) => o.left))) / 2 + spread(k, PARALLEL)
          : rs.right - GUTTER / 2 + spread(k, PARALLEL_GUTTER);
        const y1 = next.length ? Math.min(ra.bottom - 6, ra.top + ra.height / 2 + 28) : ra.top + ra.height / 2;
        points.push([ra.right, y1], [exitX, y1]);
      } else {
        exitX = ra.left + ra.width / 2 + spread(nextSlot(`bottom:${edge.from}`), PARALLEL);
        points.push([exitX, ra.bottom]);
      }
      // Into the target: into a row's first column (or a card with another above it)
      // from the left, else from above.
      const fromLeft = rb.column === rt.firstCol || column(rb).some((o) => o.bottom <= rb.top);
      let entryX, last;
      if (fromLeft) {
        const prev = [...boxes.values()].filter((o) => o.row === rb.row && o.column === rb.column - 1);
        const k = nextSlot(`left:${rb.row}:${rb.column}`);
        entryX = prev.length ? (Math.max(...prev.map((o) => o.right)) + rb.left) / 2 + spread(k, PARALLEL)
          : gutterLeft + spread(k, PARALLEL_GUTTER);
        const y2 = prev.length && !rb.endpoint ? rb.top + 16 : rb.top + rb.height / 2;
        last = [[entryX, y2], [rb.left - 2, y2]];
      } else {
        entryX = rb.left + rb.width / 2 + spread(nextSlot(`top:${edge.to}`), PARALLEL);
        last = [[entryX, rb.top - 2]];
      }
      // The band under the source's row; past rows in between, down the left gutter.
      const direct = rb.row === ra.row + 1 || (fromLeft && rb.column === rt.firstCol);
      const turnX = direct ? entryX : gutterLeft + spread(nextSlot("gutter"), PARALLEL_GUTTER);
      const [l1, r1] = [Math.min(exitX, turnX), Math.max(exitX, turnX)];
      const y = lane(ra.row, l1, r1, rs.cardsBottom + LANE_GAP, routing);
      points.push([exitX, y], [turnX, y]);
      let labelLane = [l1, r1, y];
      if (!direct) {
        const [l2, r2] = [Math.min(turnX, entryX), Math.max(turnX, entryX)];
        const y2 = lane(rb.row - 1, l2, r2, rows[rb.row - 1].cardsBottom + LANE_GAP, routing);
        points.push([turnX, y2], [entryX, y2]);
        if (r2 - l2 > r1 - l1) labelLane = [l2, r2, y2];
      }
      points.push(...last);
      paths.push({ id, d: roundedPath(points, 12), lane: [...labelLane, edge.queue, routing] });
    }
    for (const p of paths) if (p.lane) laneLabels(...p.lane);
    // The padding under each row that makes room for its band.
    const padding = rows.map((row, r) => {
      const floor = r < rows.length - 1 ? ROW_SPACE : PAD_BOTTOM;
      return Math.max(floor, Math.ceil(needed[r] - row.contentBottom));
    });
    return { paths, labels, padding };
  }

  function drawEdges() {
    if (!state.pipeline || !state.layout) return;
    let geo = measure();
    let plan = routeEdges(geo);
    // Room for the bands moves the rows below: measure again and route once more (the
    // bands depend only on where the cards are within their row, so this settles).
    let moved = false;
    geo.rows.forEach((row, r) => {
      const value = `${plan.padding[r]}px`;
      if (row.node.style.paddingBottom !== value) { row.node.style.paddingBottom = value; moved = true; }
    });
    if (moved) { geo = measure(); plan = routeEdges(geo); }

    const ns = "http://www.w3.org/2000/svg";
    const parts = [];
    const defs = document.createElementNS(ns, "defs");
    defs.innerHTML = '<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" ' +
      'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#9aa3b8"/></marker>';
    parts.push(defs);
    for (const p of plan.paths) {
      const path = document.createElementNS(ns, "path");
      path.setAttribute("marker-end", "url(#arrow)");
      path.setAttribute("data-edge", p.id);
      path.setAttribute("d", p.d);
      parts.push(path);
    }
    for (const l of plan.labels) {
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", l.x); t.setAttribute("y", l.y);
      t.setAttribute("text-anchor", "middle");
      if (l.cls) t.setAttribute("class", l.cls);
      if (l.size !== LABEL_FONT) t.style.fontSize = `${l.size}px`;
      t.textContent = l.text;
      parts.push(t);
    }
    const svg = $("edges");
    svg.setAttribute("width", geo.width);
    svg.setAttribute("height", geo.height);
    svg.replaceChildren(...parts);
    const graph = $("graph");
    const scale = state.layout.scale;
    graph.style.height = scale < 1 ? `${Math.ceil(geo.height * scale)}px` : "";
  }

  // -- live updates ----------------------------------------------------------------

  function sizeCanvas(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(canvas.clientWidth * ratio));
    const h = Math.max(1, Math.round(canvas.clientHeight * ratio));
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    return [ctx, canvas.clientWidth, canvas.clientHeight];
  }

  function sparkline(canvas, history, now, limit) {
    const [ctx, w, h] = sizeCanvas(canvas);
    ctx.clearRect(0, 0, w, h);
    // Scale to the data, not to the credits: a depth of 8 against 64 credits must still
    // show. The credit line appears once the depth comes near it.
    const peak = Math.max(1, ...history.map((p) => p[1]));
    const top = limit && limit <= peak * 1.5 ? Math.max(peak, limit) : peak;
    const span = windowSpan(history, now);
    const x = (t) => w - ((now - t) / span) * w;
    const y = (v) => h - 2 - (v / top) * (h - 4);
    if (limit && limit <= top) {
      ctx.strokeStyle = "rgba(214, 51, 63, 0.35)";
      ctx.setLineDash([3, 3]);
      ctx.beginPath(); ctx.moveTo(0, y(limit)); ctx.lineTo(w, y(limit)); ctx.stroke();
      ctx.setLineDash([]);
    }
    if (!history.length) return;
    ctx.beginPath();
    ctx.moveTo(x(history[0][0]), h);
    for (const [t, v] of history) ctx.lineTo(x(t), y(v));
    ctx.lineTo(x(history[history.length - 1][0]), h);
    ctx.closePath();
    ctx.fillStyle = "rgba(53, 99, 233, 0.15)";
    ctx.fill();
    ctx.beginPath();
    history.forEach(([t, v], i) => (i ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
    ctx.strokeStyle = "#3563e9";
    ctx.lineWidth = 1.4;
    ctx.stroke();
  }

  function lineChart(canvas, history, now, series, unit) {
    const [ctx, w, h] = sizeCanvas(canvas);
    ctx.clearRect(0, 0, w, h);
    const left = 44, bottom = 16;
    let top = 0;
    for (const p of history) for (const s of series) if (p[s.index] !== null) top = Math.max(top, p[s.index]);
    top = top > 0 ? top * 1.15 : 1;
    const span = windowSpan(history, now);
    const x = (t) => left + (1 - (now - t) / span) * (w - left - 4);
    const y = (v) => 6 + (1 - v / top) * (h - bottom - 6);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#6b7487";
    ctx.strokeStyle = "#e6e9f0";
    ctx.lineWidth = 1;
    for (const frac of [0, 0.5, 1]) {
      const v = top * frac;
      ctx.beginPath(); ctx.moveTo(left, y(v)); ctx.lineTo(w - 4, y(v)); ctx.stroke();
      ctx.fillText(unit(v), 2, y(v) + 4);
    }
    ctx.fillText(spanLabel(span), left, h - 2);
    ctx.fillText("now", w - 26, h - 2);
    for (const s of series) {
      ctx.beginPath();
      let started = false;
      for (const p of history) {
        if (p[s.index] === null) { started = false; continue; }
        if (started) ctx.lineTo(x(p[0]), y(p[s.index]));
        else { ctx.moveTo(x(p[0]), y(p[s.index])); started = true; }
      }
      ctx.strokeStyle = s.color;
      ctx.lineWidth = 1.6;
      ctx.stroke();
    }
  }

  // The colour of a cell: a blue ramp over powers of two of the depth, then the credits'
  // colours (as the depth numbers of full cards use them): half the credits, all of them.
  function depthLevel(depth, credits) {
    if (depth >= credits) return "high";
    if (depth > 0 && depth * 2 >= credits) return "mid";
    return depth <= 0 ? "0" : depth === 1 ? "1" : depth < 4 ? "2" : depth < 8 ? "3" : "4";
  }

  function instanceNumbers(inst) {
    return `credits ${inst.credits_in_use ?? 0}/${inst.credits} · backlog ${inst.backlog} · groups ${inst.open_groups}`;
  }

  function updateRows(card, instances, now) {
    const list = card.querySelector(".instances");
    const ids = instances.map((i) => String(i.id));
    for (const node of [...list.children]) {
      if (!ids.includes(node.dataset.instance)) node.remove();
    }
    instances.forEach((inst, index) => {
      let node = list.querySelector(`.instance[data-instance="${inst.id}"]`);
      if (!node) node = instanceCard(inst);
      if (list.children[index] !== node) list.insertBefore(node, list.children[index] || null);
      node.dataset.state = inst.state;
      const depth = node.querySelector(".depth");
      depth.textContent = String(inst.queue_depth);
      depth.dataset.level = inst.queue_depth >= inst.credits ? "high"
        : inst.queue_depth * 2 >= inst.credits && inst.queue_depth > 0 ? "mid" : "low";
      node.querySelector(".inst-state").textContent = inst.state;
      node.querySelector(".m-credits").textContent = `credits ${inst.credits_in_use ?? 0}/${inst.credits}`;
      node.querySelector(".m-backlog").textContent = `backlog ${inst.backlog}`;
      node.querySelector(".m-groups").textContent = `groups ${inst.open_groups}`;
      node.querySelector(".inst-error").textContent = inst.last_error || "";
      node.querySelector("button[data-action=drain]").disabled = inst.state !== "ready";
      const history = state.depthHistory.get(inst.id) || [];
      sparkline(node.querySelector(".spark"), history, now, inst.credits);
    });
  }

  function updateCells(card, stage, instances, now) {
    const grid = card.querySelector(".cells");
    const ids = instances.map((i) => String(i.id));
    for (const node of [...grid.children]) {
      if (!ids.includes(node.dataset.instance)) node.remove();
    }
    let total = 0, credits = 0, inUse = 0, backlog = 0, groups = 0, max = null;
    const states = new Map();
    instances.forEach((inst, index) => {
      let cell = grid.querySelector(`.cell[data-instance="${inst.id}"]`);
      if (!cell) cell = cellFor(inst);
      if (grid.children[index] !== cell) grid.insertBefore(cell, grid.children[index] || null);
      cell.textContent = String(inst.queue_depth);
      cell.dataset.depth = String(inst.queue_depth);
      cell.dataset.level = depthLevel(inst.queue_depth, inst.credits);
      cell.dataset.state = inst.state;
      cell.classList.toggle("selected", state.selected === inst.id);
      cell.title = `#${inst.id} ${inst.state} · depth ${inst.queue_depth} · ${instanceNumbers(inst)}` +
        (inst.last_error ? `\n${inst.last_error}` : "");
      total += inst.queue_depth;
      credits += inst.credits;
      inUse += inst.credits_in_use ?? 0;
      backlog += inst.backlog;
      groups += inst.open_groups;
      if (!max || inst.queue_depth > max.queue_depth) max = inst;
      states.set(inst.state, (states.get(inst.state) || 0) + 1);
    });
    card.querySelector(".n-instances").textContent = String(instances.length);
    card.querySelector(".n-total").textContent = String(total);
    card.querySelector(".n-max").textContent = max ? String(max.queue_depth) : "–";
    card.querySelector(".n-max-of").textContent = max && max.queue_depth ? `max #${max.id}` : "max";
    const notReady = [...states].filter(([s]) => s !== "ready").map(([s, n]) => `${n} ${s}`);
    const meta = card.querySelector(".cells-meta");
    meta.querySelector(".m-credits").textContent = `credits ${inUse}/${credits}`;
    meta.querySelector(".m-backlog").textContent = `backlog ${backlog}`;
    meta.querySelector(".m-groups").textContent = `groups ${groups}`;
    meta.querySelector(".m-states").textContent = notReady.join(" · ");
    sparkline(card.querySelector(".cells-spark canvas"), state.stageDepth.get(stage.name) || [], now,
      credits || null);
    // The selected cell's numbers, and its drain button.
    const selected = instances.find((i) => i.id === state.selected);
    const detail = card.querySelector(".cell-detail");
    const drain = detail.querySelector("button[data-action=drain]");
    detail.classList.toggle("empty", !selected);
    detail.querySelector(".cell-info").textContent = selected
      ? `#${selected.id} ${selected.state} · depth ${selected.queue_depth} · ${instanceNumbers(selected)}` +
        (selected.last_error ? ` · ${selected.last_error}` : "")
      : "click a cell for its numbers";
    drain.hidden = !selected;
    drain.disabled = !selected || selected.state !== "ready";
    drain.dataset.instance = selected ? String(selected.id) : "";
  }

  function updateInstances(stats) {
    const live = stats.instances.filter((i) => i.state !== "stopped");
    const byStage = new Map();
    for (const inst of live) {
      if (!byStage.has(inst.stage)) byStage.set(inst.stage, []);
      byStage.get(inst.stage).push(inst);
    }
    let layoutKey = "";
    for (const stage of stats.stages) {
      const card = document.querySelector(`.stage[data-stage="${CSS.escape(stage.name)}"]`);
      if (!card) continue;
      const instances = (byStage.get(stage.name) || []).sort((a, b) => a.id - b.id);
      layoutKey += stage.name + ":" + instances.map((i) => i.id).join(",") + ";";
      // Up to COMPACT_ABOVE instances, a card each with its sparkline; past that, a cell
      // each, so that a stage of 20 instances stays as tall as one of 4.
      const compact = instances.length > COMPACT_ABOVE;
      card.classList.toggle("compact", compact);
      card.querySelector(".instances").hidden = compact;
      card.querySelector(".cells-panel").hidden = !compact;
      if (compact) {
        card.querySelector(".instances").replaceChildren();
        updateCells(card, stage, instances, stats.time);
      } else {
        card.querySelector(".cells").replaceChildren();
        updateRows(card, instances, stats.time);
      }
      const ready = instances.filter((i) => i.state === "ready").length;
      card.querySelector(".count").textContent = `${ready} / ${stage.target_instances}`;
      const down = card.querySelector("[data-action=scale-down]");
      const up = card.querySelector("[data-action=scale-up]");
      card.classList.toggle("autoscaled", Boolean(stage.autoscale));
      if (stage.autoscale) {
        // The autoscaler owns the count: the buttons would only be refused (409).
        const owned = `autoscaled between ${stage.autoscale.min} and ${stage.autoscale.max} instances`;
        down.disabled = up.disabled = true;
        down.title = up.title = owned;
      } else {
        down.disabled = stage.target_instances <= 1;
        up.disabled = false;
        down.title = "remove an instance";
        up.title = stage.max_instances
          ? `add an instance (at most ${stage.max_instances}: its max_instances)` : "add an instance";
      }
      card.querySelector(".stage-rate").textContent = `${fmt(stage.frames_per_s, 0)} frames/s`;
      const errors = card.querySelector(".errors-count");
      errors.textContent = `${stage.errors} error${stage.errors === 1 ? "" : "s"}`;
      errors.classList.toggle("bad", stage.errors > 0);
    }
    // Cards grow and shrink with their instances and errors: redraw the arrows each time
    // (a handful of paths, four times a second).
    state.layoutKey = layoutKey;
    drawEdges();
  }

  function updateErrors(stats) {
    const items = [];
    for (const inst of stats.instances) {
      if (inst.last_error) items.push([`instance ${inst.id} (${inst.stage})`, inst.last_error]);
    }
    for (const err of stats.recent_errors.slice().reverse()) {
      items.push([`request ${err.request_id}, ${fmt(err.age_s, 0)} s ago`, err.message]);
    }
    const list = $("errors");
    list.replaceChildren(...(items.length
      ? items.slice(0, 12).map(([when, msg]) =>
        el("li", {}, [el("span", { class: "when", text: when }), el("span", { class: "msg", text: msg })]))
      : [el("li", { class: "none", text: "No errors" })]));
  }

  // -- scale events ------------------------------------------------------------------

  function ago(seconds) {
    if (seconds < 60) return `${Math.round(seconds)} s ago`;
    if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
    return `${(seconds / 3600).toFixed(1)} h ago`;
  }

  function updateScaleLog(stats) {
    const events = (stats.scale_log || []).slice().reverse();
    $("scale-log").replaceChildren(...(events.length
      ? events.slice(0, 12).map((e) => el("li", { "data-stage": e.stage }, [
        el("span", { class: "when", text: ago(e.age_s) }),
        el("b", { text: e.stage }),
        el("span", { text: `${e.from_instances} → ${e.to_instances}` }),
        el("span", { class: "by", "data-by": e.by, text: e.by }),
        el("span", { class: "reason", text: e.reason }),
      ]))
      : [el("li", { class: "none", text: "No scale events" })]));
  }

  // -- requests and their timelines ----------------------------------------------------

  function secs(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    return seconds < 1 ? `${fmt(seconds * 1000, seconds < 0.1 ? 1 : 0)} ms` : `${fmt(seconds, 2)} s`;
  }

  async function loadRequests() {
    state.requestsLoadedAt = performance.now();
    let data;
    try {
      const response = await fetch(`/api/requests?order=${state.requestOrder}&limit=15`);
      if (!response.ok) return;
      data = await response.json();
    } catch (_) {
      return;                     // the stream's reconnecting says so already
    }
    if (data.order !== state.requestOrder) return;   // a tab switch overtook this answer
    const rows = data.requests.map((r) => {
      const row = el("tr", {
        class: "req-row" + (r.request_id === state.selectedRequest ? " selected" : ""),
        "data-request": String(r.request_id), tabindex: "0",
        title: r.error || `request ${r.request_id}: ${r.results} results`,
        onclick: () => selectRequest(r.request_id),
        onkeydown: (event) => { if (event.key === "Enter") selectRequest(r.request_id); },
      }, [
        el("td", { text: `#${r.request_id}` }),
        el("td", {}, [el("span", { class: "status", "data-status": r.status, text: r.status.replace("_", " ") })]),
        el("td", { class: "num latency", text: secs(r.latency_s) }),
        el("td", { class: "num first", text: secs(r.time_to_first_result_s) }),
        el("td", { class: "num results", text: String(r.results) }),
      ]);
      return row;
    });
    $("req-rows").replaceChildren(...(rows.length ? rows
      : [el("tr", { class: "none" }, [el("td", { colspan: "5", text: "No finished requests yet" })])]));
  }

  // The list follows the requests that finish, at most once a second.
  function maybeLoadRequests(stats) {
    const f = stats.finished;
    if (!f) return;
    const finished = f.done + f.failed + f.cancelled + f.timed_out;
    if (finished === state.finishedSeen || performance.now() - state.requestsLoadedAt < 1000) return;
    state.finishedSeen = finished;
    loadRequests();
  }

  for (const tab of document.querySelectorAll(".tabs [data-order]")) {
    tab.addEventListener("click", () => {
      state.requestOrder = tab.dataset.order;
      for (const other of document.querySelectorAll(".tabs [data-order]")) {
        other.setAttribute("aria-selected", String(other === tab));
      }
      loadRequests();
    });
  }

  async function selectRequest(id) {
    state.selectedRequest = id;
    for (const row of document.querySelectorAll("#req-rows .req-row")) {
      row.classList.toggle("selected", Number(row.dataset.request) === id);
    }
    $("timeline-head").textContent = `request ${id}: loading…`;
    let data;
    try {
      const response = await fetch(`/api/requests/${id}`);
      data = await response.json();
      if (!response.ok) {
        $("timeline-head").textContent = `request ${id}: ${data.error || response.statusText}`;
        return;
      }
    } catch (err) {
      $("timeline-head").textContent = `request ${id}: ${err}`;
      return;
    }
    if (state.selectedRequest !== id) return;
    state.timeline = data;
    drawTimeline();
  }

  const STAGE_COLOURS = ["#3563e9", "#e07b18", "#1f9d60", "#c2334a", "#8a4bd6", "#0f8ea3", "#a67c00", "#5c6b84"];
  const SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attrs, children) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children || []) node.append(child);
    return node;
  }

  function niceStep(span, ticks) {
    const raw = span / ticks, mag = 10 ** Math.floor(Math.log10(raw));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= raw) return m * mag;
    return 10 * mag;
  }

  // The request the way the paper's Figure 2 draws it: a row per stage it visited, each
  // partial output a box at the moment the runtime relayed it out of the stage (outlined
  // when it went to the client), each input an instance processed a faint bar from its
  // arrival to its end, and a dashed line where the request ended. Seconds since admission.
  function drawTimeline() {
    const data = state.timeline;
    if (!data) return;
    const box = $("timeline");
    const trace = data.trace;
    const end = data.latency_s ?? data.elapsed_s ?? null;
    const head = [el("b", { text: `request ${data.request_id}` }), document.createTextNode(
      `: ${String(data.state).replace("_", " ")}` +
      (end !== null ? ` after ${secs(end)}` : "") +
      (data.results !== undefined ? ` · ${data.results} results` : "") +
      (data.time_to_first_result_s !== null && data.time_to_first_result_s !== undefined
        ? ` · first after ${secs(data.time_to_first_result_s)}` : "") +
      (trace ? ` · trace ${trace.trace_id}` : "") +
      (data.error ? ` · ${data.error}` : ""))];
    $("timeline-head").replaceChildren(...head);
    $("timeline-legend").hidden = !trace;
    if (!trace) {
      box.replaceChildren(el("p", { class: "none", text:
        "Not traced: the runtime samples [runtime] trace_sample_rate of the requests (or the caller's traceparent said not to)." }));
      return;
    }
    const order = state.pipeline ? state.pipeline.stages.map((s) => s.name) : [];
    const visited = new Set(trace.spans.map((s) => s.stage));
    for (const h of trace.hops) if (h.from !== "ingress" && h.from !== "runtime") visited.add(h.from);
    const stages = [...order.filter((n) => visited.has(n)), ...[...visited].filter((n) => !order.includes(n))];
    let tmax = end || 0;
    for (const h of trace.hops) tmax = Math.max(tmax, h.t);
    for (const s of trace.spans) tmax = Math.max(tmax, s.ended || 0);
    tmax = Math.max(tmax, 0.001) * 1.03;
    const width = Math.max(320, box.clientWidth);
    const left = 96, right = 14, top = 6, rowH = 30, axis = 22;
    const height = top + stages.length * rowH + axis;
    const x = (t) => left + (t / tmax) * (width - left - right);
    const parts = [];
    const step = niceStep(tmax, Math.max(2, Math.floor((width - left) / 90)));
    for (let t = 0; t <= tmax + 1e-9; t += step) {
      parts.push(svg("line", { class: "tl-grid", x1: x(t), x2: x(t), y1: top, y2: top + stages.length * rowH }));
      parts.push(svg("text", { class: "tl-tick", x: x(t), y: height - 6, "text-anchor": "middle",
        text: step < 1 ? `${Math.round(t * 1000)} ms` : `${+t.toFixed(2)} s` }));
    }
    stages.forEach((stage, i) => {
      const y = top + i * rowH;
      const colour = STAGE_COLOURS[Math.max(0, order.indexOf(stage)) % STAGE_COLOURS.length];
      const row = svg("g", { class: "tl-row", "data-stage": stage });
      if (i % 2) row.append(svg("rect", { class: "tl-stripe", x: left, y, width: width - left - right, height: rowH }));
      row.append(svg("text", { class: "tl-label", x: left - 8, y: y + rowH / 2 + 4, "text-anchor": "end", text: stage }));
      for (const s of trace.spans) {
        if (s.stage !== stage || s.received === undefined) continue;
        const x0 = x(s.received), x1 = x(s.ended ?? s.received);
        row.append(svg("rect", {
          class: "tl-span", x: x0, y: y + 5, width: Math.max(1.5, x1 - x0), height: rowH - 10,
          fill: colour, "fill-opacity": 0.16,
        }, [svg("title", { text:
          `${stage} #${s.instance} ${JSON.stringify(s.key_path)} ${s.kind || "process"}: ` +
          `arrived ${secs(s.received)}, waited ${secs((s.started ?? s.received) - s.received)}, ` +
          `processed ${secs((s.ended ?? s.started) - (s.started ?? s.received))}, ${s.outputs ?? 0} outputs` +
          (s.attributes && s.attributes["gen_ai.usage.output_tokens"] !== undefined
            ? `, ${s.attributes["gen_ai.usage.output_tokens"]} tokens` : "") }) ]));
      }
      for (const h of trace.hops) {
        if (h.from !== stage) continue;
        const result = h.to === "sink";
        row.append(svg("rect", {
          class: "tl-box" + (result ? " result" : ""), x: x(h.t) - 3.5, y: y + rowH / 2 - 3.5,
          width: 7, height: 7, fill: colour,
        }, [svg("title", { text: `${h.queue} → ${h.to} at ${secs(h.t)} ${JSON.stringify(h.key_path)}` })]));
      }
      parts.push(row);
    });
    if (data.time_to_first_result_s !== null && data.time_to_first_result_s !== undefined) {
      const fx = x(data.time_to_first_result_s);
      parts.push(svg("line", { class: "tl-first", x1: fx, x2: fx, y1: top, y2: top + stages.length * rowH },
        [svg("title", { text: `first result at ${secs(data.time_to_first_result_s)}` })]));
    }
    if (end !== null) {
      const ex = x(end);
      parts.push(svg("line", { class: "tl-end", x1: ex, x2: ex, y1: top - 2, y2: top + stages.length * rowH + 2 }));
      parts.push(svg("text", { class: "tl-end-label", x: ex - 4, y: top + 10, "text-anchor": "end",
        text: `${String(data.state).replace("_", " ")} ${secs(end)}` }));
    }
    box.replaceChildren(svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`,
      role: "img", "aria-label": `timeline of request ${data.request_id}` }, parts));
  }

  function onStats(stats) {
    state.stats = stats;
    const now = stats.time;
    if (state.pipeline && stats.stages.some((s) => !document.querySelector(`.stage[data-stage="${CSS.escape(s.name)}"]`))) {
      loadPipeline();
    }
    for (const inst of stats.instances) {
      if (inst.state === "stopped") { state.depthHistory.delete(inst.id); continue; }
      const history = state.depthHistory.get(inst.id) || [];
      history.push([now, inst.queue_depth]);
      trim(history, now);
      state.depthHistory.set(inst.id, history);
    }
    for (const stage of stats.stages) {
      const total = stats.instances.filter((i) => i.stage === stage.name && i.state !== "stopped")
        .reduce((sum, i) => sum + i.queue_depth, 0);
      const history = state.stageDepth.get(stage.name) || [];
      history.push([now, total]);
      trim(history, now);
      state.stageDepth.set(stage.name, history);
    }
    state.rateHistory.push([now, stats.rates.requests_per_s]);
    trim(state.rateHistory, now);
    state.latencyHistory.push([now, stats.latency.p50, stats.latency.p99]);
    trim(state.latencyHistory, now);

    $("pipeline-name").textContent = stats.pipeline;
    document.title = `alto · ${stats.pipeline}`;
    $("req-rate").textContent = fmt(stats.rates.requests_per_s, 1);
    $("frame-rate").textContent = fmt(stats.rates.frames_per_s, 0);
    $("lat-p50").textContent = ms(stats.latency.p50);
    $("lat-p99").textContent = ms(stats.latency.p99);
    $("in-flight").textContent = String(stats.requests.in_flight);
    $("in-flight-max").textContent = `of ${stats.requests.max_in_flight}`;
    const r = stats.requests;
    const f = stats.finished || { cancelled: 0, timed_out: 0 };
    $("counts").replaceChildren(
      document.createTextNode(`${r.completed} done`),
      el("br"),
      el("span", { class: r.failed ? "bad" : "", text: `${r.failed} failed` }),
      document.createTextNode(" · "),
      el("span", { class: r.refused ? "bad" : "", text: `${r.refused} refused` }),
      ...(f.cancelled || f.timed_out ? [
        el("br"),
        el("span", { title: "timed-out requests are among the failed ones", text:
          `${f.timed_out} timed out · ${f.cancelled} cancelled` }),
      ] : []),
    );

    if (state.pipeline) updateInstances(stats);
    updateErrors(stats);
    updateScaleLog(stats);
    maybeLoadRequests(stats);
    lineChart($("chart-rate"), state.rateHistory, now,
      [{ index: 1, color: "#3563e9" }], (v) => fmt(v, v < 10 ? 1 : 0));
    lineChart($("chart-latency"), state.latencyHistory, now,
      [{ index: 1, color: "#1f9d60" }, { index: 2, color: "#d98e04" }], (v) => ms(v) + " ms");
  }

  // -- start -----------------------------------------------------------------------

  async function loadPipeline() {
    try {
      const response = await fetch("/api/pipeline");
      state.pipeline = await response.json();
    } catch (err) {
      setTimeout(loadPipeline, 2000);
      return;
    }
    buildGraph();
    if (state.stats) updateInstances(state.stats);
  }

  function connect() {
    const conn = $("conn");
    const source = new EventSource("/api/stream");
    source.addEventListener("open", () => { conn.dataset.state = "live"; conn.textContent = "live"; });
    source.addEventListener("error", () => {
      conn.dataset.state = "reconnecting"; conn.textContent = "reconnecting";
    });
    source.addEventListener("stats", (event) => onStats(JSON.parse(event.data)));
  }

  // A new width (the window's, or a scrollbar's coming and going) lays the graph out
  // anew; a new height is the graph's own doing (drawEdges already ran).
  const relayout = () => {
    if (state.timeline && $("timeline").firstChild &&
        $("timeline").firstChild.getAttribute("width") !== String(Math.max(320, $("timeline").clientWidth))) {
      drawTimeline();
    }
    if (!state.pipeline || (state.layout && state.layout.avail === $("graph").clientWidth)) return;
    layoutGraph();
    drawEdges();
  };
  if (window.ResizeObserver) new ResizeObserver(relayout).observe($("graph"));
  window.addEventListener("resize", relayout);
  loadPipeline().then(connect);
})();
