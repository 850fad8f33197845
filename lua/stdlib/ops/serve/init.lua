-- ops.serve: the push-to-deploy receiver.
--   receive  POST /hooks/<name>: verify the signature (ops.serve.verify), de-duplicate by
--            delivery id, commit to the store, and only then answer 202
--   work     one loop per hook takes its pushes from the store (ops.serve.worker),
--            fetches the repo and deploys what changed (ops.serve.environments / plans)
--   observe  GET /healthz, GET /metrics (Prometheus text), the serve_outcomes table
-- Every part is a Lua module that .opsrun/ or OPSRUN_PATH can override (ops/serve/<part>.lua).
local ops = require "ops"
local fs = require "ops.fs"
local log = require "ops.log"
local json = require "ops.json"
local sys = require "ops.sys"
local time = require "ops.time"
local crypto = require "ops.crypto"
local sched = require "ops.core.sched"
local failure = require "ops.deploy.failure"
local history = require "ops.deploy.history"
local verify = require "ops.serve.verify"
local worker = require "ops.serve.worker"

local serve = {}

local QUEUE = "deliveries"

-- The receiver's own tables, next to the queue and the run history.
serve.MIGRATIONS = {
  [[
  CREATE TABLE serve_outcomes (
    id INTEGER PRIMARY KEY,        -- the ops_queue item
    hook TEXT NOT NULL, delivery TEXT NOT NULL,
    commit_id TEXT,                -- the commit deployed (or found to need nothing)
    status TEXT NOT NULL,          -- succeeded, failed, interrupted, nothing, deleted, stale
    run_id INTEGER,                -- the deploy run (opsrun runs show RUN)
    finished REAL NOT NULL
  );
  CREATE INDEX serve_outcomes_delivery ON serve_outcomes (delivery);
  CREATE TABLE serve_targets (
    hook TEXT PRIMARY KEY, commit_id TEXT NOT NULL, at REAL NOT NULL
  );
  ]],
}

serve.DURATION_BUCKETS = {1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600}

-- A counting semaphore for tasks: at most n holders, served in the order they came. A
-- release hands the slot straight to the first task waiting, so a holder that releases and
-- acquires again at once (a busy hook's worker) goes behind the others, not ahead of them.
local function semaphore(n)
  local s = {free = n, waiting = {}}
  function s:acquire()
    if self.free > 0 and #self.waiting == 0 then
      self.free = self.free - 1
      return
    end
    local me = {task = sched.current()}
    self.waiting[#self.waiting + 1] = me
    -- raised out or cancelled while waiting: leave the line, or pass on a slot handed over
    local line <close> = setmetatable({}, {__close = function()
      if me.done then return end
      if me.granted then
        self:release()
      else
        for i, w in ipairs(self.waiting) do
          if w == me then table.remove(self.waiting, i) break end
        end
      end
    end})
    while not me.granted do sched.suspend() end -- any other wake: wait on
    me.done = true
  end
  function s:release()
    local w = table.remove(self.waiting, 1)
    if w then
      w.granted = true
      sched.wake(w.task)
    else
      self.free = self.free + 1
    end
  end
  return s
end

local function metrics()
  local m = {deliveries = {}, pushes = {}, runs = {}, duration_sum = 0, duration_count = 0, buckets = {},
    commits = 0, commit_seconds = 0}
  function m.delivery(outcome) m.deliveries[outcome] = (m.deliveries[outcome] or 0) + 1 end
  function m.push(outcome, n) m.pushes[outcome] = (m.pushes[outcome] or 0) + (n or 1) end
  function m.observe_run(status, secs)
    m.runs[status] = (m.runs[status] or 0) + 1
    m.duration_sum = m.duration_sum + secs
    m.duration_count = m.duration_count + 1
    for i, le in ipairs(serve.DURATION_BUCKETS) do
      if secs <= le then m.buckets[i] = (m.buckets[i] or 0) + 1 end
    end
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
  local function counter(name, help, label, t, always)
    out[#out + 1] = "# HELP " .. name .. " " .. help
    out[#out + 1] = "# TYPE " .. name .. " counter"
    for _, k in ipairs(always or {}) do t[k] = t[k] or 0 end
    for _, k in ipairs(sorted_keys(t)) do
      out[#out + 1] = string.format('%s{%s="%s"} %d', name, label, k, t[k])
    end
  end
  counter("opsrun_deliveries_total", "Webhook deliveries received, by how they were answered.", "outcome",
    m.deliveries, {"queued", "duplicate", "rejected"})
  counter("opsrun_pushes_total", "Queued deliveries processed by the workers, by outcome.", "outcome", m.pushes)
  local stats = ctx.queue:stats() or {}
  out[#out + 1] = "# HELP opsrun_queue_items Deliveries in the store, by state."
  out[#out + 1] = "# TYPE opsrun_queue_items gauge"
  for _, k in ipairs({"ready", "leased", "done", "dead"}) do
    out[#out + 1] = string.format('opsrun_queue_items{state="%s"} %d', k, stats[k] or 0)
  end
  out[#out + 1] = "# HELP opsrun_queue_depth Deliveries waiting or being deployed."
  out[#out + 1] = "# TYPE opsrun_queue_depth gauge"
  out[#out + 1] = string.format("opsrun_queue_depth %d", (stats.ready or 0) + (stats.leased or 0))
  counter("opsrun_runs_total", "Deploys started from pushes, by status.", "status", m.runs)
  out[#out + 1] = "# HELP opsrun_run_duration_seconds Time deploys from pushes took."
  out[#out + 1] = "# TYPE opsrun_run_duration_seconds histogram"
  for i, le in ipairs(serve.DURATION_BUCKETS) do
    out[#out + 1] = string.format('opsrun_run_duration_seconds_bucket{le="%g"} %d', le, m.buckets[i] or 0)
  end
  out[#out + 1] = string.format('opsrun_run_duration_seconds_bucket{le="+Inf"} %d', m.duration_count)
  out[#out + 1] = string.format("opsrun_run_duration_seconds_sum %.6f", m.duration_sum)
  out[#out + 1] = string.format("opsrun_run_duration_seconds_count %d", m.duration_count)
  out[#out + 1] = "# HELP opsrun_workers_busy Hooks whose worker is deploying now."
  out[#out + 1] = "# TYPE opsrun_workers_busy gauge"
  out[#out + 1] = string.format("opsrun_workers_busy %d", #sorted_keys(ctx.busy))
  local function single(name, kind, help, fmt, v)
    out[#out + 1] = "# HELP " .. name .. " " .. help
    out[#out + 1] = "# TYPE " .. name .. " " .. kind
    out[#out + 1] = string.format("%s " .. fmt, name, v)
  end
  single("opsrun_delivery_commits_total", "counter",
    "Transactions that stored deliveries (the deliveries that arrive meanwhile share the next one).", "%d", m.commits)
  single("opsrun_delivery_commit_seconds_total", "counter",
    "Seconds from handing deliveries to the store to their being on disk, added up over those transactions.", "%.6f",
    m.commit_seconds)
  -- every batch of the store's own connection: the deliveries' and the workers' bookkeeping
  local b = ctx.db:batch_stats()
  single("opsrun_store_batches_total", "counter", "Batches of statements run on the store's batch thread.", "%d", b.batches)
  out[#out + 1] = "# HELP opsrun_store_batch_seconds_total Seconds those batches spent, added up, by phase: "
    .. "waiting for the store's thread, committing, flushing the WAL to disk, returning to the server's loop."
  out[#out + 1] = "# TYPE opsrun_store_batch_seconds_total counter"
  for _, phase in ipairs({"waiting", "committing", "flushing", "returning"}) do
    out[#out + 1] = string.format('opsrun_store_batch_seconds_total{phase="%s"} %.6f', phase, b[phase])
  end
  return table.concat(out, "\n") .. "\n"
end

-- JSON of a flat record of strings, numbers and booleans, keys in the order given: the
-- receiver's hot path writes two per delivery, and this is ten times ops.json.encode.
local ESCAPES = {['"'] = '\\"', ["\\"] = "\\\\"}
local function escape(c) return ESCAPES[c] or string.format("\\u%04x", c:byte()) end

-- A JSON string: the common case (nothing to escape) costs one anchored find (the bytes
-- of %c as ranges: opsrun runs in the C locale; searching for '[%c"\\]' at every
-- position cost twice as much).
local find = string.find
local function json_string(v)
  if not find(v, '^[^\0-\31\127"\\]*$') then v = v:gsub('[%c"\\]', escape) end
  return '"' .. v .. '"'
end

local function json_value(v)
  if type(v) == "string" then return json_string(v) end
  if math.type(v) == "float" then return string.format("%.17g", v) end
  return tostring(v)
end

local function flat_json(t, keys)
  local out = {}
  for _, k in ipairs(keys) do
    local v = t[k]
    if v ~= nil then out[#out + 1] = '"' .. k .. '":' .. json_value(v) end
  end
  return "{" .. table.concat(out, ",") .. "}"
end
serve.flat_json = flat_json

local ANSWER_KEYS = {"status", "delivery", "id", "reason", "error"}
local JSON_HEADERS = {["content-type"] = "application/json"} -- shared: read by the server, never changed

local function answer(status, tbl, headers)
  headers = headers or {}
  headers["content-type"] = "application/json"
  local flat = true
  for _, v in pairs(tbl) do if type(v) == "table" then flat = false end end
  return status, headers, (flat and flat_json(tbl, ANSWER_KEYS) or json.encode(tbl)) .. "\n"
end

--- serve.health(ctx) -> ok, details
function serve.health(ctx)
  local store_ok = pcall(function() assert(ctx.db:query("SELECT 1 AS one")[1].one == 1) end)
  if ctx.store_error then store_ok = false end
  local workers, dead = {}, {}
  for _, name in ipairs(sorted_keys(ctx.settings.hooks)) do
    local t = ctx.workers[name]
    local st = t and t:status()
    if not t or st == "failed" or st == "done" or st == "cancelled" then
      dead[#dead + 1] = name
      workers[name] = "stopped"
    else
      workers[name] = ctx.busy[name] and "deploying" or "idle"
    end
  end
  local ok = store_ok and #dead == 0 and not ctx.stopping
  return ok, {status = ok and "ok" or "unhealthy", store = store_ok and "ok" or (ctx.store_error or "unreachable"),
    workers = workers, stopping = ctx.stopping or nil}
end

-- The stored payload of a push: the same text flat_json(t, {"hook", "delivery", "ref",
-- "before", "after", "created", "deleted", "forced", "received"}) gives, built in one
-- concatenation (this runs for every delivery).
local function bool(k, v)
  if v == nil then return "" end
  return v and ',"' .. k .. '":true' or ',"' .. k .. '":false'
end
local function push_payload(name, push, received)
  return '{"hook":' .. json_string(name) .. ',"delivery":' .. json_string(push.delivery)
    .. ',"ref":' .. json_string(push.ref) .. ',"before":' .. json_string(push.before)
    .. ',"after":' .. json_string(push.after) .. bool("created", push.created) .. bool("deleted", push.deleted)
    .. bool("forced", push.forced) .. ',"received":' .. json_value(received) .. "}"
end
serve.push_payload = push_payload

-- A warning anyone can cause, with no secret (an unsigned or malformed delivery, a hook
-- that does not exist): at most settings.log_limit lines per kind and hook in each window
-- of settings.log_window seconds, so that a flood can neither fill the disk nor bury the
-- log; the next line let through says how many were held back. /metrics counts them all.
local function limited_warn(ctx, kind, hook, msg, fields)
  local lines, window = ctx.settings.log_limit, ctx.settings.log_window
  if lines and window and window > 0 then
    local ok, held = log.allow("serve:" .. kind .. ":" .. hook, lines, window)
    if not ok then return end
    if held > 0 then fields.suppressed = held end
  end
  log.warn(msg, fields)
end

--- serve.handle(ctx, req) -> status, headers, body
function serve.handle(ctx, req)
  if req.path == "/healthz" then
    if req.method ~= "GET" and req.method ~= "HEAD" then return answer(405, {error = "use GET"}, {allow = "GET, HEAD"}) end
    local ok, details = serve.health(ctx)
    return answer(ok and 200 or 503, details)
  end
  if req.path == "/metrics" then
    if req.method ~= "GET" then return answer(405, {error = "use GET"}, {allow = "GET"}) end
    return 200, {["content-type"] = "text/plain; version=0.0.4"}, serve.metrics_text(ctx)
  end
  local name = req.path:match("^/hooks/([^/]+)$")
  if not name then return answer(404, {error = "not found: webhooks are POST /hooks/<name>"}) end
  local hook = ctx.settings.hooks[name]
  if not hook then
    ctx.metrics.delivery("unknown_hook")
    -- the name is whoever's choice: one window for all of them, and only its start shown
    limited_warn(ctx, "unknown", "", "a delivery for a hook that is not configured",
      {hook = #name > 64 and (name:sub(1, 64) .. "...") or name, remote = req.remote})
    return answer(404, {error = "no hook named " .. name})
  end
  if req.method ~= "POST" then return answer(405, {error = "use POST"}, {allow = "POST"}) end
  if ctx.stopping then
    ctx.metrics.delivery("refused")
    return answer(503, {error = "shutting down; deliver again later"}, {["retry-after"] = "5"})
  end
  local push, status, reason = verify.providers[hook.provider](hook, req)
  if not push then
    -- never the body: an unverified body is whatever anyone sent
    if status == 401 then
      ctx.metrics.delivery("rejected")
      limited_warn(ctx, "rejected", name, "rejected a delivery: " .. reason,
        {hook = name, remote = req.remote, bytes = #req.body})
    elseif status == 400 then
      ctx.metrics.delivery("malformed")
      limited_warn(ctx, "malformed", name, "malformed delivery: " .. reason, {hook = name, remote = req.remote})
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
  local id, outcome = ctx.store_delivery("push:" .. name, push_payload(name, push, time.now()),
    name .. ":" .. push.delivery, name)
  if not id then
    ctx.metrics.delivery("store_error")
    log.error("cannot store a delivery: " .. tostring(outcome), {hook = name, delivery = push.delivery})
    return answer(503, {error = "the delivery could not be stored; deliver it again"}, {["retry-after"] = "5"})
  end
  ctx.metrics.delivery(outcome)
  if outcome == "queued" then
    -- one line per delivery at debug; the writer logs one line per batch at info
    if log.enabled("debug") then
      log.debug("delivery queued", {hook = name, delivery = push.delivery, id = id, after = push.after:sub(1, 12)})
    end
    ctx.wake(name)
  else
    log.info("delivery already received: not run again", {hook = name, delivery = push.delivery, id = id})
  end
  -- the answer flat_json would give, without a table per request
  return 202, JSON_HEADERS, '{"status":"' .. outcome .. '","delivery":' .. json_string(push.delivery)
    .. ',"id":' .. id .. "}\n"
end

-- The store is opened with autocheckpoint = false: a commit on the loop never copies the
-- WAL into the database (and fsyncs both) on its own. The writer does it when the WAL has
-- grown by CHECKPOINT_FRAMES pages, on the thread pool (db:checkpoint), holding the db's
-- lock so that no transaction of this process writes meanwhile: the checkpoint then covers
-- the whole WAL, and the next commit starts it again from its beginning.
serve.CHECKPOINT_FRAMES = 1000
local function checkpointer(ctx)
  local at, last = serve.CHECKPOINT_FRAMES, 0
  return function()
    local frames = ctx.db:wal_frames()
    if frames < last then at = serve.CHECKPOINT_FRAMES end -- the WAL started again
    last = frames
    if frames < at then return end
    at = frames + serve.CHECKPOINT_FRAMES -- if this one cannot cover it all, not again at once
    local wal, done = ctx.db:checkpoint() -- holds this process's other writers off
    if not wal then
      log.warn("cannot checkpoint the store: " .. tostring(done))
    elseif done < wal then
      log.debug("checkpoint: " .. done .. " of " .. wal .. " WAL frames (a reader holds the rest)")
    end
  end
end

-- Group commit: handlers hand their delivery to one writer task, which commits whatever
-- has gathered in one transaction, durably (db:batch with sync: off the loop, a commit and
-- then an fdatasync of the WAL, so the WAL is on disk when it ends: one fdatasync for many
-- deliveries, and the loop goes on receiving meanwhile), and then wakes each handler with
-- its id. A handler answers only after that.
local function delivery_writer(ctx)
  local pending, idle = {}, nil
  local checkpoint = checkpointer(ctx)
  local function commit(batch)
    local started = time.monotonic()
    local n, err = ctx.queue:enqueue_many(batch, {sync = true})
    ctx.metrics.commits = ctx.metrics.commits + 1
    ctx.metrics.commit_seconds = ctx.metrics.commit_seconds + (time.monotonic() - started)
    ctx.store_error = not n and tostring(err) or nil
    local queued, first, last, hooks = 0, nil, nil, {}
    for _, e in ipairs(batch) do
      if not n then
        e.id, e.outcome = nil, tostring(err)
      elseif e.outcome == "queued" then
        queued = queued + 1
        first, last = first or e.id, e.id
        hooks[e.hook] = true
      end
      e.done = true
      sched.wake(e.task)
    end
    -- one line per batch (a batch is every delivery that arrived during the last commit);
    -- each delivery has its own line at debug level, duplicates and failures at info/error
    if queued > 0 then
      log.info(queued == 1 and "1 delivery queued" or (queued .. " deliveries queued"),
        {hooks = table.concat(sorted_keys(hooks), ","), ids = first == last and first or (first .. "-" .. last)})
    end
    if n then checkpoint() end
  end
  ctx.writer = ops.spawn(function()
    while true do
      if #pending == 0 then
        idle = sched.current()
        sched.suspend()
        idle = nil
      else
        local batch = pending
        pending = {}
        local ok, err = pcall(commit, batch)
        if not ok then -- a bug past the commit: no handler may wait forever
          log.error("the delivery writer failed: " .. tostring(err))
          for _, e in ipairs(batch) do
            if not e.done then
              e.id, e.outcome, e.done = nil, tostring(err), true
              sched.wake(e.task)
            end
          end
        end
      end
    end
  end)
  return function(kind, payload, key, hook)
    local e = {kind = kind, payload = payload, key = key, hook = hook or kind, task = sched.current()}
    pending[#pending + 1] = e
    if idle then sched.wake(idle) end
    while not e.done do sched.suspend() end
    return e.id, e.outcome
  end
end

-- Items leased by a process of this host that is gone (a crash, SIGKILL, a container
-- restart that reused its pid) are handed out again at once, not when their lease ends.
local function resume_dead(ctx)
  local host = sys.hostname()
  local rows = ctx.db:query("SELECT id, worker FROM ops_queue WHERE queue = ? AND state = 'leased'", QUEUE)
  for _, r in ipairs(rows) do
    local h, pid, nonce = tostring(r.worker):match("^(.*):(%d+):(%x+):")
    pid = tonumber(pid)
    local gone = pid and (pid == sys.pid() and nonce ~= ctx.nonce or pid ~= sys.pid() and not sys.kill(pid, "0"))
    if h == host and gone then
      ctx.db:exec("UPDATE ops_queue SET available_at = 0 WHERE id = ? AND state = 'leased'", r.id)
      log.info("resuming a delivery left by a stopped process", {worker = r.worker, id = r.id})
    end
  end
end

local function notifier(ctx)
  return function(hook, status, run_id, deliveries, commit)
    local n = ctx.settings.notify
    if type(n) ~= "table" then return end
    local body = json.encode({hook = hook.name, status = status, run = run_id, deliveries = deliveries, commit = commit})
    if type(n.command) == "table" then
      local r, err = ops.proc.run(n.command, {stdin = body, timeout = 60, env = ctx.child_env({
        OPSRUN_HOOK = hook.name, OPSRUN_RUN_STATUS = status, OPSRUN_RUN_ID = tostring(run_id or ""),
        OPSRUN_COMMIT = commit, OPSRUN_DELIVERIES = table.concat(deliveries, ","),
      })})
      if not r or not r.ok then
        log.warn("the notify command failed: " .. (err or (r.signal or ("exit " .. tostring(r.code)))), {hook = hook.name})
      end
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

local function purge(ctx)
  local age = ctx.settings.keep_days * 86400
  local n = ctx.queue:purge(age)
  ctx.db:exec("DELETE FROM serve_outcomes WHERE finished < ?", time.now() - age)
  if n and n > 0 then log.info("forgot " .. n .. " deliveries done more than " .. ctx.settings.keep_days .. " days ago") end
end

-- A worker loop that fails (a bug, the store gone) is logged and started again.
local function supervise(ctx, name)
  while not ctx.stopping and ctx.settings.hooks[name] do
    local ok, err = xpcall(worker.loop, debug.traceback, ctx, name)
    if ok then return end
    log.error("the worker failed, restarting it in 5s: " .. failure.message(err), {hook = name})
    ops.sleep(5)
  end
end

local function start_workers(ctx)
  for _, name in ipairs(sorted_keys(ctx.settings.hooks)) do
    local t = ctx.workers[name]
    local st = t and t:status()
    if not t or st == "done" or st == "failed" or st == "cancelled" then
      ctx.workers[name] = ops.spawn(supervise, ctx, name)
    end
  end
end

--- serve.start(settings) -> ctx : listens, starts one worker loop per hook, returns at once
function serve.start(settings)
  -- synchronous=NORMAL: commits do not fsync; deliveries are committed durably by the
  -- writer (db:batch with sync) before they are acknowledged. Worker bookkeeping (claims,
  -- outcomes) may lose its last lines in a power cut: a delivery then runs again.
  local db = history.open(settings.store, {synchronous = "normal", autocheckpoint = false})
  local mok, merr = db:migrate(serve.MIGRATIONS, {component = "ops.serve"})
  if not mok then failure.raise("the state store " .. settings.store .. " cannot be used: " .. tostring(merr)) end
  local queue = assert(db:queue(QUEUE, {max_attempts = 5, backoff = 5, max_backoff = 600}))
  local ctx = {
    settings = settings, db = db, queue = queue, metrics = metrics(), workers = {}, busy = {},
    slots = semaphore(settings.jobs), waiting = {}, stopping = false,
    nonce = crypto.random_hex(4), opsrun = fs.realpath("/proc/self/exe") or arg[-1] or "opsrun",
  }
  ctx.me = string.format("%s:%d:%s", sys.hostname(), sys.pid(), ctx.nonce)
  ctx.notify = notifier(ctx)
  ctx.store_delivery = delivery_writer(ctx)
  -- A wake while the worker is not waiting (it is claiming: a claim that began before a
  -- delivery was committed does not see it) is kept, and its next wait returns at once.
  local woken = {}
  function ctx.wake(name)
    local t = ctx.waiting[name]
    if t then
      ctx.waiting[name] = nil
      sched.wake(t)
    else
      woken[name] = true
    end
  end
  --- a busy hook's pause before its next claim (settings.coalesce): deliveries do not end
  --- it, stopping does
  ctx.settling = {}
  function ctx.settle(name, seconds)
    ctx.settling[name] = sched.current()
    sched.suspend(seconds)
    ctx.settling[name] = nil
  end
  function ctx.wait_for_work(name)
    if woken[name] then
      woken[name] = nil
      return
    end
    ctx.waiting[name] = sched.current()
    sched.suspend(5) -- a delivery wakes it; backoff retries become due on their own
    ctx.waiting[name] = nil
    woken[name] = nil
  end
  --- the environment of programs the workers start: without the hooks' secrets
  function ctx.child_env(extra)
    local env = {}
    for _, h in pairs(ctx.settings.hooks) do
      if h.secret_env then env[h.secret_env] = false end
    end
    -- the notify URL carries its token: deploys and hooks have no business with it
    local n = ctx.settings.notify
    if type(n) == "table" and type(n.url_env) == "string" then env[n.url_env] = false end
    for k, v in pairs(extra or {}) do env[k] = v end
    return env
  end
  function ctx.last_commit(name)
    local row = ctx.db:query("SELECT commit_id FROM serve_targets WHERE hook = ?", name)[1]
    return row and row.commit_id
  end
  --- ctx.finish(hook, me, items, status, run_id, target, claim, peeked) -> claimed
  --- marks the items done and records their outcome, in one transaction (a db:batch, off
  --- the loop) of the UPDATE for the group (items leased by me, or with peeked, read and
  --- never leased: q:complete_peeked), an INSERT ... SELECT of the outcomes of those it
  --- marked done (done by this worker), and the hook's last commit; with claim (as
  --- q:complete_many takes it; not with peeked), claims the worker's next group in it too,
  --- and returns it
  function ctx.finish(hook, me, items, status, run_id, target, claim, peeked)
    local now = time.now()
    local ids = {}
    for i, it in ipairs(items) do ids[i] = it.id end
    local idlist = "[" .. table.concat(ids, ",") .. "]"
    -- the delivery id is read from the stored payload by SQLite (json_extract), not decoded in Lua
    local more = {{"INSERT OR REPLACE INTO serve_outcomes (id, hook, delivery, commit_id, status, run_id, finished) "
      .. "SELECT id, ?, json_extract(payload, '$.delivery'), ?, ?, ?, ? FROM ops_queue "
      .. "WHERE id IN (SELECT value FROM json_each(?)) AND state = 'done' AND worker = ?",
      hook.name, target, status, run_id, now, idlist, me, n = 8}}
    if target then
      more[2] = {"INSERT INTO serve_targets (hook, commit_id, at) VALUES (?, ?, ?) "
        .. "ON CONFLICT (hook) DO UPDATE SET commit_id = excluded.commit_id, at = excluded.at", hook.name, target, now}
    end
    local done, lost, claimed
    if peeked then
      done, lost = ctx.queue:complete_peeked(ids, me, more)
    else
      done, lost, claimed = ctx.queue:complete_many(ids, me, more, claim)
    end
    if not done then error(lost, 0) end
    for _, id in ipairs(lost) do
      log.warn(peeked and "a delivery was taken by another worker before it was marked done"
        or "a delivery's lease was lost before it was marked done", {hook = hook.name, id = id})
    end
    ctx.metrics.push(status, #items)
    return claimed
  end
  resume_dead(ctx)
  purge(ctx)
  local server, err = ops.http.serve({
    listen = settings.listen, max_body = settings.max_body,
    handler = function(req) return serve.handle(ctx, req) end,
  })
  if not server then failure.raise("cannot listen on " .. settings.listen .. ": " .. tostring(err) .. " (listen: in " .. tostring(settings.file) .. ", or --listen)") end
  ctx.server = server
  start_workers(ctx)
  ctx.housekeeper = ops.spawn(function()
    while true do
      ops.sleep(3600)
      pcall(purge, ctx)
    end
  end)
  log.info("listening on " .. server.address, {hooks = table.concat(sorted_keys(settings.hooks), ",")})
  return ctx
end

--- serve.stop(ctx) : stop accepting, let work finish for settings.drain seconds, then hand
--- back what is left (it is deployed after the next start)
function serve.stop(ctx)
  if ctx.stopping then return end
  ctx.stopping = true
  log.info("stopping: finishing in-flight work for up to " .. ctx.settings.drain .. "s")
  for name in pairs(ctx.waiting) do ctx.wake(name) end
  for _, t in pairs(ctx.settling) do sched.wake(t) end
  local deadline = time.monotonic() + ctx.settings.drain
  ctx.server:close(math.max(1, ctx.settings.drain))
  ctx.housekeeper:cancel()
  for name, t in pairs(ctx.workers) do
    local ok = t:wait(math.max(0, deadline - time.monotonic()))
    if not ok and t:status() ~= "failed" and t:status() ~= "done" then
      t:cancel()
      log.warn("handed back unfinished work: it is deployed after the next start", {hook = name})
    end
  end
  ctx.writer:cancel()
  ctx.db:exec("UPDATE ops_queue SET available_at = 0 WHERE queue = ? AND state = 'leased' AND worker LIKE ?",
    QUEUE, ctx.me .. ":%")
  ctx.db:close()
  log.info("stopped")
end

--- serve.reload(ctx, settings) : new hooks, secrets and settings (listen, store, jobs and
--- max_body need a restart); a removed hook's worker ends after its current deploy
function serve.reload(ctx, settings)
  for _, k in ipairs({"listen", "store", "jobs", "max_body"}) do
    if settings[k] ~= ctx.settings[k] then
      log.warn(k .. " changed in the config: restart opsrun serve to use it")
      settings[k] = ctx.settings[k]
    end
  end
  ctx.settings = settings
  start_workers(ctx)
  for name in pairs(ctx.waiting) do ctx.wake(name) end
  log.info("config reloaded", {hooks = table.concat(sorted_keys(settings.hooks), ",")})
end

serve.QUEUE = QUEUE

return serve
