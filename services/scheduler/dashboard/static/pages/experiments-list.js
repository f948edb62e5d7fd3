// The list of experiments (#/): filters, paging, live stage progress and the last validation reward.

import { mapLimit } from "../lib/api.js";
import { showBanner } from "../lib/banner.js";
import { fill, h } from "../lib/dom.js";
import { PAGE_SIZE, STATUSES, badge, basename, fmtNum, pluralUnit, stageLabel, timeCell } from "../lib/format.js";
import { setRouteParams } from "../lib/router.js";
import { dataTable } from "../lib/table.js";

const COLUMNS = ["Compare", "ID", "Name", "Mode", "Model", "Datasets", "Status", "Round", "Stage", "Last val. reward", "Started", "Updated"];

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

export async function renderList(page, main, _args, params) {
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
  const table = dataTable({ id: "experiments-table", caption: "Experiments, newest first", columns: COLUMNS });
  const tbody = table.tBodies[0];
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
    h("div", { class: "table-wrap" }, table),
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
      tbody.append(h("tr", { class: "empty-row" }, h("td", { colspan: COLUMNS.length }, state.items.length ? "No experiment on this page matches the search." : "No experiments yet. Create one with “New experiment”.")));
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
