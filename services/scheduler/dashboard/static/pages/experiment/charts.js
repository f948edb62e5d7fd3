// The experiment page's charts: validation reward and candidate accuracy per round, training metrics
// per GRPO step, and the histograms of scores and accuracies (candidates vs selected) of one round.

import { histogram, lineChart } from "../../lib/charts.js";
import { fill, h } from "../../lib/dom.js";
import { fmtNum } from "../../lib/format.js";

const TRAIN_METRICS = ["loss", "mean_reward", "kl", "grad_norm", "entropy", "response_length", "tokens_per_second", "clip_fraction"];

export function roundChartsPart(st) {
  const roundCharts = h("div", { id: "round-charts", class: "chart-grid two" });
  const node = h("section", { "aria-labelledby": "curves-h" }, h("h2", { id: "curves-h" }, "Validation reward and candidate accuracy per round"), roundCharts);

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

  return { node, render: renderRoundCharts };
}

export function trainChartsPart(st) {
  const trainCharts = h("div", { id: "train-charts", class: "chart-grid four" });
  const node = h("section", { "aria-labelledby": "train-h" }, h("h2", { id: "train-h" }, "Training metrics per GRPO step"), trainCharts);

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

  return { node, render: renderTrainCharts };
}

export function distributionsPart(st) {
  const histRoundSelect = h("select", { id: "hist-round" });
  const histCharts = h("div", { id: "hist-charts", class: "chart-grid two" });
  const node = h(
    "section",
    { "aria-labelledby": "dist-h" },
    h("div", { class: "section-head" }, h("h2", { id: "dist-h" }, "Scores and accuracies: candidates vs selected"), h("div", { class: "field-inline" }, h("label", { for: "hist-round" }, "Round"), histRoundSelect)),
    histCharts,
  );

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

  return { node, render: renderHistograms };
}
