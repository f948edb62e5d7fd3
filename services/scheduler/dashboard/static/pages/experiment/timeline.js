// The experiment page's rounds table: each stage's state, duration, attempts, queueing and progress.

import { fill, h } from "../../lib/dom.js";
import { STAGES, badge, fmtDuration, fmtNum, fmtTime, parseTime, pluralUnit, stageDuration, stageLabel } from "../../lib/format.js";

export function timelinePart(st) {
  const timeline = h("div", { id: "timeline", class: "table-wrap" });
  const node = h("section", { "aria-labelledby": "timeline-h" }, h("h2", { id: "timeline-h" }, "Rounds"), timeline);

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

  return { node, render: renderTimeline };
}
