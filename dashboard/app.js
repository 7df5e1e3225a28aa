// alto dashboard: the pipeline as a graph of stages with their instances, live from
// GET /api/stream (Server-Sent Events). No framework, no build step, works offline.
(function () {
  "use strict";

  const HISTORY_S = 300;          // sparklines and charts show the last five minutes
  const TOKEN_KEY = "alto.token";

  const state = {
    pipeline: null,               // GET /api/pipeline
    stats: null,                  // latest `stats` event
    depthHistory: new Map(),      // instance id -> [[time, depth], ...]
    rateHistory: [],              // [[time, req/s]]
    latencyHistory: [],           // [[time, p50, p99]]
    layoutKey: "",
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

  async function command(path, body) {
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
      toast(`${response.status}: ${data.error || response.statusText}${hint}`, true);
      return null;
    }
    return data;
  }

  async function scaleStage(stage, delta) {
    const current = stageStats(stage);
    if (!current) return;
    const target = Math.max(1, current.target_instances + delta);
    const data = await command(`/api/stages/${encodeURIComponent(stage)}/scale`, { instances: target });
    if (data) toast(`${stage}: scaling to ${data.target_instances} instance${data.target_instances === 1 ? "" : "s"}`);
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
    const columns = $("columns");
    columns.replaceChildren();
    const byName = new Map(pipeline.stages.map((s) => [s.name, s]));
    for (const names of layers(pipeline)) {
      const column = el("div", { class: "column" });
      for (const name of names) {
        if (name === "ingress" || name === "sink") {
          column.append(el("div", { class: "endpoint", id: "node-" + name, "data-node": name, text: name }));
        } else {
          column.append(stageCard(byName.get(name)));
        }
      }
      columns.append(column);
    }
    state.layoutKey = "";
    drawEdges();                  // the arrows need no stats: draw them before the first event
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
      el("div", { class: "stage-badges" }, badges),
      el("div", { class: "stage-meta" }, [
        el("span", { class: "stage-rate", text: "0 frames/s" }),
        el("span", { class: "errors-count", text: "0 errors" }),
      ]),
      el("div", { class: "instances" }),
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
      el("div", { class: "inst-meta" }),
      el("div", { class: "inst-error" }),
    ]);
  }

  // An edge that skips a column would run straight behind the cards in between (and its
  // labels would land inside them): such an edge leaves its source low, runs in a lane
  // under the lowest card of the columns it skips, and rises to its target. Lanes that
  // share a stretch are stacked, and the graph grows at the bottom to make room for them.
  const LANE_GAP = 24;            // from the bottom of the cards skipped to the lane
  const LANE_STEP = 34;           // between stacked lanes (room for both labels)
  const LABEL_ROOM = 22;          // below a lane: the routing label
  const PAD_BOTTOM = 8;           // .columns' own padding at the bottom

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

  function drawEdges() {
    const graph = $("graph");
    const svg = $("edges");
    const columns = $("columns");
    const box = graph.getBoundingClientRect();
    const ns = "http://www.w3.org/2000/svg";
    const parts = [];
    const defs = document.createElementNS(ns, "defs");
    defs.innerHTML = '<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" ' +
      'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#9aa3b8"/></marker>';
    parts.push(defs);
    const node = (name) => document.querySelector(`[data-stage="${CSS.escape(name)}"].stage`) ||
      document.querySelector(`[data-node="${CSS.escape(name)}"]`);
    // Every card and endpoint in graph coordinates, with the index of its column.
    const columnList = [...columns.children];
    const place = (elem) => {
      const r = elem.getBoundingClientRect();
      const left = r.left - box.left + graph.scrollLeft, top = r.top - box.top;
      return { left, top, right: left + r.width, bottom: top + r.height, height: r.height,
        column: columnList.indexOf(elem.closest(".column")), endpoint: elem.classList.contains("endpoint") };
    };
    const boxes = new Map();
    for (const elem of columns.querySelectorAll(".stage, .endpoint")) boxes.set(elem, place(elem));
    let cardsBottom = 0;
    for (const b of boxes.values()) cardsBottom = Math.max(cardsBottom, b.bottom);
    const lanes = [];             // [left, right, y] of the lanes drawn so far
    let needed = 0;               // the lowest point a lane and its labels reach

    const label = (x, y, text, cls) => {
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", x); t.setAttribute("y", y);
      t.setAttribute("text-anchor", "middle");
      if (cls) t.setAttribute("class", cls);
      t.textContent = text;
      parts.push(t);
    };

    for (const edge of state.pipeline.edges) {
      const a = node(edge.from), b = node(edge.to);
      if (!a || !b) continue;
      const ra = boxes.get(a), rb = boxes.get(b);
      const routing = edge.to === "sink" ? null : edge.routing +
        (edge.aggregate_level !== null && edge.aggregate_level !== undefined ? " @" + edge.aggregate_level : "");
      let x1 = ra.right, y1 = ra.top + ra.height / 2;
      let x2 = rb.left - 2, y2 = rb.top + rb.height / 2;
      // The cards of the columns between the two ends, if the edge skips any.
      const between = [...boxes.entries()]
        .filter(([elem, r]) => elem !== a && elem !== b && r.column > ra.column && r.column < rb.column)
        .map(([, r]) => r);
      const dx = Math.max(30, (x2 - x1) / 2);
      const curve = [[x1, y1], [x1 + dx, y1], [x2 - dx, y2], [x2, y2]];
      const [mx, my] = [(x1 + x2) / 2, (y1 + y2) / 2];
      // The plain curve is kept while it, and its labels, stay clear of those cards.
      const blocked = between.some((r) =>
        sampleCubic(...curve, 32).some((p) => inside(p, r, 6)) ||
        inside([mx, my], r, 24));
      const path = document.createElementNS(ns, "path");
      path.setAttribute("marker-end", "url(#arrow)");
      path.setAttribute("data-edge", `${edge.from}->${edge.to}`);
      if (!blocked) {
        path.setAttribute("d", `M${x1},${y1} C${curve[1]} ${curve[2]} ${x2},${y2}`);
        parts.push(path);
        label(mx, my - 8, edge.queue, "queue");
        if (routing !== null) label(mx, my + 16, routing);
        continue;
      }
      const left = Math.min(...between.map((r) => r.left));
      const right = Math.max(...between.map((r) => r.right));
      let lane = Math.max(...between.map((r) => r.bottom)) + LANE_GAP;
      for (let moved = true; moved;) {
        moved = false;
        for (const [l, r, y] of lanes) {
          if (l < right && r > left && Math.abs(y - lane) < LANE_STEP) { lane = y + LANE_STEP; moved = true; }
        }
      }
      lanes.push([left, right, lane]);
      needed = Math.max(needed, lane + (routing !== null ? LABEL_ROOM : 8));
      // Leave and enter a card low, clear of the labels of its straight edges.
      if (!ra.endpoint) y1 = Math.min(ra.bottom - 6, Math.max(y1 + 28, ra.bottom - 14));
      if (!rb.endpoint) y2 = Math.min(rb.bottom - 6, Math.max(y2 + 28, rb.bottom - 14));
      const c1 = (left - x1) / 2, c2 = (x2 - right) / 2;
      path.setAttribute("d", `M${x1},${y1} C${x1 + c1},${y1} ${left - c1},${lane} ${left},${lane} ` +
        `L${right},${lane} C${right + c2},${lane} ${x2 - c2},${y2} ${x2},${y2}`);
      parts.push(path);
      const lx = (left + right) / 2;
      label(lx, lane - 8, edge.queue, "queue");
      if (routing !== null) label(lx, lane + 16, routing);
    }
    // Room under the cards for the lanes: padding at the bottom moves no card (the
    // columns are centred in the content box, which the tallest column sets).
    const extra = Math.ceil(needed - cardsBottom);
    columns.style.paddingBottom = extra > PAD_BOTTOM ? `${extra}px` : "";
    svg.setAttribute("width", columns.scrollWidth);
    svg.setAttribute("height", columns.scrollHeight);
    svg.replaceChildren(...parts);
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
      const list = card.querySelector(".instances");
      const instances = (byStage.get(stage.name) || []).sort((a, b) => a.id - b.id);
      const ids = instances.map((i) => String(i.id));
      layoutKey += stage.name + ":" + ids.join(",") + ";";
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
        node.querySelector(".inst-meta").textContent =
          `credits ${inst.credits_in_use ?? 0}/${inst.credits} · backlog ${inst.backlog} · groups ${inst.open_groups}`;
        node.querySelector(".inst-error").textContent = inst.last_error || "";
        node.querySelector("button[data-action=drain]").disabled = inst.state !== "ready";
        const history = state.depthHistory.get(inst.id) || [];
        sparkline(node.querySelector(".spark"), history, stats.time, inst.credits);
      });
      const ready = instances.filter((i) => i.state === "ready").length;
      card.querySelector(".count").textContent = `${ready} / ${stage.target_instances}`;
      card.querySelector("[data-action=scale-down]").disabled = stage.target_instances <= 1;
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
    $("counts").replaceChildren(
      document.createTextNode(`${r.completed} done`),
      el("br"),
      el("span", { class: r.failed ? "bad" : "", text: `${r.failed} failed` }),
      document.createTextNode(" · "),
      el("span", { class: r.refused ? "bad" : "", text: `${r.refused} refused` }),
    );

    if (state.pipeline) updateInstances(stats);
    updateErrors(stats);
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

  window.addEventListener("resize", () => { if (state.pipeline) drawEdges(); });
  loadPipeline().then(connect);
})();
