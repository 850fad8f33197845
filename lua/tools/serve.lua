-- tools.serve: `opsrun serve`, the push-to-deploy webhook receiver.
local fs = require "ops.fs"
local log = require "ops.log"
local sys = require "ops.sys"
local sched = require "ops.core.sched"
local failure = require "ops.deploy.failure"

local M = {}

M.USAGE = [==[
usage: opsrun serve [--config FILE] [--listen ADDR] [--jobs N] [--store PATH]
       opsrun serve status [--config FILE] [--store PATH]

Receives GitHub, GitLab and Gitea push webhooks at POST /hooks/<name>, verifies them,
stores them, answers 202, and deploys what each push changed. GET /healthz and
GET /metrics (Prometheus). SIGTERM/SIGINT: stop accepting, finish or hand back the work
in flight, exit 0. SIGHUP: reload the config.

options:
  --config FILE   the config (default: opsrun-serve.yaml, else serve.lua, in the current folder)
  --listen ADDR   override listen: (127.0.0.1:8080, [::1]:0, unix:/path)
  --jobs N        override jobs: (targets deployed at once)
  --store PATH    override store:
]==]

local function usage_error(msg)
  io.stderr:write("opsrun serve: ", msg, "\n", M.USAGE)
  return 2
end

local function find_config(given)
  if given then return given end
  for _, f in ipairs({"opsrun-serve.yaml", "opsrun-serve.yml", "serve.lua"}) do
    if fs.exists(f) then return f end
  end
  return nil
end

local function load(opts)
  local cfg = require("ops.serve.config").load(opts.config)
  if opts.listen then cfg.listen = opts.listen end
  if opts.jobs then cfg.jobs = opts.jobs end
  if opts.store then cfg.store = opts.store end
  return cfg
end

local function status(opts)
  local history = require "ops.deploy.history"
  local store_path = opts.store
  if not store_path and opts.config then store_path = load(opts).store end
  local db = history.open(store_path)
  local q = assert(db:queue("deliveries"))
  local st = q:stats()
  print(string.format("deliveries: %d ready, %d being deployed, %d done, %d dead",
    st.ready or 0, st.leased or 0, st.done or 0, st.dead or 0))
  local rows = db:query("SELECT id, kind, state, attempts, last_error, key FROM ops_queue WHERE queue = 'deliveries' AND state IN ('ready', 'leased', 'dead') ORDER BY id LIMIT 20")
  for _, r in ipairs(rows) do
    print(string.format("  #%d %s %s (attempts %d)%s", r.id, r.key or r.kind, r.state, r.attempts or 0,
      r.last_error and (": " .. r.last_error) or ""))
  end
  print("\nrecent runs:")
  for _, r in ipairs(history.runs(db, 10)) do
    print(string.format("  run %d %-11s %s delivery %s", r.id, r.status, r.envs or "", r.delivery or "-"))
  end
  return 0
end

function M.main(args)
  local opts = {}
  local i, sub = 1, nil
  while i <= (args.n or #args) do
    local a = args[i]
    local v = args[i + 1]
    if a == "status" and not sub then sub = "status"; i = i + 1
    elseif a == "--config" or a == "--listen" or a == "--jobs" or a == "--store" then
      if not v then return usage_error(a .. " needs a value") end
      opts[a:sub(3)] = v
      i = i + 2
    elseif a == "-h" or a == "--help" then io.stdout:write(M.USAGE); return 0
    else return usage_error("unknown argument " .. a) end
  end
  if opts.jobs then
    opts.jobs = math.tointeger(tonumber(opts.jobs))
    if not opts.jobs or opts.jobs < 1 then return usage_error("--jobs needs a whole number of at least 1") end
  end
  opts.config = find_config(opts.config)
  local ok, code = pcall(function()
    if sub == "status" then return status(opts) end
    if not opts.config then
      failure.raise("no config: give --config FILE, or put opsrun-serve.yaml in the current folder (see docs/serve.md)")
    end
    local serve = require "ops.serve"
    local ctx = serve.start(load(opts))
    local main = sched.current()
    local stopping = false
    local function stop(signame)
      if stopping then return end
      stopping = true
      log.info("received " .. signame)
      sched.wake(main)
    end
    sys.on_signal("SIGTERM", stop)
    sys.on_signal("SIGINT", stop)
    sys.on_signal("SIGHUP", function()
      local rok, cfg = pcall(load, opts)
      if rok then serve.reload(ctx, cfg) else log.error("config not reloaded: " .. failure.message(cfg)) end
    end)
    while not stopping do sched.suspend() end
    serve.stop(ctx)
    sys.on_signal("SIGTERM", nil)
    sys.on_signal("SIGINT", nil)
    sys.on_signal("SIGHUP", nil)
    return 0
  end)
  if not ok then
    io.stderr:write("opsrun serve: ", failure.message(code), "\n")
    return 1
  end
  return code
end

return M
