// Formatting of times, durations, numbers and statuses, and the names of stages.

import { h } from "./dom.js";

export const STAGES = ["rollout_train", "rollout_val", "score", "select", "train"];
export const STAGE_LABELS = { rollout_train: "Rollout (train)", rollout_val: "Rollout (val)", score: "Score", select: "Select", train: "Train" };
export const STATUSES = ["pending", "running", "completed", "failed", "cancelled"];
export const TERMINAL = ["completed", "failed", "cancelled"];
export const PAGE_SIZE = 50;

export function parseTime(iso) {
  if (!iso) return null;
  // SQLite gives naive UTC timestamps; PostgreSQL gives an offset.
  const hasZone = /[zZ]|[+-]\d\d:?\d\d$/.test(iso);
  const t = Date.parse(hasZone ? iso : iso + "Z");
  return Number.isNaN(t) ? null : t;
}

function pad(n) {
  return String(n).padStart(2, "0");
}

export function fmtTime(iso) {
  const t = parseTime(iso);
  if (t === null) return "—";
  const d = new Date(t);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function timeCell(iso) {
  return iso ? h("time", { datetime: iso, title: iso }, fmtTime(iso)) : "—";
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  if (seconds < 0) seconds = 0;
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m} m ${pad(Math.floor(seconds % 60))} s`;
  return `${Math.floor(m / 60)} h ${pad(m % 60)} m`;
}

export function fmtNum(v, digits = 3) {
  if (v === null || v === undefined || v === "") return "—";
  if (typeof v !== "number") return String(v);
  if (!Number.isFinite(v)) return String(v);
  if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  return v.toFixed(digits);
}

export function basename(path) {
  if (!path) return "";
  const parts = String(path).split(/[\\/]/).filter(Boolean);
  return parts.length ? parts[parts.length - 1] : String(path);
}

export function badge(status) {
  return h("span", { class: ["badge", `status-${status}`], "data-status": status }, status);
}

export function stageLabel(name) {
  return STAGE_LABELS[name] || name || "—";
}

export function pluralUnit(unit) {
  return unit || "";
}

export function stageDuration(stage, now) {
  const start = parseTime(stage.started_at);
  if (start === null) return null;
  const end = parseTime(stage.finished_at);
  if (end !== null) return (end - start) / 1000;
  return stage.status === "running" ? (now - start) / 1000 : null;
}
