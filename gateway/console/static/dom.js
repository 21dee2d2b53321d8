// Small DOM helpers: elements are built node by node, never parsed from strings.
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

const SVG = "http://www.w3.org/2000/svg";
export function s(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  append(node, children);
  return node;
}

let fieldId = 0;
// A labelled control: <div class="field"><label for=id>text</label>control</div>.
export function field(text, control, extraClass = "") {
  if (!control.id) control.id = `f${++fieldId}`;
  return h("div", { class: `field ${extraClass}` }, h("label", { for: control.id }, text), control);
}

export function select(id, options, value) {
  const node = h("select", { id });
  for (const option of options) {
    const [optionValue, text] = Array.isArray(option) ? option : [option, option];
    node.append(h("option", { value: optionValue, selected: optionValue === value }, text));
  }
  return node;
}

export function usd(micros) {
  const value = BigInt(micros ?? 0);
  const sign = value < 0n ? "-" : "";
  const abs = value < 0n ? -value : value;
  const whole = abs / 1000000n;
  const frac = (abs % 1000000n).toString().padStart(6, "0");
  return `${sign}$${whole}.${frac}`;
}

export function when(seconds) {
  const value = Number(seconds || 0);
  if (!value) return "never";
  return new Date(value * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

export function table(columns, rows, attrs = {}) {
  return h("div", { class: "table-wrap" },
    h("table", attrs,
      h("thead", {}, h("tr", {}, columns.map(([text, cls]) => h("th", { scope: "col", class: cls }, text)))),
      h("tbody", {}, rows)));
}

export function errorText(error) {
  return error?.code ? `${error.message} (${error.code})` : String(error?.message || error);
}

export function status(node, text, kind = "muted") {
  node.className = kind;
  node.textContent = text;
}

export async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Copy failed: select the key";
  }
}

// $0.04 rather than $0.040000: for prices in tables.
export function usdShort(micros) {
  return usd(micros).replace(/(\.\d\d\d*?)0+$/, "$1");
}
