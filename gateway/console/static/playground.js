// Playground: try a model; see the images (previews as they stream), cost and latency.
import { api, apiWithId, stream } from "./api.js";
import { errorText, field, h, select, usd } from "./dom.js";

const SIZES = ["", "256x256", "512x512", "1024x1024", "1536x1024", "1024x1536", "1792x1024", "1024x1792"];
const QUALITIES = ["", "auto", "standard", "hd", "low", "medium", "high"];
const FORMATS = ["png", "jpeg", "webp"];

export async function render(root) {
  const models = (await api("GET", "v1/models")).data.map((m) => m.id);
  const model = select("pg-model", models, models.includes("local") ? "local" : models[0]);
  const prompt = h("textarea", { id: "pg-prompt", rows: 3, required: true },
    "a lighthouse at dusk, watercolour");
  const size = select("pg-size", SIZES.map((v) => [v, v || "model default"]), "");
  const quality = select("pg-quality", QUALITIES.map((v) => [v, v || "model default"]), "");
  const n = h("input", { id: "pg-n", type: "number", min: 1, max: 10, value: 1 });
  const format = select("pg-format", FORMATS, "png");
  const response = select("pg-response", [["b64_json", "inline (b64_json)"], ["url", "link (url)"]], "b64_json");
  const streamed = h("input", { id: "pg-stream", type: "checkbox" });
  const partials = h("input", { id: "pg-partials", type: "number", min: 0, max: 3, value: 2 });
  const submit = h("button", { type: "submit", id: "pg-generate" }, "Generate");
  const message = h("p", { id: "pg-status", role: "status", "aria-live": "polite", class: "muted" });
  const stats = h("dl", { class: "stats", id: "pg-stats" });
  const images = h("div", { class: "images", id: "pg-images", "aria-live": "polite" });

  const form = h("form", { class: "panel", id: "pg-form" },
    field("Prompt", prompt),
    h("div", { class: "grid" },
      field("Model", model), field("Size", size), field("Quality", quality),
      field("Images (n)", n), field("Format", format), field("Response", response),
      field("Previews while streaming", partials)),
    h("div", { class: "row" }, field("Stream", streamed, "check"), submit),
    message);
  root.append(form, h("section", { class: "panel", "aria-label": "Result" }, stats, images));

  streamed.addEventListener("change", () => {
    response.disabled = streamed.checked; // a stream always carries the image itself
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {
      model: model.value, prompt: prompt.value, n: Number(n.value),
      output_format: format.value,
    };
    if (size.value) body.size = size.value;
    if (quality.value) body.quality = quality.value;
    submit.disabled = true;
    images.replaceChildren();
    stats.replaceChildren();
    message.className = "muted";
    message.textContent = "Generating…";
    const started = performance.now();
    try {
      let requestId;
      const shown = [];
      if (streamed.checked) {
        body.stream = true;
        if (body.n === 1) body.partial_images = Number(partials.value);
        const previews = new Map();
        ({ requestId } = await stream("v1/images/generations", body, (type, data) => {
          const src = `data:image/${data.output_format || format.value};base64,${data.b64_json}`;
          if (type.endsWith("partial_image")) {
            let img = previews.get("p");
            if (!img) {
              img = figure(images, src, `preview`, format.value, true);
              previews.set("p", img);
            }
            img.src = src;
            images.dataset.previews = String(data.partial_image_index + 1);
            message.textContent = `Preview ${data.partial_image_index + 1}…`;
          } else if (type.endsWith("completed")) {
            const preview = previews.get("p");
            if (preview) {
              preview.closest("figure").remove();
              previews.delete("p");
            }
            shown.push({});
            figure(images, src, null, data.output_format || format.value, false, shown.length);
          }
        }));
      } else {
        body.response_format = response.value;
        const result = await apiWithId("POST", "v1/images/generations", body);
        requestId = result.requestId;
        for (const item of result.data.data) {
          const type = result.data.output_format || format.value;
          const src = item.b64_json ? `data:image/${type};base64,${item.b64_json}` : item.url;
          shown.push(item);
          figure(images, src, item.revised_prompt, type, false, shown.length);
        }
      }
      const elapsed = Math.round(performance.now() - started);
      message.className = "ok";
      message.textContent = `Done: ${shown.length} image(s).`;
      await showCost(stats, requestId, elapsed);
    } catch (error) {
      message.className = "error";
      message.textContent = errorText(error);
    } finally {
      submit.disabled = false;
    }
  });
}

function figure(container, src, caption, type, partial, index) {
  const img = h("img", { src, alt: partial ? "Preview of the image" : `Generated image ${index}`,
    class: partial ? "partial" : "generated" });
  const parts = [];
  if (!partial) {
    parts.push(h("a", { href: src, download: `imagegate-${index}.${type === "jpeg" ? "jpg" : type}`,
      class: "download" }, "Download"));
  }
  if (caption && !partial) parts.push(h("span", { class: "revised" }, `Revised prompt: ${caption}`));
  if (partial) parts.push(h("span", { class: "muted" }, "Preview"));
  container.append(h("figure", {}, img, h("figcaption", {}, parts)));
  return img;
}

async function showCost(stats, requestId, elapsed) {
  const item = (term, value, id) => h("div", {}, h("dt", {}, term), h("dd", { id }, value));
  stats.replaceChildren(item("Latency (browser)", `${elapsed} ms`, "pg-latency"));
  // The charge is settled with the response; its usage record carries cost and route.
  const usage = await api("GET", "v1/usage?limit=20");
  const record = usage.data.find((r) => r.request_id === requestId);
  if (!record) return;
  stats.append(
    item("Cost charged", usd(record.cost_micros), "pg-cost"),
    item("Latency (service)", `${record.latency_ms} ms`, "pg-service-latency"),
    item("Route", record.route || "—", "pg-route"),
    item("Request id", h("code", {}, record.request_id), "pg-request-id"));
}
