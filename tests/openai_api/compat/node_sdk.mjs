// Drives the official openai node SDK, unchanged, against a live server; prints one JSON line
// of what it saw for tests/openai_api/test_compat.py to judge. Usage: node node_sdk.mjs <base_url> <sdk_dir>
import { createRequire } from "node:module";
import { join } from "node:path";

const [baseURL, sdkDir] = process.argv.slice(2);
// The SDK lives in sdkDir/node_modules (installed by scripts/install.sh --test), not next to this file.
const require = createRequire(join(sdkDir, "package.json"));
const OpenAI = require("openai").default ?? require("openai");
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
const out = {};

const modern = await client.images.generate({
  model: "gpt-image-1.5", prompt: "a lighthouse", size: "64x64", quality: "xhigh", complexity: "low",
  moderation: "low", safety_identifier: "user-123", n: 2,
});
out.modern = { count: modern.data.length, quality: modern.quality, b64: modern.data.map((d) => d.b64_json?.length ?? 0),
               url: modern.data[0].url ?? null };

const dalle = await client.images.generate({ model: "dall-e-2", prompt: "x", n: 1, size: "64x64" });
const download = await fetch(dalle.data[0].url);
const png = new Uint8Array(await download.arrayBuffer());
out.dalle = { url: dalle.data[0].url, b64: dalle.data[0].b64_json ?? null, status: download.status,
              png: png[0] === 0x89 && png[1] === 0x50 && png[2] === 0x4e && png[3] === 0x47 };

const stream = await client.images.generate({ model: "chatgpt-image-latest", prompt: "a lighthouse", size: "64x64",
                                              stream: true, partial_images: 2 });
out.stream = [];
for await (const event of stream) out.stream.push(event.type);

try {
  await client.images.generate({ model: "no-such-model", prompt: "x" });
  out.unknown = null;
} catch (err) {
  out.unknown = { status: err.status, code: err.code ?? err.error?.code ?? null };
}
try {
  await client.images.generate({ prompt: "x", output_format: "gif" });
  out.gif = null;
} catch (err) {
  out.gif = { status: err.status, param: err.param ?? err.error?.param ?? null };
}
console.log(JSON.stringify(out));
