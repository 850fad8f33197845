-- tools.ansible: the Ansible driver. Stages: environment (the extra_env file), playbooks,
-- flags, playbook; deploy runs ansible-playbook for each playbook in order.
local fs = require "ops.fs"
local yaml = require "ops.yaml"

local M = {}

M.schema = {
  cli = {
    ["main-playbook"] = {type = "list", export_env = "ANSIBLE_MAIN_SCRIPT"},
    inventory = {type = "string", export_env = "ANSIBLE_INVENTORY"},
    ["extra-vars"] = {type = "list", export_env = "ANSIBLE_EXTRA_VARS"},
    tags = {type = "string", export_env = "ANSIBLE_TAGS"},
    ["skip-tags"] = {type = "string", export_env = "ANSIBLE_SKIP_TAGS"},
    forks = {type = "number", export_env = "ANSIBLE_FORKS"},
    ["flush-cache"] = {type = "boolean", export_env = "ANSIBLE_FLUSH_CACHE"},
    ["force-handlers"] = {type = "boolean", export_env = "ANSIBLE_FORCE_HANDLERS"},
  },
  options = {
    dryrun = {type = "boolean", default = false, export_env = "ANSIBLE_DRYRUN"},
    ["skip-deploy"] = {type = "boolean", export_env = "ANSIBLE_SKIP_DEPLOY"},
    verbosity = {type = "number"},
  },
}

--- environment: KEY=VALUE lines of the folder's extra_env file join the step's variables
function M:environment(step)
  local path = fs.join(step.dir, "extra_env")
  if not fs.exists(path) then return end
  local text, err = fs.read(path)
  if not text then step:fail("cannot read " .. step.id .. "/extra_env: " .. err) end
  local n = 0
  for line in text:gmatch("[^\n]+") do
    n = n + 1
    line = line:gsub("\r$", "")
    if not line:match("^%s*#") and not line:match("^%s*$") then
      local k, v = line:match("^%s*export%s+([%a_][%w_]*)=(.*)$")
      if not k then k, v = line:match("^%s*([%a_][%w_]*)=(.*)$") end
      if not k then step:fail(string.format("%s/extra_env:%d: expected KEY=VALUE, got %q", step.id, n, line)) end
      v = v:match('^"(.*)"$') or v:match("^'(.*)'$") or v
      step.vars[k] = v
    end
  end
end

local function is_playbook(path)
  local doc = yaml.load_file(path)
  return type(doc) == "table" and #doc > 0
end

--- playbooks: cli.main-playbook (one or a list), else every *.yaml/*.yml playbook of the
--- folder (a YAML list of plays) in name order
function M:playbooks(step)
  local named = step.config.cli["main-playbook"]
  if named and #named > 0 then
    local out = {}
    for _, p in ipairs(named) do
      local abs = step:path(p)
      if not fs.exists(abs) then
        step:fail(string.format("cli.main-playbook names %s, which is not in %s (%s)", p, step.id, step.config_file))
      end
      out[#out + 1] = p
    end
    return out
  end
  local out = {}
  for _, name in ipairs(assert(fs.list(step.dir))) do
    if name:match("%.ya?ml$") and not name:match("^bitops%.config%.ya?ml$") and is_playbook(fs.join(step.dir, name)) then
      out[#out + 1] = name
    end
  end
  if #out == 0 then step:fail("no playbook in " .. step.id .. " (a .yaml file holding a list of plays), and no cli.main-playbook") end
  return out
end

function M:flags(step)
  local c, o = step.config.cli, step.config.options
  local f = {}
  if c.inventory then f[#f + 1] = "--inventory"; f[#f + 1] = c.inventory end
  for _, v in ipairs(c["extra-vars"] or {}) do f[#f + 1] = "--extra-vars"; f[#f + 1] = v end
  if c.tags then f[#f + 1] = "--tags"; f[#f + 1] = c.tags end
  if c["skip-tags"] then f[#f + 1] = "--skip-tags"; f[#f + 1] = c["skip-tags"] end
  if c.forks then f[#f + 1] = "--forks"; f[#f + 1] = tostring(math.tointeger(c.forks) or c.forks) end
  if c["flush-cache"] then f[#f + 1] = "--flush-cache" end
  if c["force-handlers"] then f[#f + 1] = "--force-handlers" end
  if o.dryrun then f[#f + 1] = "--check" end
  if o.verbosity and o.verbosity > 0 then f[#f + 1] = "-" .. string.rep("v", math.min(6, math.floor(o.verbosity))) end
  return f
end

function M:playbook(step, playbook)
  local argv = {"ansible-playbook", playbook}
  for _, a in ipairs(self:flags(step)) do argv[#argv + 1] = a end
  step:check(argv)
end

function M:deploy(step)
  self:environment(step)
  for _, p in ipairs(self:playbooks(step)) do self:playbook(step, p) end
end

return M
