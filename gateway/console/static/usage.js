// Usage: spend and requests per day by model (charts), recent requests (table,
// filter, CSV export). The account's own (/v1/...) or every account's (/admin/v1/...).
import { api } from "./api.js";
import { field, h, select, table, usd, when } from "./dom.js";
import { stackedBars } from "./chart.js";

const DAYS = 30;

export async function render(root, session) {
  const admin = session.role === "admin";
  const [daily, recent] = await Promise.all([
    api("GET", admin ? `admin/v1/usage?days=${DAYS}` : `v1/usage/daily?days=${DAYS}`)
      .catch((error) => ({ error })),
    api("GET", admin ? "admin/v1/requests?limit=100" : "v1/usage?limit=100"),
  ]);
  const charts = h("div", { class: "panel", id: "usage-charts" });
  if (daily.error) {
    charts.append(h("p", { class: "muted" }, `Daily totals unavailable: ${daily.error.message}`));
  } else {
    drawCharts(charts, daily.data);
  }
  root.append(charts);

  const records = recent.data;
  const models = [...new Set(records.map((r) => r.model))].sort();
  const statuses = [...new Set(records.map((r) => r.status))].sort();
  const modelFilter = select("usage-model", [["", "all models"], ...models], "");
  const statusFilter = select("usage-status", [["", "all statuses"], ...statuses], "");
  const text = h("input", { id: "usage-text", type: "search", placeholder: "route, request id…" });
  const exportButton = h("button", { type: "button", class: "ghost", id: "usage-csv" }, "Export CSV");
  const body = h("div", { id: "usage-table" });
  const count = h("p", { class: "muted", id: "usage-count", "aria-live": "polite" });
  root.append(h("div", { class: "panel" },
    h("h2", {}, "Recent requests"),
    h("div", { class: "grid" }, field("Model", modelFilter), field("Status", statusFilter),
      field("Search", text)),
    h("div", { class: "row" }, exportButton), count, body));

  const columns = admin ? ["created", "account", "model", "status", "cost_usd", "latency_ms", "route", "n", "size", "quality", "request_id"]
    : ["created", "model", "status", "cost_usd", "latency_ms", "route", "n", "size", "quality", "request_id"];
  const shown = () => records.filter((r) =>
    (!modelFilter.value || r.model === modelFilter.value)
    && (!statusFilter.value || r.status === statusFilter.value)
    && (!text.value || `${r.route} ${r.request_id} ${r.account || ""}`.includes(text.value.trim())));

  function draw() {
    const rows = shown();
    count.textContent = `${rows.length} of ${records.length} requests`;
    body.replaceChildren(table(
      [["Time"], ...(admin ? [["Account"]] : []), ["Model"], ["Status"], ["Cost", "num"],
        ["Latency", "num"], ["Route"], ["Request id"]],
      rows.map((r) => h("tr", { "data-request-id": r.request_id },
        h("td", {}, when(r.created)),
        admin ? h("td", {}, r.account) : null,
        h("td", {}, r.model),
        h("td", {}, h("span", { class: `badge ${r.status}` }, r.status)),
        h("td", { class: "num" }, usd(r.cost_micros)),
        h("td", { class: "num" }, `${r.latency_ms} ms`),
        h("td", {}, r.route || "—"),
        h("td", {}, h("code", {}, r.request_id)))),
      { id: "usage-records" }));
  }
  for (const control of [modelFilter, statusFilter, text]) control.addEventListener("input", draw);

  exportButton.addEventListener("click", () => {
    const cell = (value) => {
      const textValue = String(value ?? "");
      return /[",\n]/.test(textValue) ? `"${textValue.replaceAll('"', '""')}"` : textValue;
    };
    const lines = [columns.join(",")];
    for (const r of shown()) {
      const row = { ...r, created: new Date(r.created * 1000).toISOString(), cost_usd: usd(r.cost_micros).slice(1) };
      lines.push(columns.map((c) => cell(row[c])).join(","));
    }
    const blob = new Blob([lines.join("\n") + "\n"], { type: "text/csv" });
    const link = h("a", { href: URL.createObjectURL(blob), download: "imagegate-usage.csv" });
    document.body.append(link);
    link.click();
    link.remove();
  });
  draw();
}

function drawCharts(container, buckets) {
  const days = [];
  const today = new Date();
  for (let i = DAYS - 1; i >= 0; i--) {
    days.push(new Date(today.getTime() - i * 86400000).toISOString().slice(0, 10));
  }
  const spend = new Map();
  const requests = new Map();
  for (const b of buckets) {
    for (const [series, value] of [[spend, Number(b.spend_micros) / 1e6], [requests, Number(b.requests)]]) {
      if (!series.has(b.model)) series.set(b.model, new Map());
      const values = series.get(b.model);
      values.set(b.day, (values.get(b.day) || 0) + value);
    }
  }
  container.append(
    stackedBars(`Spend per day by model, last ${DAYS} days (USD)`, days, [...spend],
      (v) => `$${v.toFixed(v < 1 ? 3 : 2)}`),
    stackedBars(`Requests per day by model, last ${DAYS} days`, days, [...requests],
      (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1))));
  if (!buckets.length) container.append(h("p", { class: "muted" }, "No requests in this period."));
}
