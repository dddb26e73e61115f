-- wrk script for bench/serve_load.py: POST BENCH_BODY to BENCH_PATH as JSON, every request a new
-- client (X-Client-ID), so an A/B router splits the load by its weights; prints JSON when done.
local counter = 0
local threads = 0  -- setup() runs in the main state; thread_id is each thread's global

function setup(thread)
  thread:set("thread_id", threads)
  threads = threads + 1
end

function init(args)
  wrk.method = "POST"
  wrk.path = os.getenv("BENCH_PATH")
  wrk.body = os.getenv("BENCH_BODY")
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  wrk.headers["X-Client-ID"] = "bench-" .. thread_id .. "-" .. counter
  return wrk.format()
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "status_errors": %d, "socket_errors": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, errors.status, errors.connect + errors.read + errors.write + errors.timeout,
    summary.duration, latency:percentile(50), latency:percentile(99)))
end
