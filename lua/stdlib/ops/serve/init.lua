-- ops.serve: the push-to-deploy receiver.
--   receive  POST /hooks/<name>: verify the signature (ops.serve.verify), de-duplicate by
--            delivery id, commit to the store, and only then answer 202
--   work     one loop per hook takes its pushes from the store (ops.serve.worker),
--            fetches the repo and deploys what changed (ops.serve.environments / plans)
--   observe  GET /healthz, GET /metrics (Prometheus text)
-- Every part is a Lua module a repo can override (.opsrun/ops/serve/<part>.lua).
local ops = require "ops"
local log = require "ops.log"
local json = require "ops.json"
local sys = require "ops.sys"
local time = require "ops.time"
local sched = require "ops.core.sched"
local history = require "ops.deploy.history"
local verify = require "ops.serve.verify"
local worker = require "ops.serve.worker"

local serve = {}

local QUEUE = "deliveries"

-- A counting semaphore for tasks: at most n holders.
local function semaphore(n)
  local s = {free = n, waiting = {}}
  function s:acquire()
    while self.free == 0 do
      local t = sched.current()
      self.waiting[#self.waiting + 1] = t
      sched.suspend()
    end
    self.free = self.free - 1
  end
  function s:release()
    self.free = self.free + 1
    local t = table.remove(self.waiting, 1)
    if t then sched.wake(t) end
  end
  return s
end

local function metrics()
  local m = {deliveries = {}, runs = {}, duration_sum = 0, duration_count = 0}
  function m.delivery(outcome) m.deliveries[outcome] = (m.deliveries[outcome] or 0) + 1 end
  function m.observe_run(status, secs)
    m.runs[status] = (m.runs[status] or 0) + 1
    m.duration_sum = m.duration_sum + secs
    m.duration_count = m.duration_count + 1
  end
  return m
end

local function sorted_keys(t)
  local k = {}
  for key in pairs(t) do k[#k + 1] = key end
  table.sort(k)
  return k
end

--- serve.metrics_text(ctx) -> Prometheus text exposition
function serve.metrics_text(ctx)
  local m, out = ctx.metrics, {}
  out[#out + 1] = "# HELP opsrun_deliveries_total Webhook deliveries received, by outcome."
  out[#out + 1] = "# TYPE opsrun_deliveries_total counter"
  for _, k in ipairs(sorted_keys(m.deliveries)) do
    out[#out + 1] = string.format('opsrun_deliveries_total{outcome="%s"} %d', k, m.deliveries[k])
  end
  local stats = ctx.queue:stats() or {}
  out[#out + 1] = "# HELP opsrun_queue_items Deliveries in the store, by state."
  out[#out + 1] = "# TYPE opsrun_queue_items gauge"
  for _, k in ipairs({"ready", "leased", "done", "dead"}) do
    out[#out + 1] = string.format('opsrun_queue_items{state="%s"} %d', k, stats[k] or 0)
  end
  out[#out + 1] = "# HELP opsrun_queue_depth Deliveries waiting or being deployed."
  out[#out + 1] = "# TYPE opsrun_queue_depth gauge"
  out[#out + 1] = string.format("opsrun_queue_depth %d", (stats.ready or 0) + (stats.leased or 0))
  out[#out + 1] = "# HELP opsrun_runs_total Deploys started from pushes, by status."
  out[#out + 1] = "# TYPE opsrun_runs_total counter"
  for _, k in ipairs(sorted_keys(m.runs)) do
    out[#out + 1] = string.format('opsrun_runs_total{status="%s"} %d', k, m.runs[k])
  end
  out[#out + 1] = "# HELP opsrun_run_duration_seconds Time deploys from pushes took."
  out[#out + 1] = "# TYPE opsrun_run_duration_seconds summary"
  out[#out + 1] = string.format("opsrun_run_duration_seconds_sum %.6f", m.duration_sum)
  out[#out + 1] = string.format("opsrun_run_duration_seconds_count %d", m.duration_count)
  return table.concat(out, "\n") .. "\n"
end

local function answer(status, tbl)
  return status, {["content-type"] = "application/json"}, json.encode(tbl) .. "\n"
end

--- serve.handle(ctx, req) -> status, headers, body
function serve.handle(ctx, req)
  if req.path == "/healthz" and (req.method == "GET" or req.method == "HEAD") then
    local ok = pcall(function() assert(ctx.db:query("SELECT 1 AS one")[1].one == 1) end)
    local dead = {}
    for name, t in pairs(ctx.workers) do
      if t:status() == "failed" or t:status() == "done" or t:status() == "cancelled" then dead[#dead + 1] = name end
    end
    if ok and #dead == 0 and not ctx.stopping then
      return answer(200, {status = "ok", workers = #sorted_keys(ctx.workers)})
    end
    return answer(503, {status = "unhealthy", store = ok, stopped_workers = dead, stopping = ctx.stopping})
  end
  if req.path == "/metrics" and req.method == "GET" then
    return 200, {["content-type"] = "text/plain; version=0.0.4"}, serve.metrics_text(ctx)
  end
  local name = req.path:match("^/hooks/([^/]+)$")
  if not name then return answer(404, {error = "not found"}) end
  local hook = ctx.settings.hooks[name]
  if not hook then
    ctx.metrics.delivery("unknown_hook")
    return answer(404, {error = "no hook named " .. name})
  end
  if req.method ~= "POST" then return answer(405, {error = "use POST"}) end
  if ctx.stopping then return answer(503, {error = "shutting down; deliver again later"}) end
  local push, status, reason = verify.providers[hook.provider](hook, req)
  if not push then
    if status == 401 then
      ctx.metrics.delivery("rejected")
      log.warn("rejected a delivery: " .. reason, {hook = name, remote = req.remote})
    elseif status == 400 then
      ctx.metrics.delivery("malformed")
      log.warn("malformed delivery: " .. reason, {hook = name, remote = req.remote})
    else
      ctx.metrics.delivery(status == 200 and "ping" or "ignored")
      log.info("delivery not deployed: " .. reason, {hook = name})
    end
    return answer(status, {status = status == 202 and "ignored" or (status == 200 and "ok" or "error"), reason = reason})
  end
  if push.branch ~= hook.branch then
    ctx.metrics.delivery("ignored")
    local why = "a push to " .. push.ref .. ", not refs/heads/" .. hook.branch
    log.info("delivery ignored: " .. why, {hook = name, delivery = push.delivery})
    return answer(202, {status = "ignored", reason = why, delivery = push.delivery})
  end
  local payload = json.encode({
    hook = name, delivery = push.delivery, ref = push.ref, before = push.before, after = push.after,
    created = push.created, deleted = push.deleted, forced = push.forced, received = time.now(),
  })
  local id, outcome = ctx.queue:enqueue("push:" .. name, payload, {key = name .. ":" .. push.delivery})
  if not id then
    ctx.metrics.delivery("store_error")
    log.error("cannot store a delivery: " .. tostring(outcome), {hook = name, delivery = push.delivery})
    return answer(503, {error = "the delivery could not be stored; deliver it again"})
  end
  ctx.metrics.delivery(outcome == "duplicate" and "duplicate" or "queued")
  if outcome == "queued" then
    log.info("delivery queued", {hook = name, delivery = push.delivery, after = push.after:sub(1, 12)})
    ctx.wake(name)
  end
  return answer(202, {status = outcome, delivery = push.delivery, id = id})
end

-- Items this host leased to a process that is gone are handed out again at once,
-- rather than when their lease runs out.
local function resume_dead(ctx)
  local host = sys.hostname()
  local rows = ctx.db:query("SELECT id, worker FROM ops_queue WHERE queue = ? AND state = 'leased'", QUEUE)
  for _, r in ipairs(rows) do
    local h, pid = tostring(r.worker):match("^(.*):(%d+):")
    pid = tonumber(pid)
    if h == host and pid and pid ~= sys.pid() and not sys.kill(pid, "0") then
      ctx.db:exec("UPDATE ops_queue SET available_at = 0 WHERE id = ? AND state = 'leased'", r.id)
      log.info("resuming a delivery left by a stopped process", {worker = r.worker, id = r.id})
    end
  end
end

local function notifier(settings)
  local n = settings.notify
  if type(n) ~= "table" then return nil end
  return function(hook, status, run_id, deliveries, commit)
    local body = json.encode({hook = hook.name, status = status, run = run_id, deliveries = deliveries, commit = commit})
    if type(n.command) == "table" then
      local r, err = ops.proc.run(n.command, {stdin = body, timeout = 60, env = {
        OPSRUN_HOOK = hook.name, OPSRUN_RUN_STATUS = status, OPSRUN_RUN_ID = tostring(run_id or ""),
        OPSRUN_COMMIT = commit, OPSRUN_DELIVERIES = table.concat(deliveries, ","),
      }})
      if not r or not r.ok then log.warn("the notify command failed: " .. (err or tostring(r.code))) end
    end
    local url = n.url or (n.url_env and sys.getenv(n.url_env))
    if url then
      log.secret(url)
      local r, err = ops.http.request({method = "POST", url = url, body = body, timeout = 30,
        headers = {["content-type"] = "application/json"}})
      if not r or r.status >= 300 then log.warn("the notify URL failed: " .. (err or ("HTTP " .. r.status))) end
    end
  end
end

--- serve.start(settings) -> ctx : listens, starts one worker loop per hook, returns at once
function serve.start(settings)
  local db = history.open(settings.store)
  local queue = assert(db:queue(QUEUE, {max_attempts = 5, backoff = 5, max_backoff = 600}))
  local ctx = {
    settings = settings, db = db, queue = queue, metrics = metrics(), workers = {},
    slots = semaphore(settings.jobs), waiting = {}, stopping = false,
  }
  ctx.notify = notifier(settings)
  function ctx.wake(name)
    local t = ctx.waiting[name]
    if t then
      ctx.waiting[name] = nil
      sched.wake(t)
    end
  end
  function ctx.wait_for_work(name)
    ctx.waiting[name] = sched.current()
    sched.suspend(5) -- a delivery wakes it; backoff retries become due on their own
    ctx.waiting[name] = nil
  end
  resume_dead(ctx)
  local server, err = ops.http.serve({
    listen = settings.listen, max_body = settings.max_body,
    handler = function(req) return serve.handle(ctx, req) end,
  })
  if not server then error("cannot listen on " .. settings.listen .. ": " .. tostring(err), 0) end
  ctx.server = server
  for _, name in ipairs(sorted_keys(settings.hooks)) do
    ctx.workers[name] = ops.spawn(worker.loop, ctx, settings.hooks[name])
  end
  log.info("listening on " .. settings.listen .. (server.port and (" (port " .. server.port .. ")") or ""),
    {hooks = table.concat(sorted_keys(settings.hooks), ",")})
  return ctx
end

--- serve.stop(ctx) : stop accepting, let work finish for settings.drain seconds, then hand
--- back what is left (it is deployed after the next start)
function serve.stop(ctx)
  if ctx.stopping then return end
  ctx.stopping = true
  log.info("stopping: finishing in-flight work for up to " .. ctx.settings.drain .. "s")
  for name in pairs(ctx.waiting) do ctx.wake(name) end
  local deadline = time.monotonic() + ctx.settings.drain
  ctx.server:close(math.max(1, ctx.settings.drain))
  for name, t in pairs(ctx.workers) do
    local ok = t:wait(math.max(0, deadline - time.monotonic()))
    if not ok and t:status() ~= "failed" and t:status() ~= "done" then
      t:cancel()
      log.warn("handed back unfinished work", {hook = name})
    end
  end
  local me = string.format("%s:%d:%%", sys.hostname(), sys.pid())
  ctx.db:exec("UPDATE ops_queue SET available_at = 0 WHERE queue = ? AND state = 'leased' AND worker LIKE ?", QUEUE, me)
  ctx.db:close()
  log.info("stopped")
end

--- serve.reload(ctx, settings) : new hooks, secrets and settings (listen stays)
function serve.reload(ctx, settings)
  if settings.listen ~= ctx.settings.listen then
    log.warn("listen changed in the config: restart opsrun serve to use it")
  end
  settings.listen = ctx.settings.listen
  ctx.settings = settings
  for name, hook in pairs(settings.hooks) do
    if not ctx.workers[name] or ctx.workers[name]:status() ~= "waiting" and ctx.workers[name]:status() ~= "running" and ctx.workers[name]:status() ~= "ready" then
      ctx.workers[name] = ops.spawn(worker.loop, ctx, hook)
    end
  end
  log.info("config reloaded", {hooks = table.concat(sorted_keys(settings.hooks), ",")})
end

serve.QUEUE = QUEUE

return serve
