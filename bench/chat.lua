-- wrk script for bench/relay_cpu.py: POST a chat completion. BENCH_MODEL, BENCH_STREAM (1 or 0)
-- and BENCH_USAGE (0: a stream that does not ask for usage) in the environment pick the request,
-- so it is built once (wrk's static path).
-- `done` prints one line, RELAY_CPU {json}, with the counts and latency percentiles (us).

local model = os.getenv("BENCH_MODEL") or "bench"
local stream = os.getenv("BENCH_STREAM") == "1"
local usage = os.getenv("BENCH_USAGE") ~= "0"

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local options = ""
if stream and usage then
  options = ',"stream_options":{"include_usage":true}'
end
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":'
  .. '"Count to sixteen."}],"stream":' .. (stream and "true" or "false") .. options .. "}"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RELAY_CPU {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"max":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max))
end
