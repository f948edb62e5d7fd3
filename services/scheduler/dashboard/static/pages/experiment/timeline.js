// The experiment page's rounds table: each stage's state, duration, attempts, queueing and progress; with
// skip_dead on, the dead problems each round skipped before rollout and the rollouts that saved.

import { fill, h } from "../../lib/dom.js";
import { STAGES, badge, fmtDuration, fmtNum, fmtTime, parseTime, pluralUnit, stageDuration, stageLabel } from "../../lib/format.js";
import { dataTable } from "../../lib/table.js";

export function timelinePart(st) {
  const timeline = h("div", { id: "timeline", class: "table-wrap" });
  const skipSummary = h("p", { id: "skip-summary", class: "muted", hidden: true });
  const node = h("section", { "aria-labelledby": "timeline-h" }, h("h2", { id: "timeline-h" }, "Rounds"), skipSummary, timeline);

  const renderTimeline = () => {
    const now = Date.now();
    const showSkips = renderSkipSummary(skipSummary, st);
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
        showSkips ? skipCell(r) : null,
      );
    });
    const skipHead = h("th", { scope: "col", title: "dead problems skipped before rollout, and the responses that saved" }, "Skipped");
    fill(
      timeline,
      dataTable({
        id: "timeline-table",
        cls: "timeline",
        caption: "Rounds and the state and duration of each stage",
        columns: ["Round", ...STAGES.map(stageLabel), "Val. reward", "Cand. accuracy", "Wall time", "Overhead", ...(showSkips ? [skipHead] : [])],
        rows,
      }),
    );
  };

  return { node, render: renderTimeline };
}

// the round's skipped candidates and the rollouts (responses) that saved; "—" before the chunk was drawn
function skipCell(r) {
  if (r.skipped_candidates === null || r.skipped_candidates === undefined) return h("td", { class: "num skip-cell" }, "—");
  const tip = r.tokens_saved ? `about ${Math.round(r.tokens_saved)} generated tokens saved` : null;
  return h(
    "td",
    { class: "num skip-cell", "data-skipped": r.skipped_candidates, "data-rollouts-saved": r.rollouts_saved, title: tip },
    String(r.skipped_candidates),
    h("br"),
    h("span", { class: "muted" }, `${r.rollouts_saved ?? 0} rollouts`),
  );
}

// whether the experiment skips dead problems (or some round did); the summary line over all rounds
function renderSkipSummary(node, st) {
  const on = Boolean(st.exp && st.exp.config && st.exp.config.skip_dead);
  const counted = st.rounds.filter((r) => typeof r.skipped_candidates === "number");
  const show = on || counted.some((r) => r.skipped_candidates > 0);
  node.hidden = !show;
  if (!show) return false;
  const sum = (key) => counted.reduce((a, r) => a + (r[key] || 0), 0);
  const cfg = (st.exp && st.exp.config) || {};
  const rule = on ? ` (skip probability min(${cfg.skip_dead_cap}, 1 − (1 − ${cfg.skip_dead_base})^streak))` : "";
  node.textContent =
    `Skipping dead problems${rule}: ${sum("skipped_candidates")} candidates skipped, ${sum("rollouts_saved")} rollouts saved ` +
    `(about ${Math.round(sum("tokens_saved"))} generated tokens) over ${counted.length} ${counted.length === 1 ? "round" : "rounds"}.`;
  node.dataset.skipped = String(sum("skipped_candidates"));
  node.dataset.rolloutsSaved = String(sum("rollouts_saved"));
  return true;
}
