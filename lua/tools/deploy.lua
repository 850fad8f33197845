-- tools.deploy: `opsrun deploy`, the main job.
local deploy = require "ops.deploy"
local sys = require "ops.sys"
local split_option = require("opsrun.cli").split_option

local M = {}

M.USAGE = [==[
usage: opsrun deploy [options]

Deploys environments of an operations repo (BitOps layout): each tool folder of the
environment (terraform/, ansible/, helm/, cloudformation/, or bitops.deployments) runs
its lifecycle with its before/after hooks.

options:
  --env NAME          an environment to deploy (repeat, or NAME,NAME); default:
                      BITOPS_ENVIRONMENT, then ENVIRONMENT
  --all               every environment of the repo
  --repo DIR          the operations repo (default: the current directory)
  --jobs N            steps run at once, across environments (default 4)
  --keep-going        after a failure, go on with the steps that do not need it
  --fail-fast         stop starting steps after the first failure (the default)
  --dry-run           print every command with its folder and environment; run nothing
  --only STEP         only these steps (ENV/FOLDER, FOLDER, TOOL or ENV; repeatable)
  --skip STEP         not these steps (same forms; repeatable)
  --changed-since REV only the environments whose files (or _default's) changed since
                      REV (git diff, uncommitted and untracked files included); without
                      --env, any environment of the repo
  --timeout SECONDS   stop any single command that runs longer
  --store PATH        the state store (default $OPSRUN_STORE or ~/.local/state/opsrun/opsrun.db)
  -h, --help          this text

exit status: 0 all steps succeeded or were skipped, 1 a step failed or a setting is
wrong, 2 usage error, 130/143 interrupted by SIGINT/SIGTERM.
]==]

local function usage_error(msg)
  io.stderr:write("opsrun deploy: ", msg, "\n", M.USAGE)
  return 2
end

local function split(list, value)
  for item in value:gmatch("[^,]+") do list[#list + 1] = item end
end

--- M.main(args, cli) -> exit code
function M.main(args, cli)
  local opts = {envs = {}, only = {}, skip = {}, repo = cli and cli.repo or "."}
  local all = false
  local i = 1
  local function value(flag)
    local v = args[i + 1]
    if v == nil then return nil, usage_error(flag .. " needs a value") end
    i = i + 2
    return v
  end
  while i <= (args.n or #args) do
    split_option(args, i) -- --opt=VALUE
    local a = args[i]
    local v, err
    if a == "--env" then
      v, err = value(a); if not v then return err end
      split(opts.envs, v)
    elseif a == "--all" then all = true; i = i + 1
    elseif a == "--repo" then
      v, err = value(a); if not v then return err end
      opts.repo = v -- (its .opsrun/ overrides were set by opsrun.cli before this module loaded)
    elseif a == "--jobs" or a == "-j" then
      v, err = value(a); if not v then return err end
      opts.jobs = math.tointeger(tonumber(v))
      if not opts.jobs or opts.jobs < 1 then return usage_error("--jobs needs a whole number of at least 1") end
    elseif a == "--keep-going" then opts.fail_fast = false; i = i + 1
    elseif a == "--fail-fast" then opts.fail_fast = true; i = i + 1
    elseif a == "--dry-run" then opts.dry_run = true; i = i + 1
    elseif a == "--only" then
      v, err = value(a); if not v then return err end
      split(opts.only, v)
    elseif a == "--skip" then
      v, err = value(a); if not v then return err end
      split(opts.skip, v)
    elseif a == "--changed-since" then
      v, err = value(a); if not v then return err end
      opts.changed_since = v
    elseif a == "--timeout" then
      v, err = value(a); if not v then return err end
      opts.timeout = tonumber(v)
      if not opts.timeout or opts.timeout <= 0 then return usage_error("--timeout needs a number of seconds") end
    elseif a == "--store" then
      v, err = value(a); if not v then return err end
      opts.store = v
    elseif a == "-h" or a == "--help" then
      io.stdout:write(M.USAGE)
      return 0
    else
      return usage_error("unknown argument " .. a)
    end
  end
  if all then
    local fs = require "ops.fs"
    local real = fs.realpath(opts.repo)
    if not real then return usage_error("--repo " .. opts.repo .. ": no such folder") end
    opts.envs = deploy.repo.environments(real)
  elseif #opts.envs == 0 then
    local from_env = sys.getenv("BITOPS_ENVIRONMENT") or sys.getenv("ENVIRONMENT")
    if from_env and from_env ~= "" then split(opts.envs, from_env) end
  end
  if #opts.envs == 0 and opts.changed_since then opts.envs = nil end
  local parts = {}
  for k = 1, (args.n or #args) do parts[#parts + 1] = args[k] end
  opts.args = table.concat(parts, " ")
  return (deploy.run(opts))
end

return M
