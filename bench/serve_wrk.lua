-- wrk script for bench/serve_bench.sh: POSTs one pre-signed GitHub push body with a new
-- X-GitHub-Delivery on every request (the signature covers only the body, so every
-- request verifies, and each one is a new delivery for the receiver to store).
-- The body and the signature come from the environment: BODY_FILE, SIGNATURE, RUN.
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("prefix", (os.getenv("RUN") or "run") .. "-t" .. threads)
end

function init(args)
  local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["X-GitHub-Event"] = "push"
  wrk.headers["X-Hub-Signature-256"] = os.getenv("SIGNATURE")
  counter = 0
end

function request()
  counter = counter + 1
  wrk.headers["X-GitHub-Delivery"] = prefix .. "-" .. counter
  return wrk.format(nil, nil, wrk.headers, wrk.body)
end
