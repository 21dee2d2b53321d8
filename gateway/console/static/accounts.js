// Accounts (operator): list with balances, create, credit, and one account's ledger.
import { api } from "./api.js";
import { errorText, field, h, table, usd, when } from "./dom.js";

export async function render(root) {
  const list = h("div", { id: "accounts-list" });
  const ledger = h("div", { id: "accounts-ledger" });
  const message = h("p", { id: "accounts-status", role: "status", "aria-live": "polite" });
  const name = h("input", { id: "account-name", type: "text", autocomplete: "off", required: true });
  const credit = h("input", { id: "account-credit", type: "text", inputmode: "decimal", value: "0" });
  const form = h("form", { class: "panel", id: "account-form" },
    h("h2", {}, "New account"),
    h("div", { class: "grid" }, field("Name", name), field("Initial credit (USD)", credit)),
    h("div", { class: "row" }, h("button", { type: "submit", id: "account-create" }, "Create account")));
  root.append(h("div", { class: "panel" }, list), message, form, ledger);

  const report = (kind, text) => { message.className = kind; message.textContent = text; };

  async function refresh() {
    const accounts = (await api("GET", "admin/v1/accounts")).data;
    list.replaceChildren(table(
      [["Account"], ["Balance", "num"], ["Held", "num"], ["Created"], ["Credit (USD)"], ["Ledger"]],
      accounts.map((account) => {
        const amount = h("input", { type: "text", inputmode: "decimal", size: 7, value: "",
          id: `credit-${account.name}`, "aria-label": `Credit amount for ${account.name} in USD` });
        const add = h("button", { type: "button", id: `credit-add-${account.name}` }, "Add");
        add.addEventListener("click", async () => {
          try {
            await api("POST", `admin/v1/accounts/${encodeURIComponent(account.name)}/credit`,
              { amount_usd: amount.value.trim() });
            report("ok", `Credited ${account.name} $${amount.value.trim()}.`);
            await refresh();
          } catch (error) {
            report("error", errorText(error));
          }
        });
        const show = h("button", { type: "button", class: "ghost", id: `ledger-${account.name}` },
          "Show");
        show.addEventListener("click", () => showLedger(account.name));
        return h("tr", { "data-account": account.name },
          h("th", { scope: "row" }, account.name),
          h("td", { class: "num", "data-micros": account.balance_micros }, usd(account.balance_micros)),
          h("td", { class: "num" }, usd(account.held_micros)),
          h("td", {}, when(account.created)),
          h("td", {}, h("div", { class: "inline" }, amount, add)),
          h("td", {}, show));
      }), { id: "accounts-table" }));
  }

  async function showLedger(accountName) {
    const detail = await api("GET", `admin/v1/accounts/${encodeURIComponent(accountName)}`);
    ledger.replaceChildren(h("div", { class: "panel", id: "ledger" },
      h("h2", {}, `Ledger of ${accountName}`),
      table([["Time"], ["Kind"], ["Amount", "num"], ["Balance after", "num"], ["Request"], ["Note"]],
        detail.ledger.map((entry) => h("tr", {},
          h("td", {}, when(entry.created)), h("td", {}, entry.kind),
          h("td", { class: "num" }, usd(entry.amount_micros)),
          h("td", { class: "num" }, usd(entry.balance_micros)),
          h("td", {}, entry.request_id ? h("code", {}, entry.request_id) : "—"),
          h("td", {}, entry.note || ""))))));
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api("POST", "admin/v1/accounts", { name: name.value.trim(), credit_usd: credit.value.trim() });
      report("ok", `Created ${name.value.trim()}.`);
      name.value = "";
      await refresh();
    } catch (error) {
      report("error", errorText(error));
    }
  });
  await refresh();
}
