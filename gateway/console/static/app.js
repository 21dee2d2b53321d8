// The console's shell: session, navigation by #hash, theme. Pages are modules.
import { ApiError, getSession, signIn, signOut } from "./api.js";
import { errorText, field, h } from "./dom.js";
import * as accounts from "./accounts.js";
import * as balance from "./balance.js";
import * as keys from "./keys.js";
import * as playground from "./playground.js";
import * as providers from "./providers.js";
import * as usage from "./usage.js";

const PAGES = {
  account: [
    ["playground", "Playground", playground],
    ["keys", "Keys", keys],
    ["usage", "Usage", usage],
    ["balance", "Balance", balance],
  ],
  admin: [
    ["accounts", "Accounts", accounts],
    ["keys", "Keys", keys],
    ["usage", "Usage", usage],
    ["providers", "Providers", providers],
  ],
};

const main = document.getElementById("main");
const nav = document.getElementById("nav");
let session = null;

function setTheme(theme) {
  const root = document.documentElement;
  if (theme) root.dataset.theme = theme;
  const dark = theme ? theme === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
  const button = document.getElementById("theme");
  button.setAttribute("aria-pressed", String(dark));
  button.textContent = dark ? "Light theme" : "Dark theme";
}

document.getElementById("theme").addEventListener("click", () => {
  const dark = document.getElementById("theme").getAttribute("aria-pressed") === "true";
  const theme = dark ? "light" : "dark";
  // Only the theme is remembered in the browser; never a key.
  localStorage.setItem("imagegate-theme", theme);
  setTheme(theme);
});
setTheme(localStorage.getItem("imagegate-theme"));

document.getElementById("signout").addEventListener("click", async () => {
  await signOut();
  session = null;
  location.hash = "";
  render();
});

function signInPage() {
  const key = h("input", {
    id: "signin-key", type: "password", autocomplete: "off", spellcheck: "false",
    placeholder: "sk-...", required: true,
  });
  const message = h("p", { id: "signin-error", role: "alert", class: "error" });
  const form = h("form", { class: "panel signin", id: "signin" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" },
      "An API key opens your account; an admin key (sk-admin-...) the operator view. ",
      "The key is kept only in an HttpOnly session cookie."),
    field("API key", key),
    h("div", { class: "row" }, h("button", { type: "submit", id: "signin-submit" }, "Sign in")),
    message);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.textContent = "";
    try {
      session = await signIn(key.value.trim());
      key.value = "";
      location.hash = `#/${PAGES[session.role][0][0]}`;
      render();
    } catch (error) {
      message.textContent = errorText(error);
    }
  });
  return form;
}

function renderNav(current) {
  nav.replaceChildren(...PAGES[session.role].map(([id, title]) =>
    h("a", { href: `#/${id}`, id: `nav-${id}`, "aria-current": id === current ? "page" : false }, title)));
  nav.hidden = false;
  const who = document.getElementById("who");
  who.textContent = session.role === "admin" ? "operator" : `account ${session.account ?? ""}`.trim();
  document.getElementById("signout").hidden = false;
}

async function render() {
  if (!session) {
    nav.hidden = true;
    document.getElementById("who").textContent = "";
    document.getElementById("signout").hidden = true;
    main.replaceChildren(signInPage());
    document.getElementById("signin-key").focus();
    return;
  }
  const pages = PAGES[session.role];
  const wanted = location.hash.replace(/^#\//, "");
  const [id, title, page] = pages.find(([pageId]) => pageId === wanted) || pages[0];
  renderNav(id);
  document.title = `${title} · imagegate console`;
  const root = h("section", { id: `page-${id}`, "aria-labelledby": `title-${id}` },
    h("h1", { id: `title-${id}` }, title));
  main.replaceChildren(root);
  try {
    await page.render(root, session);
    root.dataset.ready = "true";
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      session = null;
      render();
      return;
    }
    root.append(h("p", { class: "error", role: "alert" }, errorText(error)));
    root.dataset.ready = "true";
  }
}

window.addEventListener("hashchange", () => {
  render();
  main.focus();
});

(async () => {
  try {
    session = await getSession();
  } catch {
    session = null;
  }
  render();
})();
