// Data tables: dataTable() builds a <table class="data"> with its caption, header row and body;
// sortHeaders() the header cells of a table the user sorts by clicking a column, compareValues() orders
// its rows.

import { h } from "./dom.js";

// cls: classes besides "data"; caption: a visually hidden one for screen readers (none when omitted);
// columns: the header cells, a string standing for <th scope="col">; rows: the body's <tr> elements;
// empty: the text of a single row spanning every column when there are no rows (none when omitted).
export function dataTable({ id, cls, caption, columns, rows = [], empty }) {
  return h(
    "table",
    { class: ["data", cls], id },
    caption ? h("caption", { class: "visually-hidden" }, caption) : null,
    h("thead", {}, h("tr", {}, columns.map((c) => (typeof c === "string" ? h("th", { scope: "col" }, c) : c)))),
    h("tbody", {}, rows, rows.length || !empty ? null : h("tr", { class: "empty-row" }, h("td", { colspan: columns.length }, empty))),
  );
}

// Orders two cell values: numbers by value, strings naturally ("p2" before "p10"), either the way dir
// says (1 ascending, -1 descending); a missing value (null or undefined) after any other, whatever dir.
export function compareValues(va, vb, dir = 1) {
  const missingA = va === null || va === undefined;
  const missingB = vb === null || vb === undefined;
  if (missingA || missingB) return missingA - missingB;
  return (typeof va === "string" ? va.localeCompare(vb, undefined, { numeric: true }) : va - vb) * dir;
}

// Header cells, one per [key, label], of a table sorted by f = { sort: key, dir: 1 ascending | -1 descending }.
// A column that firstDir(key) gives a direction to gets a sort button: its first click sorts by it in that
// direction, the next ones the other way round; then render() runs and the focus goes back to the button
// (found in root, which render() keeps). A column without one is a plain header cell.
export function sortHeaders(columns, f, { firstDir, render, root }) {
  const onSort = (key) => {
    if (f.sort === key) f.dir = -f.dir;
    else [f.sort, f.dir] = [key, firstDir(key)];
    render();
    root.querySelector(`button[data-sort="${key}"]`)?.focus();
  };
  return columns.map(([key, label]) => {
    if (!firstDir(key)) return h("th", { scope: "col" }, label);
    const dir = f.sort === key ? f.dir : 0;
    return h(
      "th",
      { scope: "col", "aria-sort": dir ? (dir > 0 ? "ascending" : "descending") : "none" },
      h("button", { type: "button", class: "sort", "data-sort": key, onclick: () => onSort(key) }, label, dir ? (dir > 0 ? " ▲" : " ▼") : ""),
    );
  });
}
