// The banner under the top bar (errors, confirmations) and the inline error box.

import { $, fill, h } from "./dom.js";

export function showBanner(kind, message, ...extra) {
  const banner = $("#banner");
  banner.className = `banner banner-${kind}`;
  banner.setAttribute("role", kind === "error" ? "alert" : "status");
  banner.setAttribute("data-kind", kind);
  fill(banner, 
    h("p", { class: "banner-text" }, message),
    ...extra,
    h("button", { type: "button", class: "banner-close", "aria-label": "Dismiss message", onclick: hideBanner }, "Dismiss"),
  );
  banner.hidden = false;
}

export function hideBanner() {
  const banner = $("#banner");
  banner.hidden = true;
  fill(banner);
}

export function showAuthError(err) {
  showBanner(
    "error",
    err.message,
    h("button", { type: "button", class: "banner-action", onclick: () => $("#token-input").focus() }, "Enter a token"),
  );
  $("#banner").setAttribute("data-status-code", String(err.status));
}

export function errorBox(err) {
  return h("div", { class: "error-box", role: "alert" }, h("strong", {}, "Error: "), err && err.message ? err.message : String(err));
}
