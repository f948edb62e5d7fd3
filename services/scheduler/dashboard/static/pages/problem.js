// One candidate problem of a round (#/experiments/ID/rounds/N/problems/PID): prompt, responses, rewards.

import { h } from "../lib/dom.js";
import { fmtNum } from "../lib/format.js";
import { dataTable } from "../lib/table.js";

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

export async function renderProblem(page, main, [idText, roundText, problemId]) {
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
            dataTable({
              id: "responses-table",
              cls: "responses",
              columns: ["#", "Response", "Reward", "Correct", "Tokens", "Finish"],
              rows: p.responses.map((r, i) =>
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
            }),
          )
        : h("p", { class: "empty" }, "No responses were found in this round's rollout files."),
    ),
  );
  main.dataset.loaded = "true";
}
