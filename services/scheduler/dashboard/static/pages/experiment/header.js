// The experiment page's head: breadcrumb, title and status, the Refresh/Cancel/Resume buttons, the
// facts line, the live panel (the running stage and its progress) and the configuration.

import { $, fill, h } from "../../lib/dom.js";
import { TERMINAL, badge, basename, fmtDuration, fmtNum, pluralUnit, stageDuration, stageLabel, timeCell } from "../../lib/format.js";

const SHOWN_CONFIG = new Set([
  "mode", "model", "train_dataset", "val_dataset", "chunk_size", "k", "num_selections", "train_batch_size", "iters_per_select",
  "n_samples_train", "n_samples_val", "max_tokens", "temperature", "top_p", "learning_rate", "seed",
]);

function configList(cfg) {
  // the main settings, a theme a line: model and data, selection rounds, GRPO training, sampling, the rest
  const rows = [
    ["Mode", cfg.mode], ["Model", cfg.model], ["Train dataset", cfg.train_dataset], ["Validation dataset", cfg.val_dataset],
    ["Chunk size M", cfg.chunk_size], ["k (keep M/k)", cfg.k], ["Rounds", cfg.num_selections],
    ["Train batch size", cfg.train_batch_size], ["GRPO steps per round", cfg.iters_per_select],
    ["Responses per candidate", cfg.n_samples_train], ["Responses per val. problem", cfg.n_samples_val], ["Max tokens", cfg.max_tokens],
    ["Temperature / top-p", `${fmtNum(cfg.temperature)} / ${fmtNum(cfg.top_p)}`], ["Learning rate", fmtNum(cfg.learning_rate)], ["Seed", cfg.seed],
  ];
  // the rest of the stored spec (weight decay, checkpoints kept, priority, scoring, ...) by its own name
  for (const [key, value] of Object.entries(cfg)) {
    if (SHOWN_CONFIG.has(key)) continue;
    rows.push([key.replace(/_/g, " "), value !== null && typeof value === "object" ? JSON.stringify(value) : typeof value === "number" ? fmtNum(value) : value]);
  }
  return h(
    "dl",
    { class: "config" },
    rows.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", { title: v === undefined ? "" : String(v) }, v === undefined || v === null ? "—" : String(v)))),
  );
}

// actions: { refresh(all), act(verb) } of the page.
export function headerPart(id, st, { refresh, act }) {
  const title = h("h1", { id: "exp-title" }, `Experiment #${id}`);
  const actions = h("div", { class: "actions" });
  const headInfo = h("div", { class: "exp-info" });
  const live = h("section", { id: "live", class: "live card", "aria-labelledby": "live-h" });
  const config = h("details", { class: "card config-card" });
  const nodes = [
    h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "#/" }, "Experiments"), " / ", h("span", { id: "crumb-name" }, `#${id}`)),
    h("div", { class: "page-head" }, title, actions),
    headInfo,
    live,
    config,
  ];

  const renderHead = () => {
    const e = st.exp;
    document.title = `${e.name} · GradAlign`;
    fill(title, e.name, " ", badge(e.status));
    title.dataset.status = e.status;
    $("#crumb-name").textContent = `${e.name} (#${e.id})`;
    const canCancel = !TERMINAL.includes(e.status);
    const canResume = e.status === "failed" || e.status === "cancelled";
    fill(actions, 
      h("button", { type: "button", id: "action-refresh", onclick: () => refresh(true) }, "Refresh"),
      h("button", { type: "button", id: "action-cancel", class: "danger", disabled: !canCancel, onclick: () => act("cancel") }, "Cancel"),
      h("button", { type: "button", id: "action-resume", disabled: !canResume, onclick: () => act("resume") }, "Resume"),
    );
    const c = e.config || {};
    fill(headInfo, 
      h(
        "p",
        { class: "meta" },
        h("span", {}, `#${e.id}`),
        h("span", {}, `mode ${c.mode}`),
        h("span", { title: c.model }, `model ${basename(c.model)}`),
        h("span", {}, `data ${basename(c.train_dataset)} / ${basename(c.val_dataset)}`),
        h("span", {}, "created ", timeCell(e.created_at)),
        h("span", {}, "started ", timeCell(e.started_at)),
        h("span", {}, "updated ", timeCell(e.updated_at)),
        e.finished_at ? h("span", {}, "finished ", timeCell(e.finished_at)) : null,
      ),
      e.status_detail ? h("p", { class: "notice", id: "status-detail" }, e.status_detail) : null,
      e.error ? h("p", { class: "error-box", id: "exp-error" }, h("strong", {}, "Error: "), e.error) : null,
    );
    fill(config, h("summary", {}, "Configuration"), configList(c));
  };

  const runningStage = () => {
    const rnd = st.rounds.find((r) => r.index === st.exp.current_round);
    const stage = rnd && rnd.stages.find((x) => x.status === "running");
    return rnd && stage ? { round: rnd.index, stage } : null;
  };

  const renderLive = () => {
    const e = st.exp;
    const running = runningStage();
    const connText = { live: "live", reconnecting: "reconnecting…", closed: "disconnected", connecting: "connecting…" }[st.conn];
    const body = [];
    if (running) {
      const { stage } = running;
      const done = stage.progress_done || 0;
      const total = stage.progress_total || 0;
      body.push(
        h(
          "p",
          { class: "live-stage", id: "live-stage", "data-round": running.round, "data-stage": stage.name },
          h("strong", {}, `Round ${running.round} · ${stageLabel(stage.name)}`),
          stage.attempts > 1 ? ` (attempt ${stage.attempts})` : "",
          " — ",
          h("span", { id: "live-progress-text" }, total ? `${done} / ${total} ${pluralUnit(stage.progress_unit)}` : "started"),
          " · running for ",
          h("span", { class: "since", "data-since": stage.started_at || "" }, fmtDuration(stageDuration(stage, Date.now()))),
        ),
        h("progress", { id: "live-progress", max: total || 1, value: total ? done : 0, "aria-labelledby": "live-stage" }),
      );
    } else if (e.status === "running" || e.status === "pending") {
      body.push(h("p", { id: "live-stage" }, e.status === "pending" ? "Waiting for the scheduler to start this experiment." : `Round ${e.current_round}: between stages.`));
    } else {
      body.push(h("p", { id: "live-stage" }, `This experiment is ${e.status}.`));
    }
    fill(live, 
      h("h2", { id: "live-h", class: "visually-hidden" }, "Live progress"),
      h("div", { class: "live-head" }, h("span", {}, "Now"), h("span", { class: "conn", id: "conn", "data-state": st.conn }, `events: ${connText}`)),
      h("div", { "aria-live": "polite" }, body),
    );
  };

  return { nodes, renderHead, renderLive };
}
