// Providers (operator): every model's routes (live, breaker state) and prices, one table.
import { api } from "./api.js";
import { h, table, usd, usdShort } from "./dom.js";

export async function render(root) {
  const models = (await api("GET", "admin/v1/models")).data;
  const routes = models.flatMap((model) => (model.routes || []).map((route, i) => ({ model, route, i })));
  const open = routes.filter(({ route }) => route.breaker !== "closed");
  const dead = models.filter((model) => !(model.routes || []).some((route) => route.live));
  root.append(h("dl", { class: "stats panel", id: "providers-summary" },
    h("div", {}, h("dt", {}, "Models"), h("dd", {}, String(models.length))),
    h("div", {}, h("dt", {}, "Not served (no live route)"), h("dd", {}, String(dead.length))),
    h("div", {}, h("dt", {}, "Breakers open or probing"),
      h("dd", { class: open.length ? "error" : "ok" }, String(open.length)))),
  h("p", { class: "muted" },
    "Breaker states are this service process's; an open breaker skips its route until its cooldown ends."));
  root.append(h("div", { class: "panel" }, table(
    [["Model"], ["#", "num"], ["Provider (kind)"], ["Upstream model"], ["Live"], ["Breaker"],
      ["Per image", "num"]],
    routes.map(({ model, route, i }) => h("tr", {
      "data-model": model.id, "data-provider": route.provider, "data-breaker": route.breaker,
    },
      i === 0 ? h("th", { scope: "row" }, model.id) : h("td", { class: "muted" }, ""),
      h("td", { class: "num" }, String(i + 1)),
      h("td", {}, route.provider,
        route.kind !== route.provider ? h("small", { class: "muted" }, ` (${route.kind})`) : null),
      h("td", {}, h("code", {}, route.upstream_model)),
      // Why a route is not live (a missing credential, ...): on hover and for screen readers.
      h("td", {}, h("span", {
        class: `badge ${route.live ? "live" : "dead"}`, title: route.missing || null,
        "aria-label": route.live ? "live" : `not live: ${route.missing || "unknown"}`,
      }, route.live ? "live" : "not live")),
      h("td", {}, h("span", { class: `badge ${route.breaker}` }, route.breaker.replace("_", "-"))),
      h("td", { class: "num", title: priceList(model) }, i === 0 ? priceRange(model) : ""))),
    { id: "providers-table" })));
}

function priceRange(model) {
  const micros = (model.prices || []).map((p) => BigInt(p.micros));
  if (!micros.length) return "by tokens";
  const low = micros.reduce((a, b) => (b < a ? b : a));
  const high = micros.reduce((a, b) => (b > a ? b : a));
  return low === high ? usdShort(low) : `${usdShort(low)}–${usdShort(high)}`;
}

function priceList(model) {
  return (model.prices || []).map((p) => `${p.size} ${p.quality}: ${usd(p.micros)}`).join("\n");
}
