// One experiment (#/experiments/ID), live: its parts are under experiment/; this module holds the
// page's state, loads it, follows the event stream and runs the Cancel/Resume actions.

import { mapLimit } from "../lib/api.js";
import { showBanner } from "../lib/banner.js";
import { $ } from "../lib/dom.js";
import { fmtDuration, parseTime } from "../lib/format.js";
import { distributionsPart, roundChartsPart, trainChartsPart } from "./experiment/charts.js";
import { headerPart } from "./experiment/header.js";
import { historyPart } from "./experiment/history.js";
import { suspectsPart } from "./experiment/suspects.js";
import { timelinePart } from "./experiment/timeline.js";

export async function renderExperiment(page, main, [idText]) {
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
    suspects: null, // GET .../suspects: problems flagged as suspect rewards
  };

  // ---- the parts, top to bottom
  const header = headerPart(id, st, { refresh: (all) => refresh(all), act: (verb) => act(verb) });
  const timeline = timelinePart(st);
  const trainCharts = trainChartsPart(st);
  const parts = [timeline, roundChartsPart(st), trainCharts, distributionsPart(st), historyPart(id, st), suspectsPart(id, st)];
  main.append(...header.nodes, ...parts.map((part) => part.node));
  const { renderHead, renderLive } = header;
  const renderTimeline = timeline.render;
  const renderTrainCharts = trainCharts.render;

  const renderAll = () => {
    renderHead();
    renderLive();
    for (const part of parts) part.render();
  };

  // ---- data
  const fetchSuspects = async () => {
    st.suspects = await page.api(`/api/v1/experiments/${id}/suspects?limit=10000`);
  };
  const fetchRoundData = async (rounds) => {
    if (rounds.length || !st.suspects) await fetchSuspects(); // flags change when a round's candidates do
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
