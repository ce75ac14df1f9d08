// The official openai node SDK's edit call, unchanged, against a live server; prints one JSON line
// for tests/openai_api/test_edits.py. Usage: node node_edits.mjs <base_url> <sdk_dir> <png_path> <mask_path>
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { join } from "node:path";

const [baseURL, sdkDir, pngPath, maskPath] = process.argv.slice(2);
const require = createRequire(join(sdkDir, "package.json"));
const sdk = require("openai");
const OpenAI = sdk.default ?? sdk;
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
const file = (path, name) => sdk.toFile(readFileSync(path), name, { type: "image/png" });

const out = {};
const edited = await client.images.edit({ image: await file(pngPath, "in.png"), mask: await file(maskPath, "mask.png"),
                                          prompt: "a red fox", size: "auto", n: 1 });
out.edit = { size: edited.size, b64: edited.data[0].b64_json?.length ?? 0 };
const stream = await client.images.edit({ image: await file(pngPath, "in.png"), prompt: "x", stream: true,
                                          partial_images: 2 });
out.stream = [];
for await (const event of stream) out.stream.push(event.type);
try {
  await client.images.edit({ image: [await file(pngPath, "a.png"), await file(pngPath, "b.png")], prompt: "x" });
  out.two = null;
} catch (error) {
  out.two = { status: error.status, param: error.param ?? error.error?.param ?? null };
}
console.log(JSON.stringify(out));
