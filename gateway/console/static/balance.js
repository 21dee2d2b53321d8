// Balance: what the account can spend now, and what requests in flight hold.
import { api } from "./api.js";
import { h, usd } from "./dom.js";

export async function render(root) {
  const balance = await api("GET", "v1/balance");
  root.append(h("div", { class: "panel" },
    h("p", { class: "muted" }, "Available to spend"),
    h("p", { class: "big", id: "balance-usd", "data-micros": balance.balance_micros },
      usd(balance.balance_micros)),
    h("dl", { class: "stats" },
      h("div", {}, h("dt", {}, "Held by requests in progress"),
        h("dd", { id: "balance-held" }, usd(balance.held_micros))),
      h("div", {}, h("dt", {}, "Currency"), h("dd", {}, balance.currency.toUpperCase())))),
  h("p", { class: "muted" }, "Credit is added by the operator. Every charge is listed under Usage."));
}
