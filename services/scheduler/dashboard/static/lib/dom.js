// DOM helpers: h() builds HTML elements, s() SVG ones; fill() replaces an element's children; options()
// builds a <select>'s choices.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  appendAll(el, children);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  appendAll(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    else if (key === "text") el.textContent = value;
    else if (key === "value" && "value" in el) el.value = value;
    else if (key === "checked" || key === "selected" || key === "disabled" || key === "hidden" || key === "open") el[key] = true;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
}

function appendAll(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

// Replace an element's children (null, undefined and false are skipped, as in h()).
export function fill(el, ...children) {
  el.replaceChildren();
  appendAll(el, children);
  return el;
}

export const $ = (selector, root = document) => root.querySelector(selector);

// <option> elements, one per [value, text], the one whose value is `selected` (if any) selected.
export function options(choices, selected) {
  return choices.map(([value, text]) => h("option", { value, selected: value === selected }, text));
}
