// Several experiments' curves per round overlaid (#/compare?ids=1,2&metric=...).

import { mapLimit } from "../lib/api.js";
import { showBanner } from "../lib/banner.js";
import { lineChart } from "../lib/charts.js";
import { fill, h, options } from "../lib/dom.js";
import { badge, basename, fmtNum } from "../lib/format.js";
import { setRouteParams } from "../lib/router.js";
import { dataTable } from "../lib/table.js";

export async function renderCompare(page, main, _args, params) {
  main.dataset.page = "compare";
  document.title = "Compare · GradAlign";
  const chosen = new Set((params.get("ids") || "").split(",").map(Number).filter((x) => Number.isInteger(x) && x > 0));
  let metric = params.get("metric") === "candidate_accuracy" ? "candidate_accuracy" : "validation_reward";
  const rounds = new Map(); // experiment id -> rounds
  const list = await page.api("/api/v1/experiments?limit=500");
  const byId = new Map(list.items.map((e) => [e.id, e]));
  const chartBox = h("div", { id: "compare-chart" });
  const summary = h("div", { class: "table-wrap", id: "compare-summary" });
  const metricSelect = h("select", { id: "compare-metric" }, options([["validation_reward", "Validation reward"], ["candidate_accuracy", "Candidate accuracy"]], metric));
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
        ? dataTable({
            columns: ["Experiment", "Mode", "Status", "Rounds", `Last ${label.toLowerCase()}`, `Best ${label.toLowerCase()}`],
            rows: ids.map((eid, i) => {
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
          })
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
