// Charts as inline SVG: line charts and histograms (no third-party code).

import { h, s } from "./dom.js";
import { fmtNum } from "./format.js";

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
export function lineChart(opts) {
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
export function histogram(opts) {
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
