// Calls to the console's own server. The key is never here: the browser sends the
// HttpOnly session cookie, and the server adds it as the Authorization header.
const HEADERS = { "X-Imagegate-Console": "1" };

export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = error?.code ?? null;
    this.param = error?.param ?? null;
  }
}

async function send(method, url, body) {
  const init = { method, headers: { ...HEADERS }, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  return fetch(url, init);
}

async function parse(response) {
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!response.ok) throw new ApiError(response.status, data?.error);
  return data;
}

// `path` is a REST path of imagegate without its leading slash: "v1/balance".
export async function api(method, path, body) {
  return parse(await send(method, `api/${path}`, body));
}

// The request id of the last call made with apiWithId (to find its usage record).
export async function apiWithId(method, path, body) {
  const response = await send(method, `api/${path}`, body);
  return { data: await parse(response), requestId: response.headers.get("x-request-id") };
}

// A streamed generation: calls onEvent(type, data) per server-sent event.
export async function stream(path, body, onEvent) {
  const response = await send("POST", `api/${path}`, body);
  if (!response.ok) return parse(response);
  const requestId = response.headers.get("x-request-id");
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let type = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) type = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      const parsed = JSON.parse(data.join("\n"));
      if (type === "error") throw new ApiError(0, parsed.error);
      onEvent(type, parsed);
    }
  }
  return { requestId };
}

export async function getSession() {
  const response = await send("GET", "session");
  if (response.status === 401) return null;
  return parse(response);
}

export async function signIn(key) {
  return parse(await send("POST", "session", { key }));
}

export async function signOut() {
  return parse(await send("DELETE", "session"));
}
