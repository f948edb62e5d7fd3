// GradAlign dashboard: a single page over the scheduler's REST API and server-sent events.
// Plain JavaScript, no build step, no third-party code; charts are inline SVG drawn here.
"use strict";

const TOKEN_KEY = "gradalign.token";
const STAGES = ["rollout_train", "rollout_val", "score", "select", "train"];
const STAGE_LABELS = { rollout_train: "Rollout (train)", rollout_val: "Rollout (val)", score: "Score", select: "Select", train: "Train" };
const STATUSES = ["pending", "running", "completed", "failed", "cancelled"];
const TERMINAL = ["completed", "failed", "cancelled"];
const MODES = ["sim", "dot", "align", "accgreedy", "rand", "simacc", "negsim"];
const TRAIN_METRICS = ["loss", "mean_reward", "kl", "grad_norm", "entropy", "response_length", "tokens_per_second", "clip_fraction"];
const EVENT_TYPES = [
  "stage_started", "stage_finished", "progress", "stage_retry", "round_finished", "experiment_created",
  "experiment_cancelled", "experiment_resumed", "experiment_failed", "experiment_completed", "experiment_deleted", "message",
];
const PAGE_SIZE = 50;

// ---- DOM helpers ------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  appendAll(el, children);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  appendAll(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    else if (key === "text") el.textContent = value;
    else if (key === "value" && "value" in el) el.value = value;
    else if (key === "checked" || key === "selected" || key === "disabled" || key === "hidden" || key === "open") el[key] = true;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
}

function appendAll(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

// Replace an element's children (null, undefined and false are skipped, as in h()).
function fill(el, ...children) {
  el.replaceChildren();
  appendAll(el, children);
  return el;
}

const $ = (selector, root = document) => root.querySelector(selector);

// ---- formatting ------------------------------------------------------------------------------

function parseTime(iso) {
  if (!iso) return null;
  // SQLite gives naive UTC timestamps; PostgreSQL gives an offset.
  const hasZone = /[zZ]|[+-]\d\d:?\d\d$/.test(iso);
  const t = Date.parse(hasZone ? iso : iso + "Z");
  return Number.isNaN(t) ? null : t;
}

function pad(n) {
  return String(n).padStart(2, "0");
}

function fmtTime(iso) {
  const t = parseTime(iso);
  if (t === null) return "—";
  const d = new Date(t);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function timeCell(iso) {
  return iso ? h("time", { datetime: iso, title: iso }, fmtTime(iso)) : "—";
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  if (seconds < 0) seconds = 0;
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m} m ${pad(Math.floor(seconds % 60))} s`;
  return `${Math.floor(m / 60)} h ${pad(m % 60)} m`;
}

function fmtNum(v, digits = 3) {
  if (v === null || v === undefined || v === "") return "—";
  if (typeof v !== "number") return String(v);
  if (!Number.isFinite(v)) return String(v);
  if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  return v.toFixed(digits);
}

function basename(path) {
  if (!path) return "";
  const parts = String(path).split(/[\\/]/).filter(Boolean);
  return parts.length ? parts[parts.length - 1] : String(path);
}

function badge(status) {
  return h("span", { class: ["badge", `status-${status}`], "data-status": status }, status);
}

function stageLabel(name) {
  return STAGE_LABELS[name] || name || "—";
}

function pluralUnit(unit) {
  return unit || "";
}

// ---- the API -----------------------------------------------------------------------------------

function getToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

const TOKEN_CHANGED = "gradalign:token-changed";

function setToken(token) {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    /* storage disabled: the token lives only until reload */
  }
  window.dispatchEvent(new Event(TOKEN_CHANGED));
}

// Resolves when `arm(done)` calls done, or when the signal aborts, whichever comes first; arm
// returns the function that disarms it, called either way.
function untilAbortOr(signal, arm) {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    let disarm = () => {};
    const done = () => {
      disarm();
      signal.removeEventListener("abort", done);
      resolve();
    };
    disarm = arm(done);
    signal.addEventListener("abort", done);
  });
}

// Resolves when the saved token changes (the token box) or the signal aborts.
function tokenChanged(signal) {
  return untilAbortOr(signal, (done) => {
    window.addEventListener(TOKEN_CHANGED, done);
    return () => window.removeEventListener(TOKEN_CHANGED, done);
  });
}

class ApiError extends Error {
  constructor(status, detail, message) {
    super(message);
    this.status = status;
    this.detail = detail;
  }
}

function detailText(detail) {
  if (detail === null || detail === undefined) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`).join("; ");
  if (typeof detail === "object" && detail.detail !== undefined) return detailText(detail.detail);
  return JSON.stringify(detail);
}

function describeError(status, detail, method, path) {
  const what = `${method} ${path}`;
  const extra = detailText(detail);
  if (status === 401)
    return `401 Unauthorized: ${what} needs an API token. Paste a valid token into “API token” at the top and try again.${extra ? ` (${extra})` : ""}`;
  if (status === 403)
    return `403 Forbidden: the API token was refused for ${what} (revoked, or not allowed to do this).${extra ? ` (${extra})` : ""}`;
  if (status === 0) return `Cannot reach the scheduler for ${what}: ${extra}`;
  return `${status}: ${what} failed${extra ? `: ${extra}` : ""}`;
}

async function api(path, { method = "GET", body, signal } = {}) {
  const headers = { Accept: "application/json" };
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, err.message, describeError(0, err.message, method, path));
  }
  const text = resp.status === 204 ? "" : await resp.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (!resp.ok) {
    const detail = data && typeof data === "object" && "detail" in data ? data.detail : data;
    const err = new ApiError(resp.status, detail, describeError(resp.status, detail, method, path));
    if (resp.status === 401 || resp.status === 403) showAuthError(err);
    throw err;
  }
  return data;
}

async function mapLimit(items, limit, fn) {
  const results = new Array(items.length);
  let next = 0;
  async function worker() {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i], i);
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

// ---- banner (errors, confirmations) ---------------------------------------------------------------

function showBanner(kind, message, ...extra) {
  const banner = $("#banner");
  banner.className = `banner banner-${kind}`;
  banner.setAttribute("role", kind === "error" ? "alert" : "status");
  banner.setAttribute("data-kind", kind);
  fill(banner, 
    h("p", { class: "banner-text" }, message),
    ...extra,
    h("button", { type: "button", class: "banner-close", "aria-label": "Dismiss message", onclick: hideBanner }, "Dismiss"),
  );
  banner.hidden = false;
}

function hideBanner() {
  const banner = $("#banner");
  banner.hidden = true;
  fill(banner);
}

function showAuthError(err) {
  showBanner(
    "error",
    err.message,
    h("button", { type: "button", class: "banner-action", onclick: () => $("#token-input").focus() }, "Enter a token"),
  );
  $("#banner").setAttribute("data-status-code", String(err.status));
}

function errorBox(err) {
  return h("div", { class: "error-box", role: "alert" }, h("strong", {}, "Error: "), err && err.message ? err.message : String(err));
}

// ---- the token box ------------------------------------------------------------------------------

function initToken() {
  const form = $("#token-form");
  const input = $("#token-input");
  const state = $("#token-state");
  const show = () => {
    state.textContent = getToken() ? "token saved" : "no token";
    state.dataset.hasToken = getToken() ? "true" : "false";
  };
  input.value = getToken();
  show();
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    setToken(input.value.trim());
    show();
    hideBanner();
  });
  $("#token-clear").addEventListener("click", () => {
    input.value = "";
    setToken("");
    show();
  });
}

// ---- charts (inline SVG) ----------------------------------------------------------------------

let chartCounter = 0;

function niceScale(min, max, count = 5) {
  if (!Number.isFinite(min) || !Number.isFinite(max)) return { lo: 0, hi: 1, step: 0.2, ticks: [0, 0.2, 0.4, 0.6, 0.8, 1] };
  if (min === max) {
    const d = Math.abs(min) > 0 ? Math.abs(min) * 0.1 : 0.5;
    min -= d;
    max += d;
  }
  const raw = (max - min) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  const step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
  const lo = Math.floor(min / step + 1e-9) * step;
  const hi = Math.ceil(max / step - 1e-9) * step;
  const ticks = [];
  for (let v = lo; v <= hi + step / 2; v += step) ticks.push(Number(v.toPrecision(12)));
  return { lo, hi, step, ticks };
}

function fmtTick(v, step) {
  if (Math.abs(v) >= 1e5 || (Math.abs(v) < 1e-3 && v !== 0)) return v.toExponential(1);
  const decimals = Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9)));
  return v.toFixed(decimals);
}

function chartFigure(kind, title, attrs, body, legendItems, caption) {
  const fig = h("figure", { class: ["chart", `chart-${kind}`], ...attrs }, h("figcaption", { class: "chart-title" }, title), body);
  if (legendItems && legendItems.length) {
    fig.append(
      h(
        "ul",
        { class: "legend", "aria-label": `Legend of ${title}` },
        legendItems.map((item) => h("li", {}, h("span", { class: ["swatch", item.cls], "aria-hidden": "true" }), item.name)),
      ),
    );
  }
  if (caption) fig.append(h("p", { class: "chart-note" }, caption));
  return fig;
}

// opts: {key, title, xLabel, yLabel, series: [{name, cls?, points: [{x, y, tip?}]}], xInteger, vlines, height, yDomain}
function lineChart(opts) {
  const W = opts.width || 640;
  const H = opts.height || 260;
  const M = { l: 58, r: 16, t: 14, b: 42 };
  const series = opts.series.map((sr, i) => ({
    ...sr,
    cls: sr.cls || `series-${i % 8}`,
    points: sr.points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y)).sort((a, b) => a.x - b.x),
  }));
  const all = series.flatMap((sr) => sr.points);
  const total = all.length;
  const attrs = { "data-chart": opts.key, "data-points": String(total), "data-series-count": String(series.length) };
  const legend = series.map((sr) => ({ name: `${sr.name} (${sr.points.length})`, cls: sr.cls }));
  if (!total) {
    return chartFigure("line", opts.title, attrs, h("p", { class: "empty" }, opts.emptyText || "No data yet."), legend);
  }
  let xs = all.map((p) => p.x);
  let ys = all.map((p) => p.y);
  if (opts.yDomain) ys = ys.concat(opts.yDomain);
  const xMin = Math.min(...xs);
  const xMax = Math.max(...xs);
  let xScale;
  if (opts.xInteger && xMax - xMin <= 20) {
    const lo = xMin === xMax ? xMin - 0.5 : xMin;
    const hi = xMin === xMax ? xMax + 0.5 : xMax;
    const ticks = [];
    for (let v = Math.ceil(lo); v <= hi; v++) ticks.push(v);
    xScale = { lo, hi, step: 1, ticks };
  } else {
    xScale = niceScale(xMin, xMax, 6);
    if (opts.xInteger) xScale.ticks = xScale.ticks.filter((t) => Number.isInteger(t));
  }
  const yScale = niceScale(Math.min(...ys), Math.max(...ys), 5);
  const pw = W - M.l - M.r;
  const ph = H - M.t - M.b;
  const X = (v) => M.l + ((v - xScale.lo) / (xScale.hi - xScale.lo || 1)) * pw;
  const Y = (v) => M.t + ph - ((v - yScale.lo) / (yScale.hi - yScale.lo || 1)) * ph;
  const id = `chart-${++chartCounter}`;
  const svg = s(
    "svg",
    { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": `${id}-title ${id}-desc`, class: "chart-svg", preserveAspectRatio: "xMidYMid meet" },
    s("title", { id: `${id}-title` }, opts.title),
    s(
      "desc",
      { id: `${id}-desc` },
      series.map((sr) => `${sr.name}: ${sr.points.map((p) => `${p.x}→${fmtNum(p.y)}`).join(", ")}`).join("; "),
    ),
  );
  const grid = s("g", { class: "grid" });
  for (const t of yScale.ticks) {
    grid.append(s("line", { x1: M.l, x2: W - M.r, y1: Y(t), y2: Y(t) }));
    grid.append(s("text", { x: M.l - 6, y: Y(t) + 4, class: "tick y-tick", "text-anchor": "end" }, fmtTick(t, yScale.step)));
  }
  for (const t of xScale.ticks) {
    grid.append(s("text", { x: X(t), y: M.t + ph + 16, class: "tick x-tick", "text-anchor": "middle" }, fmtTick(t, xScale.step)));
  }
  grid.append(s("line", { class: "axis", x1: M.l, x2: M.l, y1: M.t, y2: M.t + ph }));
  grid.append(s("line", { class: "axis", x1: M.l, x2: W - M.r, y1: M.t + ph, y2: M.t + ph }));
  for (const v of opts.vlines || []) {
    if (v > xScale.lo && v < xScale.hi) grid.append(s("line", { class: "vline", x1: X(v), x2: X(v), y1: M.t, y2: M.t + ph }));
  }
  if (opts.xLabel) grid.append(s("text", { class: "axis-label", x: M.l + pw / 2, y: H - 6, "text-anchor": "middle" }, opts.xLabel));
  if (opts.yLabel)
    grid.append(
      s("text", { class: "axis-label", x: 12, y: M.t + ph / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${M.t + ph / 2})` }, opts.yLabel),
    );
  svg.append(grid);
  const maxDots = opts.maxDots || 400;
  for (const sr of series) {
    const g = s("g", { class: ["series", sr.cls], "data-series": sr.name, "data-points": String(sr.points.length) });
    if (sr.points.length > 1) {
      g.append(s("polyline", { class: "line", points: sr.points.map((p) => `${X(p.x).toFixed(1)},${Y(p.y).toFixed(1)}`).join(" ") }));
    }
    if (sr.points.length <= maxDots) {
      for (const p of sr.points) {
        g.append(
          s(
            "circle",
            { class: "dot", cx: X(p.x).toFixed(1), cy: Y(p.y).toFixed(1), r: sr.points.length > 60 ? 2 : 3.5, "data-x": p.x, "data-y": p.y },
            s("title", {}, p.tip || `${sr.name}: ${fmtNum(p.y, 4)} at ${opts.xLabel || "x"} ${p.x}`),
          ),
        );
      }
    }
    svg.append(g);
  }
  return chartFigure("line", opts.title, attrs, svg, opts.legend === false ? null : legend, opts.caption);
}

// opts: {key, title, xLabel, edges: [e0..en], labels?: [..n], series: [{name, cls, values}]}
function histogram(opts) {
  const W = opts.width || 640;
  const H = opts.height || 240;
  const M = { l: 48, r: 16, t: 14, b: 46 };
  const edges = opts.edges;
  const nb = edges.length - 1;
  const series = opts.series.map((sr, i) => {
    const counts = new Array(nb).fill(0);
    for (const v of sr.values) {
      if (!Number.isFinite(v)) continue;
      let b = Math.floor(((v - edges[0]) / (edges[nb] - edges[0])) * nb);
      b = Math.max(0, Math.min(nb - 1, b));
      counts[b] += 1;
    }
    return { ...sr, cls: sr.cls || `series-${i % 8}`, counts };
  });
  const total = series.reduce((a, sr) => a + sr.values.length, 0);
  const attrs = { "data-chart": opts.key, "data-points": String(total), "data-bins": String(nb) };
  const legend = series.map((sr) => ({ name: `${sr.name} (${sr.values.length})`, cls: sr.cls }));
  if (!total) return chartFigure("histogram", opts.title, attrs, h("p", { class: "empty" }, opts.emptyText || "No data yet."), legend);
  const yScale = niceScale(0, Math.max(1, ...series.flatMap((sr) => sr.counts)), 4);
  yScale.ticks = yScale.ticks.filter((t) => Number.isInteger(t));
  const pw = W - M.l - M.r;
  const ph = H - M.t - M.b;
  const band = pw / nb;
  const Y = (v) => M.t + ph - (v / (yScale.hi || 1)) * ph;
  const id = `chart-${++chartCounter}`;
  const svg = s(
    "svg",
    { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": `${id}-title ${id}-desc`, class: "chart-svg" },
    s("title", { id: `${id}-title` }, opts.title),
    s("desc", { id: `${id}-desc` }, series.map((sr) => `${sr.name}: counts per bin ${sr.counts.join(", ")}`).join("; ")),
  );
  const grid = s("g", { class: "grid" });
  for (const t of yScale.ticks) {
    grid.append(s("line", { x1: M.l, x2: W - M.r, y1: Y(t), y2: Y(t) }));
    grid.append(s("text", { x: M.l - 6, y: Y(t) + 4, class: "tick y-tick", "text-anchor": "end" }, String(t)));
  }
  const labelEvery = Math.ceil(nb / 10);
  for (let b = 0; b < nb; b++) {
    if (b % labelEvery) continue;
    const label = opts.labels ? opts.labels[b] : fmtNum(edges[b], 2);
    const x = opts.labels ? M.l + band * (b + 0.5) : M.l + band * b;
    grid.append(s("text", { x, y: M.t + ph + 16, class: "tick x-tick", "text-anchor": "middle" }, label));
  }
  if (!opts.labels) grid.append(s("text", { x: M.l + pw, y: M.t + ph + 16, class: "tick x-tick", "text-anchor": "middle" }, fmtNum(edges[nb], 2)));
  grid.append(s("line", { class: "axis", x1: M.l, x2: W - M.r, y1: M.t + ph, y2: M.t + ph }));
  grid.append(s("line", { class: "axis", x1: M.l, x2: M.l, y1: M.t, y2: M.t + ph }));
  if (opts.xLabel) grid.append(s("text", { class: "axis-label", x: M.l + pw / 2, y: H - 6, "text-anchor": "middle" }, opts.xLabel));
  svg.append(grid);
  const inner = band * 0.84;
  const bw = inner / series.length;
  series.forEach((sr, i) => {
    const g = s("g", { class: ["series", sr.cls], "data-series": sr.name, "data-points": String(sr.values.length) });
    sr.counts.forEach((c, b) => {
      const x = M.l + band * b + (band - inner) / 2 + bw * i;
      const range = opts.labels ? opts.labels[b] : `[${fmtNum(edges[b], 3)}, ${fmtNum(edges[b + 1], 3)}${b === nb - 1 ? "]" : ")"}`;
      g.append(
        s(
          "rect",
          { class: "bar", x: x.toFixed(1), width: Math.max(1, bw - 1).toFixed(1), y: Y(c).toFixed(1), height: (M.t + ph - Y(c)).toFixed(1), "data-count": c },
          s("title", {}, `${sr.name}: ${c} in ${range}`),
        ),
      );
    });
    svg.append(g);
  });
  return chartFigure("histogram", opts.title, attrs, svg, legend, opts.caption);
}

// ---- server-sent events over fetch() ------------------------------------------------------------

const SSE_RETRY_MIN_MS = 1000;
const SSE_RETRY_MAX_MS = 15000;
const SSE_IDLE_MS = 45000; // the scheduler sends a keep-alive every second: silence this long is a dead connection

// Runs a page's handler; an error in it is reported like any uncaught one but does not drop the stream.
function handled(fn) {
  try {
    fn();
  } catch (err) {
    if (typeof reportError === "function") reportError(err);
    else setTimeout(() => {
      throw err;
    });
  }
}

function sleep(ms, signal) {
  return untilAbortOr(signal, (done) => {
    const id = setTimeout(done, ms);
    return () => clearTimeout(id);
  });
}

// A parser of the text/event-stream format: feed it decoded text in any pieces; it calls
// onMessage(eventName, data) for each complete frame (a blank line ends one; "data:" lines are
// joined with "\n"; lines starting with ":" are comments; "id" and "retry" are ignored).
function sseParser(onMessage) {
  let buffer = "";
  let name = "";
  let data = [];
  const line = (text) => {
    if (text === "") {
      if (data.length) onMessage(name || "message", data.join("\n"));
      name = "";
      data = [];
      return;
    }
    if (text.startsWith(":")) return;
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  };
  return (chunk) => {
    buffer += chunk;
    const eol = /\r\n|\r|\n/g;
    let start = 0;
    let m;
    while ((m = eol.exec(buffer))) {
      if (m[0] === "\r" && m.index === buffer.length - 1) break; // perhaps a "\r\n" split between chunks
      line(buffer.slice(start, m.index));
      start = eol.lastIndex;
    }
    buffer = buffer.slice(start);
  };
}

// One connection to an event stream, sending the saved API token. Resolves (never rejects) when
// it ends: { status } with the HTTP status when the server refused it (and its detail), else
// { status: 0 } (a network error, the stream ended, or it went silent). onOpen runs once it is
// open; deliver(eventName, data) for each message.
async function sseConnect(path, signal, deliver, onOpen) {
  const controller = new AbortController();
  const abort = () => controller.abort();
  signal.addEventListener("abort", abort);
  let idle = null;
  const watch = () => {
    clearTimeout(idle);
    idle = setTimeout(abort, SSE_IDLE_MS);
  };
  try {
    const headers = { Accept: "text/event-stream" };
    const token = getToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    watch();
    const resp = await fetch(path, { headers, cache: "no-store", signal: controller.signal });
    if (!resp.ok) {
      let detail = null;
      try {
        const body = await resp.json();
        detail = body && typeof body === "object" && "detail" in body ? body.detail : body;
      } catch {
        /* no JSON body */
      }
      return { status: resp.status, detail };
    }
    if (!resp.body || !(resp.headers.get("content-type") || "").startsWith("text/event-stream")) return { status: 0 };
    onOpen();
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    const feed = sseParser(deliver);
    for (;;) {
      watch();
      const { value, done } = await reader.read();
      if (done) break;
      feed(decoder.decode(value, { stream: true }));
    }
    return { status: 0 };
  } catch {
    return { status: 0 };
  } finally {
    clearTimeout(idle);
    signal.removeEventListener("abort", abort);
    controller.abort(); // releases the connection if it is still open
  }
}

// ---- the router and page lifecycle ---------------------------------------------------------------

class Page {
  constructor() {
    this.controller = new AbortController();
    this.cleanups = [];
    this.disposed = false;
  }
  get signal() {
    return this.controller.signal;
  }
  api(path, options = {}) {
    return api(path, { signal: this.signal, ...options });
  }
  onDispose(fn) {
    this.cleanups.push(fn);
  }
  every(ms, fn) {
    const id = setInterval(fn, ms);
    this.onDispose(() => clearInterval(id));
  }
  // Server-sent events from the scheduler's event bus; handlers get (type, event).
  // fetch() rather than EventSource, which cannot send the Authorization header that reads
  // need when the scheduler's read_requires_token is on. onState("live", reconnected) when a
  // stream opens (reconnected: after one was lost), "reconnecting" while retrying (1 s, doubling
  // up to 15 s), "closed" when it gives up: another 4xx, or 401/403 (also shown in the banner;
  // it reconnects when a token is entered in the token box).
  events(query, onEvent, onState) {
    const path = `/api/v1/events${query ? `?${query}` : ""}`;
    const controller = new AbortController();
    const stop = () => controller.abort();
    this.onDispose(stop);
    const deliver = (name, text) => {
      if (!EVENT_TYPES.includes(name)) return;
      let data;
      try {
        data = JSON.parse(text);
      } catch {
        return;
      }
      if (data && typeof data === "object") handled(() => onEvent(data.type || name, data));
    };
    (async () => {
      let wasOpen = false;
      let lost = false;
      let delay = SSE_RETRY_MIN_MS;
      while (!controller.signal.aborted) {
        const outcome = await sseConnect(path, controller.signal, deliver, () => {
          handled(() => onState("live", wasOpen && lost));
          wasOpen = true;
          lost = false;
          delay = SSE_RETRY_MIN_MS;
        });
        if (controller.signal.aborted) return;
        if (outcome.status === 401 || outcome.status === 403) {
          handled(() => onState("closed", false));
          showAuthError(new ApiError(outcome.status, outcome.detail, describeError(outcome.status, outcome.detail, "GET", path)));
          // no retries with a refused token; a new one from the token box reconnects at once
          await tokenChanged(controller.signal);
          delay = SSE_RETRY_MIN_MS;
          continue;
        }
        if (outcome.status >= 400 && outcome.status < 500 && outcome.status !== 408 && outcome.status !== 429) {
          handled(() => onState("closed", false));
          return;
        }
        lost = true;
        handled(() => onState("reconnecting", false));
        await sleep(delay, controller.signal);
        delay = Math.min(delay * 2, SSE_RETRY_MAX_MS);
      }
    })().catch(() => {
      /* sseConnect reports every failure as an outcome; nothing escapes but an abort */
    });
    return { close: stop };
  }
  dispose() {
    this.disposed = true;
    this.controller.abort();
    for (const fn of this.cleanups.splice(0)) {
      try {
        fn();
      } catch {
        /* ignore */
      }
    }
  }
}

const ROUTES = [
  [/^\/(experiments\/?)?$/, renderList, "list"],
  [/^\/experiments\/(\d+)\/?$/, renderExperiment, "list"],
  [/^\/experiments\/(\d+)\/rounds\/(\d+)\/problems\/(.+)$/, renderProblem, "list"],
  [/^\/compare\/?$/, renderCompare, "compare"],
  [/^\/new\/?$/, renderCreate, "new"],
];

function currentRoute() {
  let raw = "/";
  if (location.hash.startsWith("#/")) raw = location.hash.slice(1);
  else if (location.pathname.startsWith("/ui/")) raw = location.pathname.slice(3) + location.search;
  const q = raw.indexOf("?");
  return { path: q >= 0 ? raw.slice(0, q) : raw, params: new URLSearchParams(q >= 0 ? raw.slice(q + 1) : "") };
}

function setRouteParams(path, params) {
  const query = params.toString();
  history.replaceState(null, "", `#${path}${query ? `?${query}` : ""}`);
}

let currentPage = null;
let firstRender = true;

async function route() {
  if (currentPage) currentPage.dispose();
  const page = (currentPage = new Page());
  const { path, params } = currentRoute();
  const main = $("#main");
  fill(main);
  main.removeAttribute("data-page");
  main.removeAttribute("data-loaded");
  for (const [re, render, nav] of ROUTES) {
    const m = path.match(re);
    if (!m) continue;
    for (const a of document.querySelectorAll("[data-nav]")) {
      if (a.dataset.nav === nav) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    try {
      await render(page, main, m.slice(1).map((x) => (x === undefined ? x : decodeURIComponent(x))), params);
    } catch (err) {
      if (err.name === "AbortError" || page.disposed) return;
      main.append(errorBox(err));
    }
    if (!firstRender && !page.disposed) {
      const heading = $("h1", main);
      if (heading) {
        heading.setAttribute("tabindex", "-1");
        heading.focus({ preventScroll: false });
      }
    }
    firstRender = false;
    return;
  }
  main.append(h("h1", {}, "Page not found"), h("p", {}, "No dashboard page at ", h("code", {}, path), ". ", h("a", { href: "#/" }, "Back to experiments")));
}

// ---- experiments list ---------------------------------------------------------------------------

function roundLabel(exp) {
  const total = exp.config && exp.config.num_selections;
  return total ? `${exp.current_round} / ${total}` : String(exp.current_round);
}

function matchesText(exp, q) {
  if (!q) return true;
  const c = exp.config || {};
  const hay = [exp.id, exp.name, exp.status, c.mode, c.model, c.train_dataset, c.val_dataset, exp.current_stage].join(" ").toLowerCase();
  return q
    .toLowerCase()
    .split(/\s+/)
    .filter(Boolean)
    .every((word) => hay.includes(word));
}

async function renderList(page, main, _args, params) {
  document.title = "Experiments · GradAlign";
  main.dataset.page = "list";
  const state = { status: params.get("status") || "", q: params.get("q") || "", offset: Number(params.get("offset") || 0), items: [], total: 0, progress: new Map(), lastReward: new Map(), compare: new Set() };
  const statusSelect = h(
    "select",
    { id: "filter-status", name: "status" },
    h("option", { value: "" }, "All statuses"),
    STATUSES.map((st) => h("option", { value: st, selected: st === state.status }, st)),
  );
  const textInput = h("input", { id: "filter-text", type: "search", name: "q", value: state.q, placeholder: "name, mode, model, dataset…", autocomplete: "off" });
  const compareButton = h("button", { type: "button", id: "compare-selected", disabled: true }, "Compare selected");
  const count = h("p", { id: "list-count", class: "muted", "aria-live": "polite" });
  const connection = h("span", { class: "conn", "data-state": "connecting" }, "connecting…");
  const tbody = h("tbody");
  const pager = h("div", { class: "pager" });
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Experiments"), h("div", { class: "head-aside" }, "Live updates: ", connection)),
    h(
      "form",
      { class: "filters", role: "search", "aria-label": "Filter experiments", onsubmit: (ev) => ev.preventDefault() },
      h("div", { class: "field-inline" }, h("label", { for: "filter-status" }, "Status"), statusSelect),
      h("div", { class: "field-inline grow" }, h("label", { for: "filter-text" }, "Search"), textInput),
      compareButton,
      h("a", { class: "button primary", href: "#/new" }, "New experiment"),
    ),
    count,
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "data", id: "experiments-table" },
        h("caption", { class: "visually-hidden" }, "Experiments, newest first"),
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ["Compare", "ID", "Name", "Mode", "Model", "Datasets", "Status", "Round", "Stage", "Last val. reward", "Started", "Updated"].map((t) =>
              h("th", { scope: "col" }, t),
            ),
          ),
        ),
        tbody,
      ),
    ),
    pager,
  );

  const syncUrl = () => {
    const p = new URLSearchParams();
    if (state.status) p.set("status", state.status);
    if (state.q) p.set("q", state.q);
    if (state.offset) p.set("offset", String(state.offset));
    setRouteParams("/", p);
  };

  const stageCell = (exp) => {
    const prog = state.progress.get(exp.id);
    if (!exp.current_stage) return exp.status === "running" ? "between stages" : "—";
    const parts = [stageLabel(exp.current_stage)];
    if (prog && prog.stage === exp.current_stage && prog.total) parts.push(` · ${prog.done} / ${prog.total} ${pluralUnit(prog.unit)}`);
    return parts.join("");
  };

  const renderRows = () => {
    const visible = state.items.filter((e) => matchesText(e, state.q));
    fill(tbody, 
      ...visible.map((exp) => {
        const c = exp.config || {};
        const reward = state.lastReward.get(exp.id);
        return h(
          "tr",
          { "data-experiment-id": exp.id, "data-status": exp.status },
          h(
            "td",
            {},
            h("input", {
              type: "checkbox",
              class: "compare-check",
              "aria-label": `Compare ${exp.name} (#${exp.id})`,
              checked: state.compare.has(exp.id),
              onchange: (ev) => {
                if (ev.target.checked) state.compare.add(exp.id);
                else state.compare.delete(exp.id);
                compareButton.disabled = state.compare.size < 1;
              },
            }),
          ),
          h("td", { class: "num" }, String(exp.id)),
          h("td", {}, h("a", { href: `#/experiments/${exp.id}`, class: "exp-link" }, exp.name)),
          h("td", {}, c.mode || "—"),
          h("td", { title: c.model || "" }, basename(c.model)),
          h("td", {}, h("span", { title: "train dataset" }, basename(c.train_dataset)), h("span", { class: "muted" }, " / "), h("span", { title: "validation dataset" }, basename(c.val_dataset))),
          h("td", {}, badge(exp.status), exp.status_detail ? h("span", { class: "detail", title: exp.status_detail }, " ⚠") : null),
          h("td", { class: "num", title: `round index ${exp.current_round} of ${c.num_selections} rounds` }, roundLabel(exp)),
          h("td", { class: "stage-cell" }, stageCell(exp)),
          h("td", { class: "num reward-cell" }, reward === undefined ? "…" : fmtNum(reward)),
          h("td", {}, timeCell(exp.started_at)),
          h("td", {}, timeCell(exp.updated_at)),
        );
      }),
    );
    if (!visible.length) {
      tbody.append(h("tr", { class: "empty-row" }, h("td", { colspan: 12 }, state.items.length ? "No experiment on this page matches the search." : "No experiments yet. Create one with “New experiment”.")));
    }
    const shown = state.items.length;
    count.textContent = shown
      ? `${visible.length} shown · experiments ${state.offset + 1}–${state.offset + shown} of ${state.total}${state.q ? " (search applies to this page)" : ""}`
      : `0 experiments${state.status ? ` with status ${state.status}` : ""}`;
    fill(pager, 
      h("button", { type: "button", disabled: state.offset <= 0, onclick: () => { state.offset = Math.max(0, state.offset - PAGE_SIZE); syncUrl(); load(); } }, "← Newer"),
      h("button", { type: "button", disabled: state.offset + shown >= state.total, onclick: () => { state.offset += PAGE_SIZE; syncUrl(); load(); } }, "Older →"),
    );
  };

  const loadRewards = async (items) => {
    await mapLimit(items, 4, async (exp) => {
      try {
        const rounds = await page.api(`/api/v1/experiments/${exp.id}/rounds`);
        const last = [...rounds].reverse().find((r) => r.validation_reward !== null && r.validation_reward !== undefined);
        state.lastReward.set(exp.id, last ? last.validation_reward : null);
      } catch (err) {
        if (err.name === "AbortError") throw err;
        state.lastReward.set(exp.id, null);
      }
    });
    if (!page.disposed) renderRows();
  };

  let loading = null;
  const load = async () => {
    const query = new URLSearchParams({ offset: String(state.offset), limit: String(PAGE_SIZE) });
    if (state.status) query.set("status", state.status);
    const data = await page.api(`/api/v1/experiments?${query}`);
    state.items = data.items;
    state.total = data.total;
    renderRows();
    loading = loadRewards(data.items).catch(() => {});
  };

  let timer = null;
  const reloadSoon = () => {
    clearTimeout(timer);
    timer = setTimeout(() => load().catch((err) => err.name !== "AbortError" && showBanner("error", err.message)), 250);
  };
  page.onDispose(() => clearTimeout(timer));

  statusSelect.addEventListener("change", () => {
    state.status = statusSelect.value;
    state.offset = 0;
    syncUrl();
    load().catch((err) => err.name !== "AbortError" && showBanner("error", err.message));
  });
  textInput.addEventListener("input", () => {
    state.q = textInput.value.trim();
    syncUrl();
    renderRows();
  });
  compareButton.addEventListener("click", () => {
    location.hash = `#/compare?ids=${[...state.compare].sort((a, b) => a - b).join(",")}`;
  });

  page.events(
    "",
    (type, ev) => {
      if (type === "progress") {
        state.progress.set(ev.experiment_id, ev);
        const row = tbody.querySelector(`tr[data-experiment-id="${ev.experiment_id}"] .stage-cell`);
        const exp = state.items.find((e) => e.id === ev.experiment_id);
        if (row && exp) {
          if (exp.current_stage !== ev.stage) exp.current_stage = ev.stage;
          row.textContent = stageCell(exp);
        }
        return;
      }
      if (type === "round_finished") state.lastReward.delete(ev.experiment_id);
      reloadSoon();
    },
    (conn, reconnected) => {
      connection.dataset.state = conn;
      connection.textContent = conn === "live" ? "live" : conn === "closed" ? "disconnected" : "reconnecting…";
      if (reconnected) reloadSoon();
    },
  );
  await load();
}

// ---- experiment page ------------------------------------------------------------------------------

function stageDuration(stage, now) {
  const start = parseTime(stage.started_at);
  if (start === null) return null;
  const end = parseTime(stage.finished_at);
  if (end !== null) return (end - start) / 1000;
  return stage.status === "running" ? (now - start) / 1000 : null;
}

function configList(cfg) {
  const rows = [
    ["Mode", cfg.mode],
    ["Model", cfg.model],
    ["Train dataset", cfg.train_dataset],
    ["Validation dataset", cfg.val_dataset],
    ["Chunk size M", cfg.chunk_size],
    ["k (keep M/k)", cfg.k],
    ["Rounds", cfg.num_selections],
    ["Train batch size", cfg.train_batch_size],
    ["GRPO steps per round", cfg.iters_per_select],
    ["Responses per candidate", cfg.n_samples_train],
    ["Responses per val. problem", cfg.n_samples_val],
    ["Max tokens", cfg.max_tokens],
    ["Temperature / top-p", `${fmtNum(cfg.temperature)} / ${fmtNum(cfg.top_p)}`],
    ["Learning rate", fmtNum(cfg.learning_rate)],
    ["Seed", cfg.seed],
  ];
  return h(
    "dl",
    { class: "config" },
    rows.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", { title: v === undefined ? "" : String(v) }, v === undefined || v === null ? "—" : String(v)))),
  );
}

async function renderExperiment(page, main, [idText]) {
  const id = Number(idText);
  main.dataset.page = "experiment";
  const st = {
    exp: null,
    rounds: [],
    cands: new Map(), // round index -> candidates
    steps: new Map(), // round index -> train steps
    stale: new Set(), // rounds whose candidates/steps must be fetched again
    histRound: null,
    live: null, // the last progress event
    conn: "connecting",
    hist: { q: "", round: "", selected: "", sort: "round", dir: 1, offset: 0 },
  };

  // ---- skeleton
  const title = h("h1", { id: "exp-title" }, `Experiment #${id}`);
  const actions = h("div", { class: "actions" });
  const headInfo = h("div", { class: "exp-info" });
  const live = h("section", { id: "live", class: "live card", "aria-labelledby": "live-h" });
  const timeline = h("div", { id: "timeline", class: "table-wrap" });
  const roundCharts = h("div", { id: "round-charts", class: "chart-grid two" });
  const trainCharts = h("div", { id: "train-charts", class: "chart-grid four" });
  const histRoundSelect = h("select", { id: "hist-round" });
  const histCharts = h("div", { id: "hist-charts", class: "chart-grid two" });
  const histSearch = h("input", { id: "history-search", type: "search", placeholder: "problem id", autocomplete: "off" });
  const histRoundFilter = h("select", { id: "history-round" });
  const histSelFilter = h(
    "select",
    { id: "history-selected" },
    h("option", { value: "" }, "All candidates"),
    h("option", { value: "yes" }, "Selected only"),
    h("option", { value: "no" }, "Not selected"),
  );
  const histTable = h("div", { id: "history", class: "table-wrap" });
  const histCount = h("p", { class: "muted", id: "history-count", "aria-live": "polite" });
  const histPager = h("div", { class: "pager" });
  const config = h("details", { class: "card config-card" });

  main.append(
    h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "#/" }, "Experiments"), " / ", h("span", { id: "crumb-name" }, `#${id}`)),
    h("div", { class: "page-head" }, title, actions),
    headInfo,
    live,
    config,
    h("section", { "aria-labelledby": "timeline-h" }, h("h2", { id: "timeline-h" }, "Rounds"), timeline),
    h("section", { "aria-labelledby": "curves-h" }, h("h2", { id: "curves-h" }, "Validation reward and candidate accuracy per round"), roundCharts),
    h("section", { "aria-labelledby": "train-h" }, h("h2", { id: "train-h" }, "Training metrics per GRPO step"), trainCharts),
    h(
      "section",
      { "aria-labelledby": "dist-h" },
      h("div", { class: "section-head" }, h("h2", { id: "dist-h" }, "Scores and accuracies: candidates vs selected"), h("div", { class: "field-inline" }, h("label", { for: "hist-round" }, "Round"), histRoundSelect)),
      histCharts,
    ),
    h(
      "section",
      { "aria-labelledby": "history-h" },
      h("h2", { id: "history-h" }, "Selection history"),
      h(
        "form",
        { class: "filters", role: "search", "aria-label": "Filter the selection history", onsubmit: (ev) => ev.preventDefault() },
        h("div", { class: "field-inline grow" }, h("label", { for: "history-search" }, "Problem"), histSearch),
        h("div", { class: "field-inline" }, h("label", { for: "history-round" }, "Round"), histRoundFilter),
        h("div", { class: "field-inline" }, h("label", { for: "history-selected" }, "Show"), histSelFilter),
      ),
      histCount,
      histTable,
      histPager,
    ),
  );

  // ---- renderers
  const renderHead = () => {
    const e = st.exp;
    document.title = `${e.name} · GradAlign`;
    fill(title, e.name, " ", badge(e.status));
    title.dataset.status = e.status;
    $("#crumb-name").textContent = `${e.name} (#${e.id})`;
    const canCancel = !TERMINAL.includes(e.status);
    const canResume = e.status === "failed" || e.status === "cancelled";
    fill(actions, 
      h("button", { type: "button", id: "action-refresh", onclick: () => refresh(true) }, "Refresh"),
      h("button", { type: "button", id: "action-cancel", class: "danger", disabled: !canCancel, onclick: () => act("cancel") }, "Cancel"),
      h("button", { type: "button", id: "action-resume", disabled: !canResume, onclick: () => act("resume") }, "Resume"),
    );
    const c = e.config || {};
    fill(headInfo, 
      h(
        "p",
        { class: "meta" },
        h("span", {}, `#${e.id}`),
        h("span", {}, `mode ${c.mode}`),
        h("span", { title: c.model }, `model ${basename(c.model)}`),
        h("span", {}, `data ${basename(c.train_dataset)} / ${basename(c.val_dataset)}`),
        h("span", {}, "created ", timeCell(e.created_at)),
        h("span", {}, "started ", timeCell(e.started_at)),
        h("span", {}, "updated ", timeCell(e.updated_at)),
        e.finished_at ? h("span", {}, "finished ", timeCell(e.finished_at)) : null,
      ),
      e.status_detail ? h("p", { class: "notice", id: "status-detail" }, e.status_detail) : null,
      e.error ? h("p", { class: "error-box", id: "exp-error" }, h("strong", {}, "Error: "), e.error) : null,
    );
    fill(config, h("summary", {}, "Configuration"), configList(c));
  };

  const runningStage = () => {
    const rnd = st.rounds.find((r) => r.index === st.exp.current_round);
    const stage = rnd && rnd.stages.find((x) => x.status === "running");
    return rnd && stage ? { round: rnd.index, stage } : null;
  };

  const renderLive = () => {
    const e = st.exp;
    const running = runningStage();
    const connText = { live: "live", reconnecting: "reconnecting…", closed: "disconnected", connecting: "connecting…" }[st.conn];
    const body = [];
    if (running) {
      const { stage } = running;
      const done = stage.progress_done || 0;
      const total = stage.progress_total || 0;
      body.push(
        h(
          "p",
          { class: "live-stage", id: "live-stage", "data-round": running.round, "data-stage": stage.name },
          h("strong", {}, `Round ${running.round} · ${stageLabel(stage.name)}`),
          stage.attempts > 1 ? ` (attempt ${stage.attempts})` : "",
          " — ",
          h("span", { id: "live-progress-text" }, total ? `${done} / ${total} ${pluralUnit(stage.progress_unit)}` : "started"),
          " · running for ",
          h("span", { class: "since", "data-since": stage.started_at || "" }, fmtDuration(stageDuration(stage, Date.now()))),
        ),
        h("progress", { id: "live-progress", max: total || 1, value: total ? done : 0, "aria-labelledby": "live-stage" }),
      );
    } else if (e.status === "running" || e.status === "pending") {
      body.push(h("p", { id: "live-stage" }, e.status === "pending" ? "Waiting for the scheduler to start this experiment." : `Round ${e.current_round}: between stages.`));
    } else {
      body.push(h("p", { id: "live-stage" }, `This experiment is ${e.status}.`));
    }
    fill(live, 
      h("h2", { id: "live-h", class: "visually-hidden" }, "Live progress"),
      h("div", { class: "live-head" }, h("span", {}, "Now"), h("span", { class: "conn", id: "conn", "data-state": st.conn }, `events: ${connText}`)),
      h("div", { "aria-live": "polite" }, body),
    );
  };

  const renderTimeline = () => {
    const now = Date.now();
    if (!st.rounds.length) {
      fill(timeline, h("p", { class: "empty" }, "No rounds yet."));
      return;
    }
    const rows = st.rounds.map((r) => {
      const roundStart = parseTime(r.started_at);
      const roundEnd = parseTime(r.finished_at);
      const wall = roundStart === null ? null : ((roundEnd ?? now) - roundStart) / 1000;
      return h(
        "tr",
        { "data-round": r.index, "data-status": r.status },
        h("th", { scope: "row" }, `Round ${r.index}`, h("br"), badge(r.status)),
        STAGES.map((name) => {
          const stage = r.stages.find((x) => x.name === name);
          if (!stage) return h("td", { class: "stage-empty" }, "—");
          const dur = stageDuration(stage, now);
          const tip = [
            `${stageLabel(name)}: ${stage.status}`,
            stage.started_at ? `started ${fmtTime(stage.started_at)}` : null,
            stage.finished_at ? `finished ${fmtTime(stage.finished_at)}` : null,
            `compute ${fmtDuration(stage.compute_seconds)}`,
            `queued for a worker ${fmtDuration(stage.queued_seconds || 0)}`,
            stage.attempts ? `attempts ${stage.attempts}` : null,
            stage.error ? `error: ${stage.error}` : null,
          ].filter(Boolean).join("\n");
          const showProgress = stage.progress_total > 0 && (stage.status === "running" || stage.progress_done < stage.progress_total);
          return h(
            "td",
            {},
            h(
              "div",
              { class: ["stage", `status-${stage.status}`], "data-round": r.index, "data-stage": name, "data-status": stage.status, title: tip },
              h("span", { class: "stage-status" }, stage.status),
              h(
                "span",
                { class: "stage-time" },
                stage.status === "running" && stage.started_at
                  ? h("span", { class: "since", "data-since": stage.started_at }, fmtDuration(dur))
                  : fmtDuration(dur),
              ),
              stage.attempts > 1 ? h("span", { class: "stage-attempts" }, `attempt ${stage.attempts}`) : null,
              stage.queued_seconds >= 0.5
                ? h("span", { class: "stage-queued", title: "waited at the scheduler for a worker slot" }, `queued ${fmtDuration(stage.queued_seconds)}, computing ${fmtDuration(stage.compute_seconds)}`)
                : null,
              showProgress
                ? [
                    h("span", { class: "stage-progress-text" }, `${stage.progress_done} / ${stage.progress_total} ${pluralUnit(stage.progress_unit)}`),
                    h("progress", { max: stage.progress_total, value: stage.progress_done, "aria-label": `${stageLabel(name)} progress, round ${r.index}` }),
                  ]
                : null,
              stage.error ? h("span", { class: "stage-error" }, stage.error) : null,
            ),
          );
        }),
        h("td", { class: "num" }, fmtNum(r.validation_reward)),
        h("td", { class: "num" }, fmtNum(r.candidate_accuracy)),
        h("td", { class: "num" }, fmtDuration(wall)),
        h("td", { class: "num" }, fmtDuration(r.overhead_seconds)),
      );
    });
    fill(timeline, 
      h(
        "table",
        { class: "data timeline", id: "timeline-table" },
        h("caption", { class: "visually-hidden" }, "Rounds and the state and duration of each stage"),
        h(
          "thead",
          {},
          h("tr", {}, h("th", { scope: "col" }, "Round"), STAGES.map((n) => h("th", { scope: "col" }, stageLabel(n))), ["Val. reward", "Cand. accuracy", "Wall time", "Overhead"].map((t) => h("th", { scope: "col" }, t))),
        ),
        h("tbody", {}, rows),
      ),
    );
  };

  const renderRoundCharts = () => {
    const pts = (key) =>
      st.rounds
        .filter((r) => r[key] !== null && r[key] !== undefined)
        .map((r) => ({ x: r.index, y: r[key], tip: `round ${r.index}: ${fmtNum(r[key], 4)}` }));
    fill(roundCharts, 
      lineChart({ key: "validation-reward", title: "Validation reward per round", xLabel: "round", yLabel: "mean reward", xInteger: true, series: [{ name: "validation reward", points: pts("validation_reward"), cls: "series-0" }] }),
      lineChart({ key: "candidate-accuracy", title: "Candidate accuracy per round", xLabel: "round", yLabel: "accuracy", xInteger: true, series: [{ name: "candidate accuracy", points: pts("candidate_accuracy"), cls: "series-1" }] }),
    );
  };

  const renderTrainCharts = () => {
    const rows = [];
    const boundaries = [];
    for (const r of st.rounds) {
      const steps = st.steps.get(r.index) || [];
      if (rows.length && steps.length) boundaries.push(rows.length + 0.5);
      for (const step of steps) rows.push({ round: r.index, step: step.step, metrics: step.metrics || {}, x: rows.length + 1 });
    }
    const keys = [...TRAIN_METRICS];
    for (const row of rows) for (const k of Object.keys(row.metrics)) if (!keys.includes(k) && typeof row.metrics[k] === "number") keys.push(k);
    const present = keys.filter((k) => rows.some((row) => typeof row.metrics[k] === "number"));
    if (!present.length) {
      fill(trainCharts, h("p", { class: "empty", "data-chart": "train-empty" }, "No training steps yet."));
      return;
    }
    fill(trainCharts, 
      ...present.map((k, i) =>
        lineChart({
          key: `train-${k}`,
          title: k.replace(/_/g, " "),
          xLabel: "step (all rounds)",
          xInteger: true,
          height: 190,
          width: 340,
          legend: false,
          vlines: boundaries,
          series: [
            {
              name: k,
              cls: `series-${i % 8}`,
              points: rows.filter((row) => typeof row.metrics[k] === "number").map((row) => ({ x: row.x, y: row.metrics[k], tip: `round ${row.round} step ${row.step}: ${k} ${fmtNum(row.metrics[k], 4)}` })),
            },
          ],
        }),
      ),
    );
  };

  const renderHistograms = () => {
    const withCands = st.rounds.filter((r) => (st.cands.get(r.index) || []).length);
    const options = withCands.map((r) => r.index);
    if (st.histRound === null || !options.includes(st.histRound)) st.histRound = options.length ? options[options.length - 1] : null;
    fill(histRoundSelect, options.length ? options.map((i) => h("option", { value: String(i), selected: i === st.histRound }, `Round ${i}`)) : h("option", { value: "" }, "none yet"));
    histRoundSelect.disabled = !options.length;
    if (st.histRound === null) {
      fill(histCharts, h("p", { class: "empty" }, "No candidates scored yet."));
      return;
    }
    const cands = st.cands.get(st.histRound) || [];
    const sel = cands.filter((c) => c.selected);
    const scores = cands.map((c) => c.score).filter((v) => v !== null && v !== undefined);
    const selScores = sel.map((c) => c.score).filter((v) => v !== null && v !== undefined);
    let lo = Math.min(...scores);
    let hi = Math.max(...scores);
    if (!scores.length) {
      lo = 0;
      hi = 1;
    } else if (lo === hi) {
      lo -= 0.5;
      hi += 0.5;
    }
    const nbins = Math.max(5, Math.min(20, Math.ceil(Math.sqrt(scores.length)) + 2));
    const scoreEdges = Array.from({ length: nbins + 1 }, (_, i) => lo + ((hi - lo) * i) / nbins);
    const n = Number((st.exp.config || {}).n_samples_train) || 0;
    let accEdges;
    let accLabels;
    if (n >= 1 && n <= 16) {
      accEdges = Array.from({ length: n + 2 }, (_, i) => (i - 0.5) / n);
      accLabels = Array.from({ length: n + 1 }, (_, i) => fmtNum(i / n, 2));
    } else {
      accEdges = Array.from({ length: 11 }, (_, i) => i / 10);
    }
    fill(histCharts, 
      histogram({
        key: "score-hist",
        title: `Scores, round ${st.histRound}`,
        xLabel: "score",
        edges: scoreEdges,
        series: [
          { name: "candidates", values: scores, cls: "series-all" },
          { name: "selected", values: selScores, cls: "series-sel" },
        ],
        emptyText: "No scores in this round.",
      }),
      histogram({
        key: "accuracy-hist",
        title: `Accuracy, round ${st.histRound}`,
        xLabel: "accuracy of the candidate's responses",
        edges: accEdges,
        labels: accLabels,
        series: [
          { name: "candidates", values: cands.map((c) => c.accuracy), cls: "series-all" },
          { name: "selected", values: sel.map((c) => c.accuracy), cls: "series-sel" },
        ],
      }),
    );
  };
  histRoundSelect.addEventListener("change", () => {
    st.histRound = Number(histRoundSelect.value);
    renderHistograms();
  });

  const HIST_COLUMNS = [
    ["problem", "Problem"],
    ["round", "Round"],
    ["score", "Score"],
    ["accuracy", "Accuracy"],
    ["zero_advantage", "Zero adv."],
    ["selected", "Selected"],
    ["rank", "Rank"],
  ];

  const renderHistory = () => {
    const f = st.hist;
    const rounds = st.rounds.map((r) => r.index);
    const keep = histRoundFilter.value;
    fill(histRoundFilter, h("option", { value: "" }, "All rounds"), ...rounds.map((i) => h("option", { value: String(i), selected: String(i) === keep }, `Round ${i}`)));
    let rows = [];
    for (const r of st.rounds) for (const c of st.cands.get(r.index) || []) rows.push({ ...c, round: r.index });
    const q = f.q.toLowerCase();
    rows = rows.filter(
      (c) =>
        (!q || c.problem_id.toLowerCase().includes(q)) &&
        (f.round === "" || String(c.round) === f.round) &&
        (f.selected === "" || (f.selected === "yes") === !!c.selected),
    );
    const val = (c, key) => (key === "problem" ? c.problem_id : key === "selected" || key === "zero_advantage" ? (c[key] ? 1 : 0) : c[key]);
    rows.sort((a, b) => {
      const va = val(a, f.sort);
      const vb = val(b, f.sort);
      let cmp;
      if (va === null || va === undefined) cmp = vb === null || vb === undefined ? 0 : 1;
      else if (vb === null || vb === undefined) cmp = -1;
      else if (typeof va === "string") cmp = va.localeCompare(vb, undefined, { numeric: true });
      else cmp = va - vb;
      if (cmp === 0) cmp = a.round - b.round || (a.rank ?? 1e9) - (b.rank ?? 1e9) || a.problem_id.localeCompare(b.problem_id, undefined, { numeric: true });
      else cmp *= f.dir;
      return cmp;
    });
    const total = rows.length;
    if (f.offset >= total) f.offset = Math.max(0, Math.floor((total - 1) / PAGE_SIZE) * PAGE_SIZE);
    const pageRows = rows.slice(f.offset, f.offset + PAGE_SIZE);
    const head = HIST_COLUMNS.map(([key, label]) =>
      h(
        "th",
        { scope: "col", "aria-sort": f.sort === key ? (f.dir > 0 ? "ascending" : "descending") : "none" },
        h(
          "button",
          {
            type: "button",
            class: "sort",
            onclick: () => {
              if (f.sort === key) f.dir = -f.dir;
              else {
                f.sort = key;
                f.dir = key === "score" || key === "accuracy" || key === "selected" ? -1 : 1;
              }
              renderHistory();
              $(`#history th[aria-sort="${f.dir > 0 ? "ascending" : "descending"}"] button`)?.focus();
            },
          },
          label,
          f.sort === key ? (f.dir > 0 ? " ▲" : " ▼") : "",
        ),
      ),
    );
    fill(histTable, 
      h(
        "table",
        { class: "data", id: "history-table" },
        h("caption", { class: "visually-hidden" }, "Candidates of every round with score, accuracy and whether they were selected"),
        h("thead", {}, h("tr", {}, head)),
        h(
          "tbody",
          {},
          pageRows.map((c) =>
            h(
              "tr",
              { "data-problem": c.problem_id, "data-round": c.round, class: c.selected ? "is-selected" : null },
              h("td", {}, h("a", { href: `#/experiments/${id}/rounds/${c.round}/problems/${encodeURIComponent(c.problem_id)}` }, c.problem_id)),
              h("td", { class: "num" }, String(c.round)),
              h("td", { class: "num" }, fmtNum(c.score, 4)),
              h("td", { class: "num" }, fmtNum(c.accuracy, 3)),
              h("td", {}, c.zero_advantage === null || c.zero_advantage === undefined ? "—" : c.zero_advantage ? "yes" : "no"),
              h("td", {}, c.selected ? h("span", { class: "yes" }, "✓ selected") : h("span", { class: "muted" }, "no")),
              h("td", { class: "num" }, c.rank === null || c.rank === undefined ? "—" : String(c.rank)),
            ),
          ),
          total ? null : h("tr", { class: "empty-row" }, h("td", { colspan: HIST_COLUMNS.length }, "No candidates match.")),
        ),
      ),
    );
    histCount.textContent = total ? `Candidates ${f.offset + 1}–${f.offset + pageRows.length} of ${total}` : "0 candidates";
    fill(histPager, 
      h("button", { type: "button", disabled: f.offset <= 0, onclick: () => { f.offset = Math.max(0, f.offset - PAGE_SIZE); renderHistory(); } }, "← Previous"),
      h("button", { type: "button", disabled: f.offset + PAGE_SIZE >= total, onclick: () => { f.offset += PAGE_SIZE; renderHistory(); } }, "Next →"),
    );
  };
  histSearch.addEventListener("input", () => {
    st.hist.q = histSearch.value.trim();
    st.hist.offset = 0;
    renderHistory();
  });
  histRoundFilter.addEventListener("change", () => {
    st.hist.round = histRoundFilter.value;
    st.hist.offset = 0;
    renderHistory();
  });
  histSelFilter.addEventListener("change", () => {
    st.hist.selected = histSelFilter.value;
    st.hist.offset = 0;
    renderHistory();
  });

  const renderAll = () => {
    renderHead();
    renderLive();
    renderTimeline();
    renderRoundCharts();
    renderTrainCharts();
    renderHistograms();
    renderHistory();
  };

  // ---- data
  const fetchRoundData = async (rounds) => {
    await mapLimit(rounds, 4, async (r) => {
      const [cands, steps] = await Promise.all([
        page.api(`/api/v1/experiments/${id}/rounds/${r.index}/candidates?limit=10000`).then((d) => d.items),
        page.api(`/api/v1/experiments/${id}/rounds/${r.index}/train-steps`),
      ]);
      st.cands.set(r.index, cands);
      st.steps.set(r.index, steps);
      st.stale.delete(r.index);
    });
  };

  let inFlight = null;
  let again = false;
  const refresh = async (all = false) => {
    if (inFlight) {
      again = true;
      return inFlight;
    }
    inFlight = (async () => {
      try {
        do {
          again = false;
          const [exp, rounds] = await Promise.all([page.api(`/api/v1/experiments/${id}`), page.api(`/api/v1/experiments/${id}/rounds`)]);
          st.exp = exp;
          st.rounds = rounds;
          const need = rounds.filter((r) => all || !st.cands.has(r.index) || st.stale.has(r.index) || r.status === "running");
          await fetchRoundData(need);
          if (page.disposed) return;
          renderAll();
        } while (again && !page.disposed);
      } catch (err) {
        if (err.name !== "AbortError" && !page.disposed) showBanner("error", err.message);
      } finally {
        inFlight = null;
      }
    })();
    return inFlight;
  };

  let timer = null;
  const refreshSoon = () => {
    clearTimeout(timer);
    timer = setTimeout(() => refresh(), 150);
  };
  page.onDispose(() => clearTimeout(timer));

  let frame = null;
  const rerenderLiveSoon = (trainToo) => {
    if (trainToo) rerenderLiveSoon.train = true;
    if (frame !== null) return;
    frame = requestAnimationFrame(() => {
      frame = null;
      if (page.disposed || !st.exp) return;
      renderLive();
      renderTimeline();
      if (rerenderLiveSoon.train) renderTrainCharts();
      rerenderLiveSoon.train = false;
    });
  };

  const onProgress = (ev) => {
    st.live = ev;
    const rnd = st.rounds.find((r) => r.index === ev.round);
    const stage = rnd && rnd.stages.find((x) => x.name === ev.stage);
    if (!stage) {
      refreshSoon();
      return;
    }
    if (stage.status === "pending") {
      stage.status = "running";
      if (!stage.started_at) stage.started_at = new Date(ev.time ? ev.time * 1000 : Date.now()).toISOString();
    }
    if (typeof ev.done === "number") stage.progress_done = ev.done;
    if (typeof ev.total === "number") stage.progress_total = ev.total;
    if (ev.unit) stage.progress_unit = ev.unit;
    let train = false;
    if (ev.stage === "train" && ev.metrics && typeof ev.done === "number") {
      const steps = (st.steps.get(ev.round) || []).filter((x) => x.step !== ev.done);
      steps.push({ step: ev.done, metrics: ev.metrics });
      steps.sort((a, b) => a.step - b.step);
      st.steps.set(ev.round, steps);
      train = true;
    }
    rerenderLiveSoon(train);
  };

  const act = async (verb) => {
    if (verb === "cancel" && !window.confirm(`Cancel experiment “${st.exp.name}” (#${id})? The running stage is abandoned.`)) return;
    const button = $(`#action-${verb}`);
    if (button) button.disabled = true;
    try {
      const exp = await page.api(`/api/v1/experiments/${id}/${verb}`, { method: "POST" });
      showBanner("info", `Experiment #${id} is now ${exp.status}.`);
      st.exp = exp;
      await refresh();
    } catch (err) {
      if (err.name === "AbortError") return;
      if (err.status !== 401 && err.status !== 403) showBanner("error", err.message);
      if (button) button.disabled = false;
    }
  };

  page.events(
    `experiment_id=${id}`,
    (type, ev) => {
      if (ev.experiment_id !== undefined && ev.experiment_id !== id) return;
      if (!st.exp) return;
      if (type === "progress") {
        onProgress(ev);
        return;
      }
      if (typeof ev.round === "number") st.stale.add(ev.round);
      if (type === "experiment_deleted") {
        showBanner("info", `Experiment #${id} was deleted.`);
        location.hash = "#/";
        return;
      }
      refreshSoon();
    },
    (conn, reconnected) => {
      st.conn = conn;
      if (st.exp) renderLive();
      if (reconnected) refresh(true);
    },
  );

  page.every(1000, () => {
    const now = Date.now();
    for (const el of main.querySelectorAll(".since[data-since]")) {
      const t = parseTime(el.dataset.since);
      if (t !== null) el.textContent = fmtDuration((now - t) / 1000);
    }
  });

  const [exp, rounds] = await Promise.all([page.api(`/api/v1/experiments/${id}`), page.api(`/api/v1/experiments/${id}/rounds`)]);
  st.exp = exp;
  st.rounds = rounds;
  renderHead();
  renderLive();
  renderTimeline();
  await fetchRoundData(rounds);
  if (!page.disposed) renderAll();
  main.dataset.loaded = "true";
}

// ---- problem page --------------------------------------------------------------------------------

function promptView(prompt) {
  if (prompt === null || prompt === undefined) return h("p", { class: "muted" }, "The prompt is not available (the dataset file is gone).");
  try {
    const messages = JSON.parse(prompt);
    if (Array.isArray(messages) && messages.every((m) => m && typeof m.content === "string")) {
      return h(
        "ol",
        { class: "messages" },
        messages.map((m) => h("li", {}, h("span", { class: "role" }, m.role || "message"), h("pre", { class: "text" }, m.content))),
      );
    }
  } catch {
    /* a plain-text prompt */
  }
  return h("pre", { class: "text" }, prompt);
}

async function renderProblem(page, main, [idText, roundText, problemId]) {
  const id = Number(idText);
  const round = Number(roundText);
  main.dataset.page = "problem";
  document.title = `Problem ${problemId} · GradAlign`;
  const [exp, p] = await Promise.all([
    page.api(`/api/v1/experiments/${id}`),
    page.api(`/api/v1/experiments/${id}/rounds/${round}/problems/${encodeURIComponent(problemId)}`),
  ]);
  const correct = p.responses.filter((r) => r.correct).length;
  const meanReward = p.responses.length ? p.responses.reduce((a, r) => a + r.reward, 0) / p.responses.length : null;
  main.append(
    h(
      "nav",
      { class: "crumbs", "aria-label": "Breadcrumb" },
      h("a", { href: "#/" }, "Experiments"),
      " / ",
      h("a", { href: `#/experiments/${id}` }, `${exp.name} (#${id})`),
      " / ",
      h("span", {}, `round ${round}`),
    ),
    h("div", { class: "page-head" }, h("h1", {}, `Problem ${p.problem_id}`, " ", p.selected ? h("span", { class: "badge status-completed" }, "selected") : h("span", { class: "badge status-pending" }, "not selected"))),
    h(
      "dl",
      { class: "config problem-facts" },
      [
        ["Round", String(p.round)],
        ["Score", fmtNum(p.score, 4)],
        ["Accuracy", fmtNum(p.accuracy, 3)],
        ["Rank", p.rank === null ? "—" : String(p.rank)],
        ["Data source", p.data_source || "—"],
        ["Ground truth", p.ground_truth ?? "—"],
        ["Responses", `${p.responses.length} (${correct} correct)`],
        ["Mean reward", fmtNum(meanReward, 3)],
      ].map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))),
    ),
    h("section", { "aria-labelledby": "prompt-h" }, h("h2", { id: "prompt-h" }, "Prompt"), h("div", { class: "card", id: "prompt" }, promptView(p.prompt))),
    h(
      "section",
      { "aria-labelledby": "responses-h" },
      h("h2", { id: "responses-h" }, "Responses and rewards"),
      p.responses.length
        ? h(
            "div",
            { class: "table-wrap" },
            h(
              "table",
              { class: "data responses", id: "responses-table" },
              h("thead", {}, h("tr", {}, ["#", "Response", "Reward", "Correct", "Tokens", "Finish"].map((t) => h("th", { scope: "col" }, t)))),
              h(
                "tbody",
                {},
                p.responses.map((r, i) =>
                  h(
                    "tr",
                    { class: r.correct ? "is-correct" : "is-wrong" },
                    h("td", { class: "num" }, String(i + 1)),
                    h("td", {}, h("pre", { class: "text" }, r.text)),
                    h("td", { class: "num" }, fmtNum(r.reward, 3)),
                    h("td", {}, r.correct ? h("span", { class: "yes" }, "✓ yes") : h("span", { class: "no" }, "✗ no")),
                    h("td", { class: "num" }, String(r.n_tokens)),
                    h("td", {}, r.finish_reason || "—"),
                  ),
                ),
              ),
            ),
          )
        : h("p", { class: "empty" }, "No responses were found in this round's rollout files."),
    ),
  );
  main.dataset.loaded = "true";
}

// ---- compare page ------------------------------------------------------------------------------

async function renderCompare(page, main, _args, params) {
  main.dataset.page = "compare";
  document.title = "Compare · GradAlign";
  const chosen = new Set((params.get("ids") || "").split(",").map(Number).filter((x) => Number.isInteger(x) && x > 0));
  let metric = params.get("metric") === "candidate_accuracy" ? "candidate_accuracy" : "validation_reward";
  const rounds = new Map(); // experiment id -> rounds
  const list = await page.api("/api/v1/experiments?limit=500");
  const byId = new Map(list.items.map((e) => [e.id, e]));
  const chartBox = h("div", { id: "compare-chart" });
  const summary = h("div", { class: "table-wrap", id: "compare-summary" });
  const metricSelect = h(
    "select",
    { id: "compare-metric" },
    h("option", { value: "validation_reward", selected: metric === "validation_reward" }, "Validation reward"),
    h("option", { value: "candidate_accuracy", selected: metric === "candidate_accuracy" }, "Candidate accuracy"),
  );
  const boxes = h(
    "fieldset",
    { class: "choices card" },
    h("legend", {}, "Experiments to overlay"),
    list.items.length
      ? list.items.map((e) => {
          const boxId = `cmp-${e.id}`;
          return h(
            "div",
            { class: "choice" },
            h("input", { type: "checkbox", id: boxId, value: String(e.id), checked: chosen.has(e.id), "data-experiment-id": e.id }),
            h("label", { for: boxId }, `#${e.id} ${e.name}`, h("span", { class: "muted" }, ` · ${(e.config || {}).mode} · ${basename((e.config || {}).train_dataset)} · `), badge(e.status)),
          );
        })
      : h("p", { class: "empty" }, "No experiments yet."),
  );
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Compare experiments"), h("div", { class: "field-inline" }, h("label", { for: "compare-metric" }, "Metric"), metricSelect)),
    h("p", { class: "muted" }, "Tick experiments (e.g. sim and rand on the same data) to overlay their curves per round."),
    h("div", { class: "compare-layout" }, boxes, h("div", {}, chartBox, summary)),
  );

  const render = () => {
    const ids = [...chosen].filter((i) => byId.has(i)).sort((a, b) => a - b);
    const series = ids.map((eid, i) => {
      const e = byId.get(eid);
      const rs = rounds.get(eid) || [];
      return {
        name: `#${eid} ${e.name} (${(e.config || {}).mode})`,
        cls: `series-${i % 8}`,
        points: rs.filter((r) => r[metric] !== null && r[metric] !== undefined).map((r) => ({ x: r.index, y: r[metric], tip: `#${eid} ${e.name}, round ${r.index}: ${fmtNum(r[metric], 4)}` })),
      };
    });
    const label = metric === "validation_reward" ? "Validation reward" : "Candidate accuracy";
    fill(chartBox, 
      ids.length
        ? lineChart({ key: "compare", title: `${label} per round`, xLabel: "round", yLabel: label.toLowerCase(), xInteger: true, series, height: 320, width: 760 })
        : h("p", { class: "empty", "data-chart": "compare", "data-points": "0" }, "Choose experiments to compare."),
    );
    fill(summary, 
      ids.length
        ? h(
            "table",
            { class: "data" },
            h("thead", {}, h("tr", {}, ["Experiment", "Mode", "Status", "Rounds", `Last ${label.toLowerCase()}`, `Best ${label.toLowerCase()}`].map((t) => h("th", { scope: "col" }, t)))),
            h(
              "tbody",
              {},
              ids.map((eid, i) => {
                const e = byId.get(eid);
                const vals = (rounds.get(eid) || []).map((r) => r[metric]).filter((v) => v !== null && v !== undefined);
                return h(
                  "tr",
                  {},
                  h("td", {}, h("span", { class: ["swatch", `series-${i % 8}`], "aria-hidden": "true" }), " ", h("a", { href: `#/experiments/${eid}` }, `#${eid} ${e.name}`)),
                  h("td", {}, (e.config || {}).mode || "—"),
                  h("td", {}, badge(e.status)),
                  h("td", { class: "num" }, String((rounds.get(eid) || []).length)),
                  h("td", { class: "num" }, vals.length ? fmtNum(vals[vals.length - 1]) : "—"),
                  h("td", { class: "num" }, vals.length ? fmtNum(Math.max(...vals)) : "—"),
                );
              }),
            ),
          )
        : "",
    );
  };

  const sync = () => {
    const p = new URLSearchParams();
    if (chosen.size) p.set("ids", [...chosen].sort((a, b) => a - b).join(","));
    if (metric !== "validation_reward") p.set("metric", metric);
    setRouteParams("/compare", p);
  };

  const load = async (ids) => {
    await mapLimit(ids, 4, async (eid) => {
      if (!rounds.has(eid)) rounds.set(eid, await page.api(`/api/v1/experiments/${eid}/rounds`));
    });
    if (!page.disposed) render();
  };

  boxes.addEventListener("change", (ev) => {
    const box = ev.target;
    if (!(box instanceof HTMLInputElement)) return;
    const eid = Number(box.value);
    if (box.checked) chosen.add(eid);
    else chosen.delete(eid);
    sync();
    load([eid]).catch((err) => err.name !== "AbortError" && showBanner("error", err.message));
  });
  metricSelect.addEventListener("change", () => {
    metric = metricSelect.value;
    sync();
    render();
  });
  await load([...chosen].filter((i) => byId.has(i)));
  render();
  main.dataset.loaded = "true";
}

// ---- create form --------------------------------------------------------------------------------

const FORM_FIELDS = [
  { name: "name", label: "Name", type: "text", value: "experiment" },
  { name: "model", label: "Model directory", type: "text", required: true, help: "Local Hugging Face model directory of the starting checkpoint.", placeholder: "/path/to/model" },
  { name: "train_dataset", label: "Train dataset", type: "text", required: true, value: "arith-train", list: "datasets-list", help: "Built-in name (arith-train) or a local .jsonl/.parquet file." },
  { name: "val_dataset", label: "Validation dataset", type: "text", required: true, value: "arith-val", list: "datasets-list", help: "Built-in name (arith-val) or a local .jsonl/.parquet file." },
  { name: "mode", label: "Selection mode", type: "select", options: MODES, value: "sim" },
  { name: "chunk_size", label: "Chunk size (M)", type: "int", required: true, help: "Candidate problems per round.", placeholder: "e.g. 16" },
  { name: "k", label: "k", type: "int", required: true, help: "Keep M/k candidates per round.", placeholder: "e.g. 4" },
  { name: "num_selections", label: "Rounds", type: "int", required: true, placeholder: "e.g. 2" },
  { name: "train_batch_size", label: "Train batch size", type: "int", required: true, help: "Problems per GRPO step; at most M/k.", placeholder: "e.g. 4" },
  { name: "iters_per_select", label: "GRPO steps per round", type: "int", required: true, help: "(k × batch × steps) must be a multiple of M.", placeholder: "e.g. 1" },
  { name: "n_samples_train", label: "Responses per candidate", type: "int", value: "8", advanced: true },
  { name: "n_samples_val", label: "Responses per validation problem", type: "int", value: "8", advanced: true },
  { name: "max_tokens", label: "Max tokens", type: "int", value: "8", advanced: true },
  { name: "temperature", label: "Temperature", type: "float", value: "1.0", advanced: true },
  { name: "top_p", label: "Top-p", type: "float", value: "1.0", advanced: true },
  { name: "seed", label: "Seed", type: "int", value: "0", advanced: true },
  { name: "learning_rate", label: "Learning rate", type: "float", value: "0.0001", advanced: true },
  { name: "clip_eps", label: "Clip ε", type: "float", value: "0.2", advanced: true },
  { name: "kl_coef", label: "KL coefficient", type: "float", value: "0.0", advanced: true },
  { name: "micro_batch_size", label: "Micro-batch size", type: "int", value: "64", advanced: true },
  { name: "scoring_method", label: "Scoring method", type: "text", value: "exact", advanced: true, help: "exact (the spec), exact-loop, or an approximation: project[-K], top-layers[-N], fewer-responses[-M]." },
  { name: "scoring_dtype", label: "Scoring dtype", type: "select", options: ["auto", "float32", "bfloat16", "float16"], value: "auto", advanced: true, help: "auto: the scoring service's setting (bfloat16 on CUDA, float32 on CPU)." },
];

function formField(f) {
  const inputId = `field-${f.name}`;
  const helpId = f.help ? `help-${f.name}` : null;
  let control;
  if (f.type === "select") {
    control = h("select", { id: inputId, name: f.name }, f.options.map((o) => h("option", { value: o, selected: o === f.value }, o)));
  } else {
    control = h("input", {
      id: inputId,
      name: f.name,
      type: "text",
      inputmode: f.type === "int" ? "numeric" : f.type === "float" ? "decimal" : null,
      value: f.value || "",
      placeholder: f.placeholder || null,
      list: f.list || null,
      autocomplete: "off",
      spellcheck: "false",
    });
  }
  if (helpId) {
    control.setAttribute("aria-describedby", helpId);
    control.dataset.help = helpId;
  }
  if (f.required) control.setAttribute("aria-required", "true");
  return h(
    "div",
    { class: "field", "data-field": f.name },
    h("label", { for: inputId }, f.label, f.required ? h("span", { class: "req", "aria-hidden": "true" }, " *") : null),
    control,
    helpId ? h("p", { class: "help", id: helpId }, f.help) : null,
  );
}

function clearFieldErrors(form) {
  for (const el of form.querySelectorAll(".field-error")) el.remove();
  for (const el of form.querySelectorAll("[aria-invalid]")) {
    el.removeAttribute("aria-invalid");
    if (el.dataset.help) el.setAttribute("aria-describedby", el.dataset.help);
    else el.removeAttribute("aria-describedby");
  }
  for (const el of form.querySelectorAll(".field.has-error")) el.classList.remove("has-error");
}

function showFieldError(form, field, message) {
  const wrapper = form.querySelector(`.field[data-field="${CSS.escape(field)}"]`);
  if (!wrapper) return false;
  const control = wrapper.querySelector("input, select");
  const errId = `error-${field}`;
  let err = wrapper.querySelector(".field-error");
  if (err) err.textContent += `; ${message}`;
  else {
    err = h("p", { class: "field-error", id: errId, "data-field": field }, message);
    control.insertAdjacentElement("afterend", err);
  }
  wrapper.classList.add("has-error");
  control.setAttribute("aria-invalid", "true");
  control.setAttribute("aria-describedby", [errId, control.dataset.help].filter(Boolean).join(" "));
  const details = wrapper.closest("details");
  if (details) details.open = true;
  return true;
}

function cleanMessage(msg) {
  return String(msg || "invalid").replace(/^Value error, /, "");
}

async function renderCreate(page, main) {
  main.dataset.page = "create";
  document.title = "New experiment · GradAlign";
  const summary = h("div", { id: "form-errors", class: "error-summary", tabindex: "-1", hidden: true });
  const submit = h("button", { type: "submit", class: "primary", id: "create-submit" }, "Create experiment");
  const basic = FORM_FIELDS.filter((f) => !f.advanced);
  const advanced = FORM_FIELDS.filter((f) => f.advanced);
  const form = h(
    "form",
    { id: "create-form", class: "create-form", novalidate: true, "aria-describedby": "create-intro" },
    summary,
    h("div", { class: "form-grid" }, basic.map(formField)),
    h("details", { class: "advanced" }, h("summary", {}, "Sampling and training options"), h("div", { class: "form-grid" }, advanced.map(formField))),
    h("datalist", { id: "datasets-list" }, ["arith-train", "arith-val", "arith-test"].map((d) => h("option", { value: d }))),
    h("div", { class: "form-actions" }, submit, h("a", { href: "#/", class: "button" }, "Back to the list")),
  );
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "New experiment")),
    h("p", { class: "muted", id: "create-intro" }, "Fields marked * are required. The scheduler validates the experiment; its errors appear next to the fields. Creating needs an API token if the scheduler asks for one."),
    form,
  );

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearFieldErrors(form);
    summary.hidden = true;
    fill(summary);
    const body = {};
    for (const f of FORM_FIELDS) {
      const raw = form.elements[f.name].value.trim();
      if (raw === "") continue;
      if (f.type === "int") body[f.name] = /^[+-]?\d+$/.test(raw) ? Number(raw) : raw;
      else if (f.type === "float") body[f.name] = raw !== "" && Number.isFinite(Number(raw)) ? Number(raw) : raw;
      else body[f.name] = raw;
    }
    submit.disabled = true;
    form.setAttribute("aria-busy", "true");
    try {
      const exp = await page.api("/api/v1/experiments", { method: "POST", body });
      showBanner("info", `Created experiment #${exp.id} “${exp.name}”.`);
      location.hash = `#/experiments/${exp.id}`;
    } catch (err) {
      if (err.name === "AbortError") return;
      const problems = [];
      if (err.status === 422 && Array.isArray(err.detail)) {
        for (const d of err.detail) {
          const loc = (d.loc || []).filter((p) => p !== "body");
          const field = loc.length ? String(loc[0]) : "";
          const message = cleanMessage(d.msg);
          const placed = field && showFieldError(form, field, message);
          problems.push({ field, message, placed });
        }
      } else {
        problems.push({ field: "", message: err.message, placed: false });
      }
      fill(summary, 
        h("h2", {}, err.status === 422 ? `The scheduler rejected ${problems.length === 1 ? "1 field" : `${problems.length} fields`}` : "The experiment was not created"),
        h(
          "ul",
          {},
          problems.map((p) =>
            h(
              "li",
              {},
              p.placed
                ? h("a", { href: `#/new`, "data-target": `field-${p.field}`, onclick: (e) => { e.preventDefault(); $(`#field-${p.field}`).focus(); } }, `${p.field}: ${p.message}`)
                : `${p.field ? `${p.field}: ` : ""}${p.message}`,
            ),
          ),
        ),
      );
      summary.hidden = false;
      summary.focus();
    } finally {
      submit.disabled = false;
      form.removeAttribute("aria-busy");
    }
  });
  main.dataset.loaded = "true";
}

// ---- start -----------------------------------------------------------------------------------

function start() {
  initToken();
  $(".skip-link").addEventListener("click", (ev) => {
    ev.preventDefault();
    $("#main").focus();
  });
  window.addEventListener("hashchange", () => {
    if (location.hash.startsWith("#/") || location.hash === "" || location.hash === "#") route();
  });
  route();
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
