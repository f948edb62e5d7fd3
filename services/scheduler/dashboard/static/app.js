// GradAlign dashboard: a single page over the scheduler's REST API and server-sent events.
// Native ES modules served as they are (no build step, no third-party code): lib/ holds the API
// client, the event stream, the router, charts (inline SVG) and helpers; pages/ one module per page.
// This is the entry module: the token box, the routes, and the start.

import { getToken, setToken } from "./lib/api.js";
import { hideBanner } from "./lib/banner.js";
import { $ } from "./lib/dom.js";
import { route } from "./lib/router.js";
import { renderCompare } from "./pages/compare.js";
import { renderExperiment } from "./pages/experiment.js";
import { renderList } from "./pages/experiments-list.js";
import { renderCreate } from "./pages/new-experiment.js";
import { renderProblem } from "./pages/problem.js";

const ROUTES = [
  [/^\/(experiments\/?)?$/, renderList, "list"],
  [/^\/experiments\/(\d+)\/?$/, renderExperiment, "list"],
  [/^\/experiments\/(\d+)\/rounds\/(\d+)\/problems\/(.+)$/, renderProblem, "list"],
  [/^\/compare\/?$/, renderCompare, "compare"],
  [/^\/new\/?$/, renderCreate, "new"],
];

// ---- the token box ------------------------------------------------------------------------------

function initToken() {
  const form = $("#token-form");
  const input = $("#token-input");
  const state = $("#token-state");
  const show = () => {
    state.textContent = getToken() ? "token saved" : "no token";
    state.dataset.hasToken = getToken() ? "true" : "false";
  };
  input.value = getToken();
  show();
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    setToken(input.value.trim());
    show();
    hideBanner();
  });
  $("#token-clear").addEventListener("click", () => {
    input.value = "";
    setToken("");
    show();
  });
}

// ---- start -----------------------------------------------------------------------------------

function start() {
  initToken();
  $(".skip-link").addEventListener("click", (ev) => {
    ev.preventDefault();
    $("#main").focus();
  });
  window.addEventListener("hashchange", () => {
    if (location.hash.startsWith("#/") || location.hash === "" || location.hash === "#") route(ROUTES);
  });
  route(ROUTES);
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
