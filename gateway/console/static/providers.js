// Providers (operator): every model's routes (live, breaker state) and prices.
import { api } from "./api.js";
import { h, table, usd } from "./dom.js";

export async function render(root) {
  const models = (await api("GET", "admin/v1/models")).data;
  root.append(h("p", { class: "muted" },
    "Breaker states are this service process's; an open breaker skips its route until its cooldown ends."));
  for (const model of models) {
    const routes = table([["#"], ["Provider"], ["Kind"], ["Upstream model"], ["Live"], ["Breaker"]],
      (model.routes || []).map((route, i) => h("tr", {
        "data-provider": route.provider, "data-breaker": route.breaker,
      },
        h("td", {}, String(i + 1)),
        h("td", {}, route.provider),
        h("td", {}, route.kind),
        h("td", {}, h("code", {}, route.upstream_model)),
        h("td", {}, h("span", { class: `badge ${route.live ? "live" : "dead"}` }, route.live ? "live" : "not live")),
        h("td", {}, h("span", { class: `badge ${route.breaker}` }, route.breaker.replace("_", "-"))))));
    const prices = table([["Size"], ["Quality"], ["Per image", "num"]],
      (model.prices || []).map((p) => h("tr", {},
        h("td", {}, p.size), h("td", {}, p.quality), h("td", { class: "num" }, usd(p.micros)))));
    root.append(h("section", { class: "panel", id: `model-${model.id}`, "aria-label": `Model ${model.id}` },
      h("h2", {}, model.id), routes, h("details", {}, h("summary", {}, "Prices"), prices)));
  }
  if (!models.length) root.append(h("p", { class: "muted" }, "No models in the catalog."));
}
