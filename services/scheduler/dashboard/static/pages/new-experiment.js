// The new-experiment form (#/new). Its fields come from the API's schema of POST /api/v1/experiments
// (ExperimentSpec in /openapi.json): kinds, defaults, bounds, choices and help; LAYOUT only names
// and arranges them. The scheduler validates; its 422 errors appear next to the fields.

import { showBanner } from "../lib/banner.js";
import { $, fill, h } from "../lib/dom.js";
import { fieldValue, openapiDocument, requestBodySchema, schemaFields } from "../lib/schema-form.js";

// Labels and arrangement only; everything else is the API's. A property missing here still gets an
// input (labelled with its schema title, under "Sampling and training options").
const LAYOUT = {
  name: { label: "Name", basic: true },
  model: { label: "Model directory", placeholder: "/path/to/model" },
  train_dataset: { label: "Train dataset", value: "arith-train", list: "datasets-list" },
  val_dataset: { label: "Validation dataset", value: "arith-val", list: "datasets-list" },
  chunk_size: { label: "Chunk size (M)", placeholder: "e.g. 16" },
  k: { label: "k", placeholder: "e.g. 4" },
  mode: { label: "Selection mode", basic: true },
  num_selections: { label: "Rounds", placeholder: "e.g. 2" },
  train_batch_size: { label: "Train batch size", help: "Problems per GRPO step; at most M/k.", placeholder: "e.g. 4" },
  iters_per_select: { label: "GRPO steps per round", help: "(k × batch × steps) must be a multiple of M.", placeholder: "e.g. 1" },
  n_samples_train: { label: "Responses per candidate" },
  n_samples_val: { label: "Responses per validation problem" },
  max_tokens: { label: "Max tokens" },
  top_p: { label: "Top-p" },
  clip_eps: { label: "Clip ε" },
  kl_coef: { label: "KL coefficient" },
  max_grad_norm: { label: "Max gradient norm" },
  micro_batch_size: { label: "Micro-batch size" },
  reuse_rollouts: { label: "Reuse scoring rollouts" },
  keep_last_checkpoints: { label: "Keep last checkpoints" },
  keep_best_checkpoints: { label: "Keep best checkpoints" },
};

function formField(f) {
  const inputId = `field-${f.name}`;
  const helpId = f.help ? `help-${f.name}` : null;
  let control;
  if (f.kind === "select") {
    control = h("select", { id: inputId, name: f.name }, f.options.map((o) => h("option", { value: o, selected: o === f.value }, o)));
  } else if (f.kind === "bool") {
    control = h("input", { id: inputId, name: f.name, type: "checkbox", checked: f.value === "true" });
  } else {
    control = h("input", {
      id: inputId,
      name: f.name,
      type: "text",
      inputmode: f.kind === "int" ? "numeric" : f.kind === "float" ? "decimal" : null,
      value: f.value,
      placeholder: f.placeholder,
      list: f.list,
      autocomplete: "off",
      spellcheck: "false",
    });
  }
  if (helpId) {
    control.setAttribute("aria-describedby", helpId);
    control.dataset.help = helpId;
  }
  if (f.required) control.setAttribute("aria-required", "true");
  return h(
    "div",
    { class: "field", "data-field": f.name },
    h("label", { for: inputId }, f.label, f.required ? h("span", { class: "req", "aria-hidden": "true" }, " *") : null),
    control,
    helpId ? h("p", { class: "help", id: helpId }, f.help) : null,
  );
}

function clearFieldErrors(form) {
  for (const el of form.querySelectorAll(".field-error")) el.remove();
  for (const el of form.querySelectorAll("[aria-invalid]")) {
    el.removeAttribute("aria-invalid");
    if (el.dataset.help) el.setAttribute("aria-describedby", el.dataset.help);
    else el.removeAttribute("aria-describedby");
  }
  for (const el of form.querySelectorAll(".field.has-error")) el.classList.remove("has-error");
}

function showFieldError(form, field, message) {
  const wrapper = form.querySelector(`.field[data-field="${CSS.escape(field)}"]`);
  if (!wrapper) return false;
  const control = wrapper.querySelector("input, select");
  const errId = `error-${field}`;
  let err = wrapper.querySelector(".field-error");
  if (err) err.textContent += `; ${message}`;
  else {
    err = h("p", { class: "field-error", id: errId, "data-field": field }, message);
    control.insertAdjacentElement("afterend", err);
  }
  wrapper.classList.add("has-error");
  control.setAttribute("aria-invalid", "true");
  control.setAttribute("aria-describedby", [errId, control.dataset.help].filter(Boolean).join(" "));
  const details = wrapper.closest("details");
  if (details) details.open = true;
  return true;
}

function cleanMessage(msg) {
  return String(msg || "invalid").replace(/^Value error, /, "");
}

export const CREATE_PATH = "/api/v1/experiments";

export async function renderCreate(page, main) {
  main.dataset.page = "create";
  document.title = "New experiment · GradAlign";
  const doc = await openapiDocument(page);
  const fields = schemaFields(doc, requestBodySchema(doc, "post", CREATE_PATH), LAYOUT);
  const summary = h("div", { id: "form-errors", class: "error-summary", tabindex: "-1", hidden: true });
  const submit = h("button", { type: "submit", class: "primary", id: "create-submit" }, "Create experiment");
  const basic = fields.filter((f) => !f.advanced);
  const advanced = fields.filter((f) => f.advanced);
  const form = h(
    "form",
    { id: "create-form", class: "create-form", novalidate: true, "aria-describedby": "create-intro" },
    summary,
    h("div", { class: "form-grid" }, basic.map(formField)),
    h("details", { class: "advanced" }, h("summary", {}, "Sampling and training options"), h("div", { class: "form-grid" }, advanced.map(formField))),
    h("datalist", { id: "datasets-list" }, ["arith-train", "arith-val", "arith-test"].map((d) => h("option", { value: d }))),
    h("div", { class: "form-actions" }, submit, h("a", { href: "#/", class: "button" }, "Back to the list")),
  );
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "New experiment")),
    h("p", { class: "muted", id: "create-intro" }, "Fields marked * are required. The scheduler validates the experiment; its errors appear next to the fields. Creating needs an API token if the scheduler asks for one."),
    form,
  );

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearFieldErrors(form);
    summary.hidden = true;
    fill(summary);
    const body = {};
    for (const f of fields) {
      const value = fieldValue(f, form.elements[f.name]);
      if (value !== undefined) body[f.name] = value;
    }
    submit.disabled = true;
    form.setAttribute("aria-busy", "true");
    try {
      const exp = await page.api(CREATE_PATH, { method: "POST", body });
      showBanner("info", `Created experiment #${exp.id} “${exp.name}”.`);
      location.hash = `#/experiments/${exp.id}`;
    } catch (err) {
      if (err.name === "AbortError") return;
      const problems = [];
      if (err.status === 422 && Array.isArray(err.detail)) {
        for (const d of err.detail) {
          const loc = (d.loc || []).filter((p) => p !== "body");
          const field = loc.length ? String(loc[0]) : "";
          const message = cleanMessage(d.msg);
          const placed = field && showFieldError(form, field, message);
          problems.push({ field, message, placed });
        }
      } else {
        problems.push({ field: "", message: err.message, placed: false });
      }
      fill(summary, 
        h("h2", {}, err.status === 422 ? `The scheduler rejected ${problems.length === 1 ? "1 field" : `${problems.length} fields`}` : "The experiment was not created"),
        h(
          "ul",
          {},
          problems.map((p) =>
            h(
              "li",
              {},
              p.placed
                ? h("a", { href: `#/new`, "data-target": `field-${p.field}`, onclick: (e) => { e.preventDefault(); $(`#field-${p.field}`).focus(); } }, `${p.field}: ${p.message}`)
                : `${p.field ? `${p.field}: ` : ""}${p.message}`,
            ),
          ),
        ),
      );
      summary.hidden = false;
      summary.focus();
    } finally {
      submit.disabled = false;
      form.removeAttribute("aria-busy");
    }
  });
  main.dataset.loaded = "true";
}
