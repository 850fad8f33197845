-- tools.runs: `opsrun runs`, the history of deploys kept in the store.
local history = require "ops.deploy.history"
local failure = require "ops.deploy.failure"
local time = require "ops.time"
local split_option = require("opsrun.cli").split_option

local M = {}

M.USAGE = [==[
usage: opsrun runs [--store PATH] [--limit N]     the latest runs, newest first
       opsrun runs show ID [--store PATH]         one run: its steps, exit codes, log tails
]==]

local when = time.stamp

function M.main(args)
  local store, limit, show
  local function usage(msg)
    io.stderr:write("opsrun runs: ", msg, "\n", M.USAGE)
    return 2
  end
  local i = 1
  while i <= (args.n or #args) do
    split_option(args, i) -- --store=PATH, --limit=N
    local a, v = args[i], args[i + 1]
    if a == "-h" or a == "--help" then io.stdout:write(M.USAGE); return 0
    elseif a == "--store" or a == "--limit" or a == "show" then
      if v == nil or v == "" then
        return usage(a == "show" and "show needs a run ID (opsrun runs lists them)" or a .. " needs a value")
      end
      if a == "--store" then store = v
      elseif a == "--limit" then
        limit = math.tointeger(tonumber(v))
        if not limit or limit < 1 then return usage("--limit needs a whole number of at least 1, not " .. v) end
      else
        show = v:match("^%d+$") and math.tointeger(tonumber(v))
        if not show then return usage("show: ID must be a run number, not " .. v) end
      end
      i = i + 2
    else
      return usage("unknown argument " .. a)
    end
  end
  local ok, db = pcall(history.open, store)
  if not ok then
    io.stderr:write("opsrun runs: ", failure.message(db), "\n")
    return 1
  end
  pcall(history.reap, db) -- a run whose process is gone is shown as interrupted, not running
  if show then
    local run = history.run(db, show)
    if not run then
      io.stderr:write("opsrun runs: no run ", show, "\n")
      return 1
    end
    print(string.format("run %d  %s  started %s  finished %s", run.id, run.status, when(run.started), when(run.finished)))
    print(string.format("repo %s  revision %s  environments %s", run.repo or "-", run.revision or "-", run.envs or "-"))
    if run.delivery then print("delivery " .. run.delivery) end
    if run.error and run.error ~= "" then print("error " .. run.error) end
    if run.args and run.args ~= "" then print("args " .. run.args) end
    for _, s in ipairs(run.steps) do
      print(string.format("\n%s  %s  exit %s  %.1fs", s.id, s.status, s.code and tostring(s.code) or "-", s.duration or 0))
      if s.error then print("  error: " .. s.error) end
      if s.log_tail and s.log_tail ~= "" then
        for line in s.log_tail:gmatch("[^\n]+") do print("  | " .. line) end
      end
    end
    return 0
  end
  print(string.format("%5s  %-11s  %-19s  %8s  %s", "run", "status", "started", "duration", "environments"))
  for _, r in ipairs(history.runs(db, limit or 20)) do
    local d = r.finished and string.format("%7.1fs", r.finished - r.started) or "-"
    print(string.format("%5d  %-11s  %-19s  %8s  %s", r.id, r.status, when(r.started), d, r.envs or ""))
  end
  return 0
end

return M
