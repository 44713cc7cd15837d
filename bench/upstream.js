// An OpenAI-shaped upstream for bench/relay_cpu.py: Node's own http module, no dependencies.
//
//   node bench/upstream.js --port 9000 [--tokens 16] [--paced-tokens 64] [--pace-ms 20]
//
// POST .../v1/chat/completions answers with the model named in the request:
//   "stream": false  one JSON completion, `tokens` tokens of content, with usage
//   "stream": true   SSE: `tokens` token chunks + a usage chunk + `data: [DONE]`, written at once,
//                    one write (one HTTP chunk) per frame
// POST /paced/v1/chat/completions streams `paced-tokens` token chunks (or the request's
// `max_tokens`), one every `pace-ms` per stream, then the usage chunk and `data: [DONE]`.
// GET /stats: counters (requests, json, sse, frames written, streams cut short), for the bench
// to divide CPU by the work the upstream really did.

"use strict";

const http = require("http");

function option(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at > 0 ? Number(process.argv[at + 1]) : fallback;
}

const PORT = option("port", 9000);
const TOKENS = option("tokens", 16);
const PACED_TOKENS = option("paced-tokens", 64);
const PACE_MS = option("pace-ms", 20);
const CREATED = 1700000000;
const stats = { requests: 0, json: 0, sse: 0, frames: 0, cut: 0 };
const answers = new Map(); // `${model}\0${tokens}` -> {json, frames}

function frame(value) {
  return Buffer.from(`data: ${JSON.stringify(value)}\n\n`);
}

function answer(model, tokens) {
  const key = `${model}\0${tokens}`;
  let cached = answers.get(key);
  if (cached) return cached;
  const usage = { prompt_tokens: 12, completion_tokens: tokens, total_tokens: 12 + tokens };
  const words = Array.from({ length: tokens }, (_, i) => ` tok${i}`);
  const json = Buffer.from(JSON.stringify({
    id: "chatcmpl-bench", object: "chat.completion", created: CREATED, model,
    system_fingerprint: null,
    choices: [{ index: 0, message: { role: "assistant", content: words.join("") },
      logprobs: null, finish_reason: "stop" }],
    usage,
  }));
  const chunk = (choices, extra) => frame({
    id: "chatcmpl-bench", object: "chat.completion.chunk", created: CREATED, model,
    system_fingerprint: null, choices, ...extra,
  });
  const frames = words.map((word, i) => chunk([{
    index: 0, delta: i === 0 ? { role: "assistant", content: word } : { content: word },
    logprobs: null, finish_reason: i === tokens - 1 ? "stop" : null,
  }]));
  frames.push(chunk([], { usage }), Buffer.from("data: [DONE]\n\n"));
  cached = { json, frames };
  answers.set(key, cached);
  return cached;
}

const SSE_HEADERS = { "content-type": "text/event-stream", "cache-control": "no-cache" };

function streamAtOnce(res, frames) {
  res.writeHead(200, SSE_HEADERS);
  for (const f of frames) res.write(f);
  stats.frames += frames.length;
  res.end();
}

function streamPaced(res, frames) {
  res.writeHead(200, SSE_HEADERS);
  let next = 0;
  const tokens = frames.length - 2; // the usage chunk and [DONE] follow the last token
  const tick = () => {
    const last = next === tokens - 1;
    const upto = last ? frames.length : next + 1;
    for (; next < upto; next++) res.write(frames[next]);
    stats.frames += last ? 3 : 1;
    if (last) {
      clearInterval(timer);
      res.end();
    }
  };
  const timer = setInterval(tick, PACE_MS);
  res.on("close", () => {
    if (next < frames.length) stats.cut++;
    clearInterval(timer);
  });
  tick();
}

function handle(req, res, body) {
  if (req.method === "GET" && req.url === "/stats") {
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify(stats));
    return;
  }
  if (req.method !== "POST" || !req.url.endsWith("/v1/chat/completions")) {
    res.writeHead(404, { "content-type": "application/json" });
    res.end('{"error":{"message":"not found","type":"invalid_request_error"}}');
    return;
  }
  let request;
  try {
    request = JSON.parse(body);
  } catch {
    res.writeHead(400, { "content-type": "application/json" });
    res.end('{"error":{"message":"bad json","type":"invalid_request_error"}}');
    return;
  }
  stats.requests++;
  const paced = req.url.startsWith("/paced/");
  const tokens = paced ? Number(request.max_tokens) || PACED_TOKENS : TOKENS;
  const { json, frames } = answer(String(request.model), tokens);
  if (!request.stream) {
    stats.json++;
    res.writeHead(200, { "content-type": "application/json", "content-length": json.length });
    res.end(json);
    return;
  }
  stats.sse++;
  if (paced) streamPaced(res, frames);
  else streamAtOnce(res, frames);
}

const server = http.createServer({ noDelay: true }, (req, res) => {
  const parts = [];
  req.on("data", (part) => parts.push(part));
  req.on("end", () => handle(req, res, Buffer.concat(parts).toString()));
});
server.keepAliveTimeout = 120000;
server.headersTimeout = 125000;
server.requestTimeout = 0;
server.maxRequestsPerSocket = 0;
server.listen({ host: "127.0.0.1", port: PORT, backlog: 4096 });
process.on("SIGTERM", () => process.exit(0));
