// The scheduler's REST API: fetch() with the saved bearer token, errors as ApiError.

import { showAuthError } from "./banner.js";

const TOKEN_KEY = "gradalign.token";

export function getToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

const TOKEN_CHANGED = "gradalign:token-changed";

export function setToken(token) {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    /* storage disabled: the token lives only until reload */
  }
  window.dispatchEvent(new Event(TOKEN_CHANGED));
}

// Resolves when `arm(done)` calls done, or when the signal aborts, whichever comes first; arm
// returns the function that disarms it, called either way.
export function untilAbortOr(signal, arm) {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    let disarm = () => {};
    const done = () => {
      disarm();
      signal.removeEventListener("abort", done);
      resolve();
    };
    disarm = arm(done);
    signal.addEventListener("abort", done);
  });
}

// Resolves when the saved token changes (the token box) or the signal aborts.
export function tokenChanged(signal) {
  return untilAbortOr(signal, (done) => {
    window.addEventListener(TOKEN_CHANGED, done);
    return () => window.removeEventListener(TOKEN_CHANGED, done);
  });
}

export class ApiError extends Error {
  constructor(status, detail, message) {
    super(message);
    this.status = status;
    this.detail = detail;
  }
}

function detailText(detail) {
  if (detail === null || detail === undefined) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`).join("; ");
  if (typeof detail === "object" && detail.detail !== undefined) return detailText(detail.detail);
  return JSON.stringify(detail);
}

export function describeError(status, detail, method, path) {
  const what = `${method} ${path}`;
  const extra = detailText(detail);
  if (status === 401)
    return `401 Unauthorized: ${what} needs an API token. Paste a valid token into “API token” at the top and try again.${extra ? ` (${extra})` : ""}`;
  if (status === 403)
    return `403 Forbidden: the API token was refused for ${what} (revoked, or not allowed to do this).${extra ? ` (${extra})` : ""}`;
  if (status === 0) return `Cannot reach the scheduler for ${what}: ${extra}`;
  return `${status}: ${what} failed${extra ? `: ${extra}` : ""}`;
}

export async function api(path, { method = "GET", body, signal } = {}) {
  const headers = { Accept: "application/json" };
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, err.message, describeError(0, err.message, method, path));
  }
  const text = resp.status === 204 ? "" : await resp.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (!resp.ok) {
    const detail = data && typeof data === "object" && "detail" in data ? data.detail : data;
    const err = new ApiError(resp.status, detail, describeError(resp.status, detail, method, path));
    if (resp.status === 401 || resp.status === 403) showAuthError(err);
    throw err;
  }
  return data;
}

// Save the file at `path` (an API download) as `filename`: fetched with the saved token, so it works when reads
// need one, then handed to the browser as a download.
export async function download(path, filename) {
  const headers = {};
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  let resp;
  try {
    resp = await fetch(path, { headers });
  } catch (err) {
    throw new ApiError(0, err.message, describeError(0, err.message, "GET", path));
  }
  if (!resp.ok) {
    const text = await resp.text();
    let detail = text;
    try {
      detail = JSON.parse(text).detail;
    } catch {
      /* not JSON: the text itself */
    }
    const err = new ApiError(resp.status, detail, describeError(resp.status, detail, "GET", path));
    if (resp.status === 401 || resp.status === 403) showAuthError(err);
    throw err;
  }
  const url = URL.createObjectURL(await resp.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

export async function mapLimit(items, limit, fn) {
  const results = new Array(items.length);
  let next = 0;
  async function worker() {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i], i);
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}
