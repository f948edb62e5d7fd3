// The experiment page's selection history: every round's candidates, searchable, sortable, paged,
// each linking to its problem page.

import { fill, h, options } from "../../lib/dom.js";
import { PAGE_SIZE, fmtNum } from "../../lib/format.js";
import { compareValues, dataTable, sortHeaders } from "../../lib/table.js";

const HIST_COLUMNS = [
  ["problem", "Problem"],
  ["round", "Round"],
  ["score", "Score"],
  ["accuracy", "Accuracy"],
  ["zero_advantage", "Zero adv."],
  ["selected", "Selected"],
  ["rank", "Rank"],
];

export function historyPart(id, st) {
  const histSearch = h("input", { id: "history-search", type: "search", placeholder: "problem id", autocomplete: "off" });
  const histRoundFilter = h("select", { id: "history-round" });
  const histSelFilter = h("select", { id: "history-selected" }, options([["", "All candidates"], ["yes", "Selected only"], ["no", "Not selected"]]));
  const histTable = h("div", { id: "history", class: "table-wrap" });
  const histCount = h("p", { class: "muted", id: "history-count", "aria-live": "polite" });
  const histPager = h("div", { class: "pager" });
  const node = h(
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
  );

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
    // missing values go last ascending, first descending; ties by round, rank, then problem
    rows.sort(
      (a, b) =>
        compareValues(val(a, f.sort), val(b, f.sort)) * f.dir ||
        a.round - b.round ||
        (a.rank ?? 1e9) - (b.rank ?? 1e9) ||
        a.problem_id.localeCompare(b.problem_id, undefined, { numeric: true }),
    );
    const total = rows.length;
    if (f.offset >= total) f.offset = Math.max(0, Math.floor((total - 1) / PAGE_SIZE) * PAGE_SIZE);
    const pageRows = rows.slice(f.offset, f.offset + PAGE_SIZE);
    const head = sortHeaders(HIST_COLUMNS, f, {
      firstDir: (key) => (key === "score" || key === "accuracy" || key === "selected" ? -1 : 1),
      render: renderHistory,
      root: histTable,
    });
    fill(
      histTable,
      dataTable({
        id: "history-table",
        caption: "Candidates of every round with score, accuracy and whether they were selected",
        columns: head,
        rows: pageRows.map((c) =>
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
        empty: "No candidates match.",
      }),
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

  return { node, render: renderHistory };
}
