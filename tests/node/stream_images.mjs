// The official OpenAI Node SDK streaming images from imagegate: `node stream_images.mjs JOBS`,
// JOBS a JSON list of {base_url, key, body}, or {base_url, key, body, op: "edit", images:
// [base64 PNG, ...]} for images.edit with those files. Prints one JSON result per job:
// {events: [{type, partial_image_index, size, png, bytes, usage}], error: null | {...}}.
import OpenAI, { toFile } from "openai";

const PNG = [0x89, 0x50, 0x4e, 0x47];

async function open(client, body, op, images) {
  if (op !== "edit") return client.images.generate(body);
  const files = await Promise.all(
    images.map((b64, i) => toFile(Buffer.from(b64, "base64"), `image_${i}.png`, { type: "image/png" })),
  );
  return client.images.edit({ ...body, image: files.length === 1 ? files[0] : files });
}

async function run({ base_url, key, body, op, images }) {
  const client = new OpenAI({ baseURL: `${base_url}/v1`, apiKey: key, maxRetries: 0 });
  const events = [];
  try {
    const stream = await open(client, body, op, images);
    for await (const event of stream) {
      const bytes = Buffer.from(event.b64_json, "base64");
      events.push({
        type: event.type,
        partial_image_index: event.partial_image_index ?? null,
        size: event.size,
        png: PNG.every((b, i) => bytes[i] === b),
        bytes: bytes.length,
        usage: event.usage ?? null,
      });
    }
    return { events, error: null };
  } catch (err) {
    return {
      events,
      error: {
        name: err.constructor.name,
        is_api_error: err instanceof OpenAI.APIError,
        status: err.status ?? null,
        message: err.message,
        type: err.type ?? null,
        code: err.code ?? null,
      },
    };
  }
}

const jobs = JSON.parse(process.argv[2]);
const results = [];
for (const job of jobs) results.push(await run(job));
process.stdout.write(JSON.stringify(results));
