-- ops.http: the HTTP client (libcurl on the loop, runtime/http_client.c) and, next to it,
-- the server. Reference: docs/parts/http-client.md.
local client = require "ops.core.http_client"
local sched = require "ops.core.sched"

local http = {}

-- ---------------------------------------------------------------------------------------
-- Client
-- ---------------------------------------------------------------------------------------

local IDEMPOTENT = { GET = true, HEAD = true, PUT = true, DELETE = true, OPTIONS = true }
local RETRIABLE = { ECONNREFUSED = true, timeout = true, dns = true, EIO = true }

local function with(opts, fields)
  if opts ~= nil and type(opts) ~= "table" then error("http: opts must be a table", 3) end
  local o = {}
  for k, v in pairs(opts or {}) do o[k] = v end
  for k, v in pairs(fields) do o[k] = v end
  return o
end

--- http.request(opts) -> response | nil, err, code
-- response = {status, headers, body, url, duration}; waits, so call it from a task.
http.request = client.request

--- http.get(url [, opts]) -> response | nil, err, code
function http.get(url, opts)
  return client.request(with(opts, { url = url, method = "GET" }))
end

--- http.post(url, body [, opts]) -> response | nil, err, code
function http.post(url, body, opts)
  return client.request(with(opts, { url = url, method = "POST", body = body }))
end

local function retry_after(res, max)
  local v = res.headers["retry-after"]
  local s = v and tonumber(v)
  if s and s >= 0 then return math.min(s, max) end
end

--- http.request_retry(opts [, policy]) -> response | nil, err, code
-- policy = {attempts = 4, backoff = 0.5, max_backoff = 8}. Retries connection failures
-- (ECONNREFUSED, timeout, dns, EIO) and 5xx answers of idempotent requests (GET, HEAD,
-- PUT, DELETE, OPTIONS, or opts.idempotent = true), waiting backoff * 2^(n-1) seconds
-- (at most max_backoff; a 5xx's Retry-After in seconds is honoured up to max_backoff).
-- Returns the last outcome: a 5xx response once attempts run out.
function http.request_retry(opts, policy)
  if type(opts) ~= "table" then error("http.request_retry: opts must be a table", 2) end
  policy = policy or {}
  local attempts = policy.attempts or 4
  local backoff = policy.backoff or 0.5
  local max_backoff = policy.max_backoff or 8
  local method = string.upper(opts.method or "GET")
  if not (IDEMPOTENT[method] or opts.idempotent == true) then attempts = 1 end
  for n = 1, attempts do
    local res, err, code = client.request(opts)
    local last = n == attempts
    if res then
      if res.status < 500 or last then return res end
      sched.sleep(retry_after(res, max_backoff) or math.min(backoff * 2 ^ (n - 1), max_backoff))
    else
      if not RETRIABLE[code] or last then return nil, err, code end
      sched.sleep(math.min(backoff * 2 ^ (n - 1), max_backoff))
    end
  end
end

-- ---------------------------------------------------------------------------------------
-- Server
-- ---------------------------------------------------------------------------------------

--- http.serve(opts) -> server | nil, err, code: an HTTP/1.1 server on the loop; each request
--- runs the handler in a task of its own (see ops.http_server and docs/lua-api.md).
function http.serve(opts)
  return require("ops.http_server").serve(opts)
end

return http
