-- opsrun.cli: the command line. main() runs as the main task; finish() turns its
-- outcome into the exit code once the loop has nothing left to do.
local modules = require "ops.core.modules"
local sys = require "ops.core.sys"

local cli = {}

local VERSION = "0.1.0"

local USAGE = [==[
usage: opsrun [options] SCRIPT.lua [args...]   run a Lua script (it gets `arg` and `...`)
       opsrun [options] -e CODE [SCRIPT.lua [args...]]
       opsrun [options] COMMAND [args...]

commands:
  deploy [options]   deploy environments of an operations repo (opsrun deploy --help)
  runs [show ID]     the history of deploys
  serve [options]    the push-to-deploy webhook receiver (opsrun serve --help)
  which MODULE       where `require "MODULE"` would load it from
  help               this text

options:
  -e CODE            run CODE (before SCRIPT, if one is given)
  --repo DIR         the operations repo (default: the current directory); its
                     .opsrun/ folder overrides built-in modules
  --log-format FMT   text (default) or json (also OPSRUN_LOG_FORMAT)
  --log-level LEVEL  debug, info (default), warn, error (also OPSRUN_LOG_LEVEL)
  -v, --version      print the version
  -h, --help         print this help

environment:
  OPSRUN_PATH        more folders searched for modules, after the repo's .opsrun/
  OPSRUN_LUA_DIR     load built-in modules from this source tree (development)
  NO_COLOR           no colour in log output
]==]

local commands = {}

-- Commands written as modules (lua/tools/<name>.lua, overridable like any module):
-- each has main(args, cli) -> exit code.
local MODULE_COMMANDS = {deploy = "tools.deploy", runs = "tools.runs", serve = "tools.serve"}
for name, mod in pairs(MODULE_COMMANDS) do
  commands[name] = function(args) return require(mod).main(args, cli) end
end

local function usage_error(msg)
  io.stderr:write("opsrun: ", msg, "\n", USAGE)
  return 2
end

--- cli.split_option(args, i) : args[i] written `--opt=VALUE` becomes `--opt`, `VALUE` (in
--- place: the rest moves up one, args.n with it); any other argument stays as it is. For
--- option loops, at each option, so that a value is never split.
function cli.split_option(args, i)
  local k, v = args[i]:match("^(%-%-[%w-]+)=(.*)$")
  if not k then return end
  local n = args.n or #args
  table.move(args, i + 1, n, i + 2)
  args[i], args[i + 1] = k, v
  if args.n then args.n = n + 1 end
end

--- Sets where overrides come from: DIR/.opsrun, then each OPSRUN_PATH entry.
function cli.set_repo(dir)
  local dirs = {(dir or ".") .. "/.opsrun"}
  for entry in (sys.getenv("OPSRUN_PATH") or ""):gmatch("[^:]+") do
    dirs[#dirs + 1] = entry
  end
  modules.set_override_dirs(dirs)
  cli.repo = dir or "."
end

function commands.which(args)
  local name = args[1]
  if not name or args[2] then return usage_error("which: expected one module name") end
  local kind, where = modules.locate(name)
  if not kind then
    io.stderr:write("opsrun: which: module '", name, "' not found\n")
    return 1
  end
  print(string.format("%s\t%s", kind, where))
  return 0
end

function commands.help()
  io.stdout:write(USAGE)
  return 0
end

local function run_chunk(chunk, chunk_args)
  local results = table.pack(chunk(table.unpack(chunk_args, 1, chunk_args.n)))
  local rc = results[1]
  if math.type(rc) == "integer" then return rc end
  return 0
end

local function load_error(msg)
  io.stderr:write("opsrun: ", msg, "\n")
  return 1
end

--- cli.main(argv) -> exit code ; argv[0] is the program, argv[1..] its arguments
function cli.main(argv)
  cli.set_repo(nil)
  -- modules load on first use: `opsrun -e ''` should cost little more than lua itself
  modules.set_reporter(function(name, path)
    require("ops.log").info("module '" .. name .. "' comes from " .. path .. " (it shadows the built-in)")
  end)
  local codes, i = {}, 1
  argv.n = #argv
  while i <= argv.n do
    cli.split_option(argv, i)
    local a = argv[i]
    if a == "-e" then
      if not argv[i + 1] then return usage_error("-e needs an argument") end
      codes[#codes + 1] = argv[i + 1]
      i = i + 2
    elseif a == "-v" or a == "--version" then
      print("opsrun " .. VERSION .. " (" .. _VERSION .. ")")
      return 0
    elseif a == "-h" or a == "--help" then
      io.stdout:write(USAGE)
      return 0
    elseif a == "--repo" or a == "--log-format" or a == "--log-level" then
      local v = argv[i + 1]
      if not v then return usage_error(a .. " needs an argument") end
      if a == "--repo" then
        cli.set_repo(v)
      else
        local log = require "ops.log"
        local ok, err = pcall(a == "--log-format" and log.set_format or log.set_level, v)
        if not ok then return usage_error(tostring(err):gsub("^.-:%d+: ", "")) end
      end
      i = i + 2
    elseif a == "--" then
      i = i + 1
      break
    elseif a:sub(1, 1) == "-" and a ~= "-" then
      return usage_error("unknown option " .. a)
    else
      break
    end
  end
  _G.ops = require "ops"

  for _, code in ipairs(codes) do
    local chunk, err = load(code, "=(command line)", "t")
    if not chunk then return load_error(err) end
    chunk()
  end

  local first = argv[i]
  if first == nil then
    if #codes > 0 then return 0 end
    return usage_error("nothing to run")
  end
  local rest = table.pack(table.unpack(argv, i + 1, argv.n))

  if commands[first] and not first:find("[./]") then
    -- `opsrun deploy --repo DIR`: DIR's .opsrun/ overrides apply to the deploy, over those of
    -- a --repo before the command; set before tools.deploy and the engine load, so that the
    -- repo may override those too, not only the drivers (which load later)
    if first == "deploy" then
      for k = 1, rest.n do
        local dir = rest[k] == "--repo" and rest[k + 1] or (rest[k] or ""):match("^%-%-repo=(.+)$")
        if dir then cli.set_repo(dir) end
      end
    end
    return commands[first](rest)
  end
  if not first:find("[./]") and not first:match("%.lua$") then
    return usage_error("unknown command '" .. first .. "'")
  end

  -- a script, the way lua(1) runs one
  local script_arg = {[0] = first}
  for k = 1, rest.n do script_arg[k] = rest[k] end
  for k = 0, i - 1 do script_arg[k - i] = argv[k] end
  _G.arg = script_arg
  local chunk, err = loadfile(first, "t")
  if not chunk then return load_error(err) end
  return run_chunk(chunk, rest)
end

--- cli.finish(main_task) -> exit code
function cli.finish(task)
  local status = task:status()
  if status == "done" then
    local _, rc = task:wait()
    return math.type(rc) == "integer" and rc or 0
  elseif status == "failed" then
    task:wait() -- observed: not reported again as lost
    io.stdout:flush()
    io.stderr:write("opsrun: ", task:traceback() or "error", "\n")
    return 1
  elseif status == "cancelled" then
    return 1
  end
  io.stderr:write("opsrun: the main script is still waiting, but nothing is left that could wake it\n")
  return 1
end

return cli
