// Routing by the URL's #fragment (or /ui/ path) and the lifecycle of a page: its requests, timers
// and event streams end when the next page is shown.

import { api } from "./api.js";
import { errorBox } from "./banner.js";
import { $, fill, h } from "./dom.js";
import { followEvents } from "./events.js";

export class Page {
  constructor() {
    this.controller = new AbortController();
    this.cleanups = [];
    this.disposed = false;
  }
  get signal() {
    return this.controller.signal;
  }
  api(path, options = {}) {
    return api(path, { signal: this.signal, ...options });
  }
  onDispose(fn) {
    this.cleanups.push(fn);
  }
  every(ms, fn) {
    const id = setInterval(fn, ms);
    this.onDispose(() => clearInterval(id));
  }
  events(query, onEvent, onState) {
    const controller = new AbortController();
    const stop = () => controller.abort();
    this.onDispose(stop);
    followEvents(query, controller.signal, onEvent, onState);
    return { close: stop };
  }
  dispose() {
    this.disposed = true;
    this.controller.abort();
    for (const fn of this.cleanups.splice(0)) {
      try {
        fn();
      } catch {
        /* ignore */
      }
    }
  }
}

function currentRoute() {
  let raw = "/";
  if (location.hash.startsWith("#/")) raw = location.hash.slice(1);
  else if (location.pathname.startsWith("/ui/")) raw = location.pathname.slice(3) + location.search;
  const q = raw.indexOf("?");
  return { path: q >= 0 ? raw.slice(0, q) : raw, params: new URLSearchParams(q >= 0 ? raw.slice(q + 1) : "") };
}

export function setRouteParams(path, params) {
  const query = params.toString();
  history.replaceState(null, "", `#${path}${query ? `?${query}` : ""}`);
}

let currentPage = null;
let firstRender = true;

// Shows the page of the current URL; routes: [[pattern, render(page, main, args, params), nav]].
export async function route(routes) {
  if (currentPage) currentPage.dispose();
  const page = (currentPage = new Page());
  const { path, params } = currentRoute();
  const main = $("#main");
  fill(main);
  main.removeAttribute("data-page");
  main.removeAttribute("data-loaded");
  for (const [re, render, nav] of routes) {
    const m = path.match(re);
    if (!m) continue;
    for (const a of document.querySelectorAll("[data-nav]")) {
      if (a.dataset.nav === nav) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    try {
      await render(page, main, m.slice(1).map((x) => (x === undefined ? x : decodeURIComponent(x))), params);
    } catch (err) {
      if (err.name === "AbortError" || page.disposed) return;
      main.append(errorBox(err));
    }
    if (!firstRender && !page.disposed) {
      const heading = $("h1", main);
      if (heading) {
        heading.setAttribute("tabindex", "-1");
        heading.focus({ preventScroll: false });
      }
    }
    firstRender = false;
    return;
  }
  main.append(h("h1", {}, "Page not found"), h("p", {}, "No dashboard page at ", h("code", {}, path), ". ", h("a", { href: "#/" }, "Back to experiments")));
}
