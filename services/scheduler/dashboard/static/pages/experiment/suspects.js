// The experiment page's suspect rewards: problems whose gradient pointed against the validation gradient
// in several rounds (suspect) or in one (watch), with each round's evidence, sortable, linking to the
// problem's page, and their dataset records for download (GET /api/v1/experiments/ID/suspects[.jsonl|.parquet]).

import { download } from "../../lib/api.js";
import { showBanner } from "../../lib/banner.js";
import { fill, h, options } from "../../lib/dom.js";
import { fmtNum } from "../../lib/format.js";
import { compareValues, dataTable, sortHeaders } from "../../lib/table.js";

const COLUMNS = [
  ["problem", "Problem"],
  ["status", "Status"],
  ["flags", "Rounds flagged"],
  ["alignment", "Worst cosine"], // "Worst dot product" in mode dot
  ["accuracy", "Mean accuracy"],
  ["evidence", "Evidence per round"],
];
// the first click on a column sorts in its natural direction: most flagged, lowest cosine, lowest accuracy
const FIRST_DIR = { problem: 1, status: 1, flags: -1, alignment: 1, accuracy: 1 };
const STATUS_RANK = { suspect: 0, watch: 1 };

function sortValue(item, key) {
  if (key === "problem") return item.problem_id;
  if (key === "status") return STATUS_RANK[item.status];
  if (key === "flags") return item.rounds_flagged.length;
  if (key === "alignment") return item.worst_alignment;
  return item.mean_accuracy;
}

function problemHref(id, round, pid) {
  return `#/experiments/${id}/rounds/${round}/problems/${encodeURIComponent(pid)}`;
}

export function suspectsPart(id, st) {
  const f = { status: "", sort: "flags", dir: -1 };
  const summary = h("p", { id: "suspects-summary", class: "muted", "aria-live": "polite" });
  const statusFilter = h("select", { id: "suspects-status" }, options([["", "Suspect and watch"], ["suspect", "Suspect only"], ["watch", "Watch only"]]));
  const exportPath = (fmt) => `/api/v1/experiments/${id}/suspects.${fmt}${f.status ? `?status=${f.status}` : ""}`;
  const exportLink = (fmt) =>
    h(
      "a",
      {
        id: `suspects-export-${fmt}`,
        class: "button",
        href: exportPath(fmt),
        onclick: async (ev) => {
          ev.preventDefault(); // fetched with the saved token, then saved
          try {
            await download(exportPath(fmt), `experiment-${id}-suspects.${fmt}`);
          } catch (err) {
            if (err.name !== "AbortError" && err.status !== 401 && err.status !== 403) showBanner("error", err.message);
          }
        },
      },
      `Download ${fmt === "jsonl" ? "JSONL" : "Parquet"}`,
    );
  const exports = h("div", { class: "actions", id: "suspects-exports" }, exportLink("jsonl"), exportLink("parquet"));
  const table = h("div", { id: "suspects", class: "table-wrap" });
  const node = h(
    "section",
    { "aria-labelledby": "suspects-h", id: "suspects-panel" },
    h("h2", { id: "suspects-h" }, "Suspect rewards"),
    summary,
    h(
      "form",
      { class: "filters suspects-controls", "aria-label": "Filter the suspect rewards", onsubmit: (ev) => ev.preventDefault() },
      h("div", { class: "field-inline" }, h("label", { for: "suspects-status" }, "Show"), statusFilter),
      exports,
    ),
    table,
  );

  const render = () => {
    const data = st.suspects;
    if (!data) {
      summary.textContent = "Loading…";
      return;
    }
    node.dataset.available = String(data.available);
    if (!data.available) {
      summary.textContent = `No suspect-reward flags for this experiment: ${data.reason}`;
      fill(table); // the controls are hidden by the stylesheet (data-available="false")
      return;
    }
    for (const fmt of ["jsonl", "parquet"]) node.querySelector(`#suspects-export-${fmt}`).setAttribute("href", exportPath(fmt));
    const rounds = data.rounds_used.length;
    summary.textContent =
      `${data.counts.suspect} suspect (flagged in ≥ ${data.min_rounds} rounds), ${data.counts.watch} watch (flagged in fewer) ` +
      `over ${rounds} scored round${rounds === 1 ? "" : "s"}; rule ${data.rule}, threshold ${fmtNum(data.threshold, 2)}. ` +
      "A flag: the candidate's gradient pointed against the validation gradient although its group had non-zero advantage" +
      " — its reward or reference answer may be wrong." +
      (data.total > data.items.length ? ` Showing ${data.items.length} of ${data.total}.` : "") +
      (data.rounds_skipped.length ? ` Rounds ${data.rounds_skipped.join(", ")} fell back to random scores and are left out.` : "");
    const rows = data.items.filter((x) => !f.status || x.status === f.status);
    // missing values last either way; ties by problem
    rows.sort((a, b) => compareValues(sortValue(a, f.sort), sortValue(b, f.sort), f.dir) || a.problem_id.localeCompare(b.problem_id, undefined, { numeric: true }));
    const measure = data.mode === "dot" ? "dot" : "cos";
    const columns = COLUMNS.map(([key, name]) => [key, key === "alignment" && measure === "dot" ? "Worst dot product" : name]);
    const head = sortHeaders(columns, f, { firstDir: (key) => FIRST_DIR[key], render, root: node });
    const evidence = (item) => // every round that scored the problem, each linking to its responses
      h(
        "ul",
        { class: "evidence" },
        item.evidence.map((e) =>
          h(
            "li",
            { class: e.flagged ? "flagged" : null, "data-round": e.round },
            h(
              "a",
              { href: problemHref(id, e.round, item.problem_id), title: e.flagged ? "flagged in this round" : "not flagged in this round" },
              `round ${e.round}: ${measure} ${fmtNum(e.alignment, 3)}, acc ${fmtNum(e.accuracy, 2)}${e.flagged ? " ⚑" : ""}`,
            ),
          ),
        ),
      );
    fill(
      table,
      dataTable({
        id: "suspects-table",
        caption: "Problems flagged as suspect rewards, with the evidence of each round",
        columns: head,
        rows: rows.map((x) =>
          h(
            "tr",
            { "data-problem": x.problem_id, "data-status": x.status },
            h("td", {}, h("a", { href: problemHref(id, x.rounds_flagged[x.rounds_flagged.length - 1], x.problem_id) }, x.problem_id)),
            h("td", {}, h("span", { class: ["badge", x.status === "suspect" ? "status-failed" : "status-pending"] }, x.status)),
            h("td", { class: "num" }, `${x.rounds_flagged.length} of ${x.rounds_seen}`),
            h("td", { class: "num" }, fmtNum(x.worst_alignment, 3)),
            h("td", { class: "num" }, fmtNum(x.mean_accuracy, 3)),
            h("td", {}, evidence(x)),
          ),
        ),
        empty: "No problem has been flagged.",
      }),
    );
  };
  statusFilter.addEventListener("change", () => {
    f.status = statusFilter.value;
    render();
  });
  return { node, render };
}
