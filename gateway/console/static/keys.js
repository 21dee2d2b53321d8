// Keys: list, create (shown once, with a copy button), revoke. An account manages
// its own (/v1/keys); the operator any account's (/admin/v1/keys), and may also change
// a key's models and limits (PATCH /admin/v1/keys/{id}).
import { api } from "./api.js";
import { copy, errorText, field, h, select, status, table, when } from "./dom.js";

// A key's limits as the API names them, and their labels.
const LIMITS = [["rpm", "Requests per minute"], ["ipm", "Images per minute"],
  ["concurrency", "Concurrent requests"], ["max_n", "Images per request (max n)"]];

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
  const editor = h("div", { id: "key-editor" });
  root.append(form, editor, h("div", { class: "panel" }, list), message);

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
      const actions = [revoke];
      if (admin && !key.revoked) {
        const edit = h("button", { type: "button", class: "ghost", "data-edit-key": key.id,
          "aria-label": `Change models and limits of ${key.name || key.prefix}` }, "Edit");
        edit.addEventListener("click", () => openEditor(key));
        actions.unshift(edit);
      }
      return h("tr", { "data-key-id": key.id, class: key.revoked ? "revoked" : "" },
        h("td", {}, h("code", {}, key.prefix)),
        h("td", {}, key.name || "—"),
        h("td", {}, key.models?.length ? key.models.join(", ") : "all"),
        h("td", {}, limits),
        h("td", {}, when(key.last_used)),
        h("td", {}, key.revoked ? h("span", { class: "badge revoked" }, "revoked")
          : h("div", { class: "actions" }, actions)));
    });
    list.replaceChildren(keys.length
      ? table([["Key"], ["Name"], ["Models"], ["Limits"], ["Last used"], ["Action"]], rows,
        { id: "keys-table" })
      : h("p", { class: "muted" }, "No keys."));
  }

  // The operator's form for one key: models, and each limit (empty: the default,
  // 0: no limit), sent as a PATCH of only what changed.
  function openEditor(key) {
    const current = key.limits || {};
    const modelsInput = h("input", { id: "edit-models", type: "text", autocomplete: "off",
      placeholder: "all models", value: (key.models || []).join(", ") });
    const inputs = Object.fromEntries(LIMITS.map(([limit]) => [limit, h("input", {
      id: `edit-${limit}`, type: "number", min: "0", step: "1", placeholder: "default",
      value: current[limit] ?? "" })]));
    const save = h("button", { type: "submit", id: "edit-save" }, "Save");
    const cancel = h("button", { type: "button", class: "ghost", id: "edit-cancel" }, "Cancel");
    const note = h("p", { id: "edit-status", role: "status", "aria-live": "polite" });
    const edit = h("form", { class: "panel", id: "key-edit-form" },
      h("h2", {}, `Key ${key.prefix}`),
      h("div", { class: "grid" }, field("Models (comma-separated)", modelsInput),
        LIMITS.map(([limit, text]) => field(text, inputs[limit]))),
      h("p", { class: "muted" }, "Empty: the gateway's default. 0: no limit."),
      h("div", { class: "row" }, save, cancel), note);
    cancel.addEventListener("click", () => editor.replaceChildren());
    edit.addEventListener("submit", async (event) => {
      event.preventDefault();
      const update = {};
      const chosen = modelsInput.value.split(",").map((m) => m.trim()).filter(Boolean);
      if (chosen.join(",") !== (key.models || []).join(",")) update.models = chosen;
      const limits = {};
      for (const [limit] of LIMITS) {
        const text = inputs[limit].value.trim();
        const value = text === "" ? -1 : Number(text);
        if (!Number.isInteger(value) || value < -1) {
          status(note, `${limit}: a whole number, 0 for no limit, or empty`, "error");
          return;
        }
        if (value !== (current[limit] ?? -1)) limits[limit] = value;
      }
      if (Object.keys(limits).length) update.limits = limits;
      save.disabled = true;
      try {
        await api("PATCH", `admin/v1/keys/${encodeURIComponent(key.id)}`, update);
        editor.replaceChildren();
        status(message, `Changed ${key.prefix}.`, "ok");
        await refresh();
      } catch (error) {
        status(note, errorText(error), "error");
      } finally {
        save.disabled = false;
      }
    });
    editor.replaceChildren(edit);
    modelsInput.focus();
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
