// The scheduler's server-sent events (/api/v1/events), read with fetch() so that the saved API
// token goes along (EventSource cannot send an Authorization header).

import { ApiError, describeError, getToken, tokenChanged, untilAbortOr } from "./api.js";
import { showAuthError } from "./banner.js";

const EVENT_TYPES = [
  "stage_started", "stage_finished", "progress", "stage_retry", "round_finished", "experiment_created",
  "experiment_cancelled", "experiment_resumed", "experiment_failed", "experiment_completed", "experiment_deleted", "message",
];

const SSE_RETRY_MIN_MS = 1000;
const SSE_RETRY_MAX_MS = 15000;
const SSE_IDLE_MS = 45000; // the scheduler sends a keep-alive every second: silence this long is a dead connection

// Runs a page's handler; an error in it is reported like any uncaught one but does not drop the stream.
function handled(fn) {
  try {
    fn();
  } catch (err) {
    if (typeof reportError === "function") reportError(err);
    else setTimeout(() => {
      throw err;
    });
  }
}

function sleep(ms, signal) {
  return untilAbortOr(signal, (done) => {
    const id = setTimeout(done, ms);
    return () => clearTimeout(id);
  });
}

// A parser of the text/event-stream format: feed it decoded text in any pieces; it calls
// onMessage(eventName, data) for each complete frame (a blank line ends one; "data:" lines are
// joined with "\n"; lines starting with ":" are comments; "id" and "retry" are ignored).
function sseParser(onMessage) {
  let buffer = "";
  let name = "";
  let data = [];
  const line = (text) => {
    if (text === "") {
      if (data.length) onMessage(name || "message", data.join("\n"));
      name = "";
      data = [];
      return;
    }
    if (text.startsWith(":")) return;
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  };
  return (chunk) => {
    buffer += chunk;
    const eol = /\r\n|\r|\n/g;
    let start = 0;
    let m;
    while ((m = eol.exec(buffer))) {
      if (m[0] === "\r" && m.index === buffer.length - 1) break; // perhaps a "\r\n" split between chunks
      line(buffer.slice(start, m.index));
      start = eol.lastIndex;
    }
    buffer = buffer.slice(start);
  };
}

// One connection to an event stream, sending the saved API token. Resolves (never rejects) when
// it ends: { status } with the HTTP status when the server refused it (and its detail), else
// { status: 0 } (a network error, the stream ended, or it went silent). onOpen runs once it is
// open; deliver(eventName, data) for each message.
async function sseConnect(path, signal, deliver, onOpen) {
  const controller = new AbortController();
  const abort = () => controller.abort();
  signal.addEventListener("abort", abort);
  let idle = null;
  const watch = () => {
    clearTimeout(idle);
    idle = setTimeout(abort, SSE_IDLE_MS);
  };
  try {
    const headers = { Accept: "text/event-stream" };
    const token = getToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    watch();
    const resp = await fetch(path, { headers, cache: "no-store", signal: controller.signal });
    if (!resp.ok) {
      let detail = null;
      try {
        const body = await resp.json();
        detail = body && typeof body === "object" && "detail" in body ? body.detail : body;
      } catch {
        /* no JSON body */
      }
      return { status: resp.status, detail };
    }
    if (!resp.body || !(resp.headers.get("content-type") || "").startsWith("text/event-stream")) return { status: 0 };
    onOpen();
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    const feed = sseParser(deliver);
    for (;;) {
      watch();
      const { value, done } = await reader.read();
      if (done) break;
      feed(decoder.decode(value, { stream: true }));
    }
    return { status: 0 };
  } catch {
    return { status: 0 };
  } finally {
    clearTimeout(idle);
    signal.removeEventListener("abort", abort);
    controller.abort(); // releases the connection if it is still open
  }
}

// Follows the scheduler's event bus until `signal` aborts; handlers get (type, event).
// fetch() rather than EventSource, which cannot send the Authorization header that reads
// need when the scheduler's read_requires_token is on. onState("live", reconnected) when a
// stream opens (reconnected: after one was lost), "reconnecting" while retrying (1 s, doubling
// up to 15 s), "closed" when it gives up: another 4xx, or 401/403 (also shown in the banner;
// it reconnects when a token is entered in the token box).
export function followEvents(query, signal, onEvent, onState) {
  const path = `/api/v1/events${query ? `?${query}` : ""}`;
  const deliver = (name, text) => {
    if (!EVENT_TYPES.includes(name)) return;
    let data;
    try {
      data = JSON.parse(text);
    } catch {
      return;
    }
    if (data && typeof data === "object") handled(() => onEvent(data.type || name, data));
  };
  (async () => {
    let wasOpen = false;
    let lost = false;
    let delay = SSE_RETRY_MIN_MS;
    while (!signal.aborted) {
      const outcome = await sseConnect(path, signal, deliver, () => {
        handled(() => onState("live", wasOpen && lost));
        wasOpen = true;
        lost = false;
        delay = SSE_RETRY_MIN_MS;
      });
      if (signal.aborted) return;
      if (outcome.status === 401 || outcome.status === 403) {
        handled(() => onState("closed", false));
        showAuthError(new ApiError(outcome.status, outcome.detail, describeError(outcome.status, outcome.detail, "GET", path)));
        // no retries with a refused token; a new one from the token box reconnects at once
        await tokenChanged(signal);
        delay = SSE_RETRY_MIN_MS;
        continue;
      }
      if (outcome.status >= 400 && outcome.status < 500 && outcome.status !== 408 && outcome.status !== 429) {
        handled(() => onState("closed", false));
        return;
      }
      lost = true;
      handled(() => onState("reconnecting", false));
      await sleep(delay, signal);
      delay = Math.min(delay * 2, SSE_RETRY_MAX_MS);
    }
  })().catch(() => {
    /* sseConnect reports every failure as an outcome; nothing escapes but an abort */
  });
}
