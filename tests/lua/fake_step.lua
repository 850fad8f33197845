-- A step double for driver specs: records every command instead of running it, and
-- answers from a script of canned results. The real step is ops.deploy.step.
--   local step = fake_step.new{tool = "helm", config = {cli = {...}, options = {...}},
--                              results = {["helm history"] = {ok = true, code = 0, stdout = "[]"}}}
--   driver:deploy(step); assert.are.same({...}, step.commands)
local fake = {}

local Step = {}
Step.__index = Step

local function key_of(argv)
  return table.concat(argv, " ")
end

function fake.new(o)
  local s = setmetatable({
    id = (o.env or "test") .. "/" .. (o.folder or o.tool),
    env = o.env or "test",
    tool = o.tool,
    folder = o.folder or o.tool,
    dir = o.dir or "/work/test/" .. (o.folder or o.tool),
    env_dir = o.env_dir or "/work/test",
    repo = o.repo or "/repo",
    workdir = o.workdir or "/work",
    config = o.config or {cli = {}, options = {}},
    config_file = (o.env or "test") .. "/" .. (o.folder or o.tool) .. "/bitops.config.yaml",
    dry_run = o.dry_run or false,
    vars = o.vars or {},
    outputs = o.outputs or {},
    commands = {}, -- every argv run, as "a b c" strings
    runs = {},     -- every {argv, opts}
    results = o.results or {}, -- prefix of "a b c" -> result table, or function(argv, opts) -> result
    secrets = {},
    files = {},
  }, Step)
  s.log = {
    lines = {},
    info = function(msg) s.log.lines[#s.log.lines + 1] = "info: " .. tostring(msg) end,
    warn = function(msg) s.log.lines[#s.log.lines + 1] = "warn: " .. tostring(msg) end,
    error = function(msg) s.log.lines[#s.log.lines + 1] = "error: " .. tostring(msg) end,
    debug = function() end,
  }
  return s
end

function Step:run(argv, opts)
  local k = key_of(argv)
  self.commands[#self.commands + 1] = k
  self.runs[#self.runs + 1] = {argv = argv, opts = opts or {}}
  -- the longest matching prefix wins
  local best, best_len = nil, -1
  for prefix, r in pairs(self.results) do
    if k:sub(1, #prefix) == prefix and #prefix > best_len then best, best_len = r, #prefix end
  end
  if type(best) == "function" then best = best(argv, opts) end
  return best or {ok = true, code = 0, stdout = "", stderr = ""}
end

function Step:check(argv, opts)
  local r = self:run(argv, opts)
  if not r.ok then
    self:fail(string.format("%s failed (exit %s): %s", argv[1] .. (argv[2] and (" " .. argv[2]) or ""),
      tostring(r.code), r.stderr or ""))
  end
  return r
end

function Step:fail(msg)
  error({step_failure = true, message = msg}, 0)
end

-- how messages show a path: the real step's rule
Step.shown = require("ops.deploy.step").shown

function Step:path(rel)
  assert(not rel:find("%.%."), "fake step: path escapes: " .. rel)
  return self.dir .. "/" .. rel
end

function Step:private_file(name, content)
  local path = "/private/" .. name
  self.files[path] = content
  return path
end

function Step:secret(v)
  self.secrets[#self.secrets + 1] = v
  return v
end

function Step:export(name, value)
  self.exports = self.exports or {}
  self.exports[name] = tostring(value)
end

return fake
