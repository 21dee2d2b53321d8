// Keys: list, create (shown once, with a copy button), revoke. An account manages
// its own (/v1/keys); the operator any account's (/admin/v1/keys).
import { api } from "./api.js";
import { copy, errorText, field, h, select, table, when } from "./dom.js";

export async function render(root, session) {
  const admin = session.role === "admin";
  const list = h("div", { id: "keys-list" });
  const message = h("p", { id: "keys-status", role: "status", "aria-live": "polite" });
  let accountSelect = null;
  if (admin) {
    const names = (await api("GET", "admin/v1/accounts")).data.map((a) => a.name);
    if (!names.length) {
      root.append(h("p", { class: "muted" }, "No accounts yet: create one under Accounts."));
      return;
    }
    accountSelect = select("keys-account", names, names[0]);
    accountSelect.addEventListener("change", () => refresh());
    root.append(h("div", { class: "panel" }, field("Account", accountSelect)));
  }
  const name = h("input", { id: "key-name", type: "text", placeholder: "ci", autocomplete: "off" });
  const models = h("input", { id: "key-models", type: "text", placeholder: "all models",
    autocomplete: "off" });
  const create = h("button", { type: "submit", id: "key-create" }, "Create key");
  const secret = h("div", { id: "key-secret", "aria-live": "polite" });
  const form = h("form", { class: "panel", id: "key-form" },
    h("h2", {}, "New key"),
    h("div", { class: "grid" }, field("Name", name), field("Models (comma-separated)", models)),
    h("div", { class: "row" }, create), secret);
  root.append(form, h("div", { class: "panel" }, list), message);

  const path = () => admin
    ? `admin/v1/keys?account=${encodeURIComponent(accountSelect.value)}` : "v1/keys";

  async function refresh() {
    const keys = (await api("GET", path())).data;
    const rows = keys.map((key) => {
      const revoke = h("button", { type: "button", class: "danger", "data-key-id": key.id,
        "aria-label": `Revoke key ${key.name || key.prefix}`, disabled: key.revoked },
        key.revoked ? "Revoked" : "Revoke");
      revoke.addEventListener("click", async () => {
        if (!confirm(`Revoke ${key.prefix}? Requests with it will get 401.`)) return;
        try {
          await api("DELETE", `${admin ? "admin/v1" : "v1"}/keys/${encodeURIComponent(key.id)}`);
          message.className = "ok";
          message.textContent = `Revoked ${key.prefix}.`;
          await refresh();
        } catch (error) {
          message.className = "error";
          message.textContent = errorText(error);
        }
      });
      const limits = Object.entries(key.limits || {})
        .map(([k, v]) => `${k} ${v === 0 ? "∞" : v}`).join(", ") || "defaults";
      return h("tr", { "data-key-id": key.id, class: key.revoked ? "revoked" : "" },
        h("td", {}, h("code", {}, key.prefix)),
        h("td", {}, key.name || "—"),
        h("td", {}, key.models?.length ? key.models.join(", ") : "all"),
        h("td", {}, limits),
        h("td", {}, when(key.last_used)),
        h("td", {}, key.revoked ? h("span", { class: "badge revoked" }, "revoked") : revoke));
    });
    list.replaceChildren(keys.length
      ? table([["Key"], ["Name"], ["Models"], ["Limits"], ["Last used"], ["Action"]], rows,
        { id: "keys-table" })
      : h("p", { class: "muted" }, "No keys."));
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    create.disabled = true;
    secret.replaceChildren();
    const body = { name: name.value.trim() };
    const chosen = models.value.split(",").map((m) => m.trim()).filter(Boolean);
    if (chosen.length) body.models = chosen;
    if (admin) body.account = accountSelect.value;
    try {
      const created = await api("POST", admin ? "admin/v1/keys" : "v1/keys", body);
      const button = h("button", { type: "button", class: "ghost", id: "key-copy" }, "Copy");
      button.addEventListener("click", () => copy(created.key, button));
      secret.replaceChildren(h("div", { class: "secret" },
        h("strong", {}, "Your new key, shown this once:"),
        h("code", { id: "key-value" }, created.key), button));
      name.value = "";
      models.value = "";
      await refresh();
    } catch (error) {
      secret.replaceChildren(h("p", { class: "error", role: "alert" }, errorText(error)));
    } finally {
      create.disabled = false;
    }
  });
  await refresh();
}
