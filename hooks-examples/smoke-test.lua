-- smoke-test.lua: after the deploy, check that the service answers over HTTP.
--
-- Install: copy into the tool folder whose deploy should be checked, as
--   <env>/<tool>/bitops.after-deploy.d/50-smoke-test.lua   (e.g. prod/helm/...)
-- and set SMOKE_TEST_URL for the run (or in the folder's extra_env for ansible).
-- Optional: SMOKE_TEST_STATUS (expected status, default 200), SMOKE_TEST_BODY (a plain
-- string the body must contain), SMOKE_TEST_ATTEMPTS (default 10), SMOKE_TEST_TIMEOUT
-- (seconds per request, default 5).
--
-- opsrun runs a .lua hook inside itself with the step as its argument. Raising an error
-- fails the step (the run's summary shows the message and on-failure hooks run). A
-- freshly deployed service is often not ready yet: connection errors and 5xx answers are
-- retried with a growing wait (ops.http.request_retry); other answers are final.
local step = ...
local http = ops.http

local function var(name, default)
  local v = step.vars[name] or os.getenv(name)
  if v == nil or v == "" then return default end
  return v
end

local url = var("SMOKE_TEST_URL")
if not url then
  step.log.warn("smoke test: SMOKE_TEST_URL is not set; nothing checked")
  return
end
local want_status = tonumber(var("SMOKE_TEST_STATUS", "200"))
local want_body = var("SMOKE_TEST_BODY")
local attempts = tonumber(var("SMOKE_TEST_ATTEMPTS", "10"))

local res, err = http.request_retry(
  {url = url, timeout = tonumber(var("SMOKE_TEST_TIMEOUT", "5")), follow_redirects = true},
  {attempts = attempts, backoff = 1, max_backoff = 10})
if not res then
  error(string.format("smoke test: %s did not answer after %d attempts: %s", url, attempts, err), 0)
end
if res.status ~= want_status then
  error(string.format("smoke test: %s answered %d, expected %d: %s", url, res.status, want_status,
    (res.body or ""):sub(1, 200)), 0)
end
if want_body and not (res.body or ""):find(want_body, 1, true) then
  error(string.format("smoke test: %s answered %d but the body lacks %q", url, res.status, want_body), 0)
end
step.log.info(string.format("smoke test: %s answered %d in %.2fs", url, res.status, res.duration))
