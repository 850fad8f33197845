-- tools.serve: `opsrun serve`, the push-to-deploy webhook receiver.
local fs = require "ops.fs"
local log = require "ops.log"
local sys = require "ops.sys"
local sched = require "ops.core.sched"
local failure = require "ops.deploy.failure"
local time = require "ops.time"

local M = {}

M.USAGE = [==[
usage: opsrun serve [--config FILE] [--listen ADDR] [--jobs N] [--store PATH]
       opsrun serve status [--config FILE] [--store PATH]

Receives GitHub, GitLab and Gitea push webhooks at POST /hooks/<name>, verifies them,
stores them, answers 202, and deploys what each push changed. GET /healthz and
GET /metrics (Prometheus). SIGTERM/SIGINT: stop accepting, finish or hand back the work
in flight, exit 0. SIGHUP: reload the config (hooks, secrets, notify). The deliveries,
their outcomes and the runs they started are in the store: `opsrun serve status`,
`opsrun runs`. Reference: docs/serve.md.

options:
  --config FILE   the config (default: opsrun-serve.yaml, else serve.lua, in the current folder)
  --listen ADDR   override listen: (127.0.0.1:8080, [::1]:0, unix:/path)
  --jobs N        override jobs: (targets deployed at once)
  --store PATH    override store:

status: is the server answering (its /healthz), deliveries waiting, being deployed, dead,
the latest outcomes and runs. Reads the config without its secrets.
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

local function load(opts, load_opts)
  local cfg = require("ops.serve.config").load(opts.config, load_opts)
  if opts.listen then cfg.listen = opts.listen end
  if opts.jobs then cfg.jobs = opts.jobs end
  if opts.store then cfg.store = opts.store end
  return cfg
end

local when = time.stamp

-- `opsrun serve status`: the server's health (when the config says where it listens),
-- the queue, the latest deliveries with their outcome and run, the latest runs.
local function status(opts)
  local history = require "ops.deploy.history"
  local cfg = opts.config and load(opts, {secrets = false}) or nil
  local store_path = opts.store or (cfg and cfg.store) or history.default_path()
  if cfg and cfg.listen:match("^[%d%.]+:%d+$") or cfg and cfg.listen:match("^%[.*%]:%d+$") then
    local url = "http://" .. cfg.listen:gsub("^0%.0%.0%.0:", "127.0.0.1:"):gsub("^%[::%]:", "[::1]:") .. "/healthz"
    local r, err = require("ops.http").get(url, {timeout = 3, connect_timeout = 2})
    if r then
      print(string.format("server: %s answers %d %s", cfg.listen, r.status, (r.body or ""):gsub("%s+$", "")))
    else
      print("server: not answering on " .. cfg.listen .. " (" .. tostring(err) .. ")")
    end
  end
  if not fs.exists(store_path) then
    print("store: " .. store_path .. " does not exist yet (nothing received)")
    return 0
  end
  local db = history.open(store_path)
  local q = assert(db:queue("deliveries"))
  local st = q:stats()
  print(string.format("store: %s\ndeliveries: %d waiting, %d being deployed, %d done, %d dead",
    store_path, st.ready or 0, st.leased or 0, st.done or 0, st.dead or 0))
  for _, r in ipairs(db:query("SELECT id, kind, state, attempts, last_error, key FROM ops_queue "
      .. "WHERE queue = 'deliveries' AND state IN ('ready', 'leased', 'dead') ORDER BY id LIMIT 20")) do
    print(string.format("  #%d %s %s (attempts %d)%s", r.id, r.key or r.kind, r.state, r.attempts or 0,
      r.last_error and (": " .. r.last_error) or ""))
  end
  local have_outcomes = db:query("SELECT 1 AS x FROM sqlite_master WHERE name = 'serve_outcomes'")[1]
  if have_outcomes then
    print("\nlatest deliveries:")
    for _, r in ipairs(db:query("SELECT * FROM serve_outcomes ORDER BY id DESC LIMIT 10")) do
      print(string.format("  %s  %-10s %-38s %-11s commit %s%s", when(r.finished), r.hook, r.delivery, r.status,
        r.commit_id and r.commit_id:sub(1, 12) or "-", r.run_id and ("  run " .. r.run_id) or ""))
    end
    for _, r in ipairs(db:query("SELECT * FROM serve_targets ORDER BY hook")) do
      print(string.format("  hook %s: last processed commit %s at %s", r.hook, r.commit_id, when(r.at)))
    end
  end
  print("\nlatest runs (opsrun runs show RUN):")
  for _, r in ipairs(history.runs(db, 10)) do
    print(string.format("  run %d %-11s %-20s %s delivery %s", r.id, r.status, r.envs or "",
      r.revision and r.revision:sub(1, 12) or "-", r.delivery or "-"))
  end
  db:close()
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
      if rok then
        serve.reload(ctx, cfg)
      else
        log.error("config not reloaded, the previous one stays: " .. failure.message(cfg))
      end
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
