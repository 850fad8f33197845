-- tools.ansible: the Ansible driver, configured as BitOps' ansible plugin is
-- (docs/parts/ansible.md). Stages: environment (the extra_env file), playbooks, flags,
-- run_env, playbook; deploy runs ansible-playbook for each playbook in order. Each is a
-- method a repo may override in .opsrun/tools/ansible.lua (docs/drivers.md).
local fs = require "ops.fs"
local yaml = require "ops.yaml"

local M = {}

-- Based on bitops-plugins/ansible bitops.schema.yaml; the differences are in
-- docs/parts/ansible.md.
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
    -- newer BitOps schemas put dryrun under cli:, older ones under options:
    dryrun = {type = "boolean"},
  },
  options = {
    dryrun = {type = "boolean", default = false, export_env = "ANSIBLE_DRYRUN"},
    ["skip-deploy"] = {type = "boolean", export_env = "ANSIBLE_SKIP_DEPLOY"},
    -- no export_env: ANSIBLE_VERBOSITY is ansible's own variable and passes through as it is,
    -- while this key, when set, overrides it (as BitOps documents)
    verbosity = {type = "number"},
  },
}

-- One line of an extra_env file -> key, value | nil (blank or comment) | false, why.
-- The forms bash's `source` reads the same way: [export] KEY=value, KEY="value" (with \" \\
-- \$ \` escapes), KEY='value', a # comment after the value. Nothing is expanded.
local function env_line(line)
  local body = line:gsub("^%s+", "")
  if body == "" or body:sub(1, 1) == "#" then return nil end
  body = body:gsub("^export%s+", "")
  local key, rest = body:match("^([%a_][%w_]*)=(.*)$")
  if not key then return false, "expected KEY=VALUE" end
  if rest:find("\0", 1, true) then return false, "the value holds a NUL byte, which no variable can carry" end
  local value
  local quote = rest:sub(1, 1)
  if quote == '"' then
    local out, i = {}, 2
    while true do
      local c = rest:sub(i, i)
      if c == "" then return false, "the double quote is not closed" end
      if c == '"' then break end
      local nextc = rest:sub(i + 1, i + 1)
      if c == "\\" and nextc:match('["\\$`]') then
        out[#out + 1] = nextc
        i = i + 2
      else
        out[#out + 1] = c
        i = i + 1
      end
    end
    value, rest = table.concat(out), rest:sub(i + 1)
  elseif quote == "'" then
    local close = rest:find("'", 2, true)
    if not close then return false, "the single quote is not closed" end
    value, rest = rest:sub(2, close - 1), rest:sub(close + 1)
  else
    value, rest = rest:match("^(%S*)(.*)$")
  end
  if not rest:match("^%s*$") and not rest:match("^%s+#") then
    return false, "unexpected text after the value (quote a value that has spaces)"
  end
  return key, value
end

--- environment(step): the variables of the folder's extra_env file join step.vars, so
--- ansible-playbook and the after-hooks see them
function M:environment(step)
  local path = fs.join(step.dir, "extra_env")
  if not fs.exists(path) then return end
  local text, err = fs.read(path)
  if not text then step:fail("cannot read " .. step.id .. "/extra_env: " .. err) end
  local n = 0
  for line in (text .. "\n"):gmatch("(.-)\r?\n") do
    n = n + 1
    local key, value = env_line(line)
    if key == false then
      step:fail(string.format("%s/extra_env:%d: %s, got %q (write KEY=value, KEY=\"value\" or "
        .. "export KEY=value)", step.id, n, value, line))
    elseif key then
      step.vars[key] = value
    end
  end
end

local PLAY_KEYS = {"hosts", "import_playbook", "ansible.builtin.import_playbook"}

local function is_list(t)
  if type(t) ~= "table" or #t == 0 then return false end
  for k in pairs(t) do
    if math.type(k) ~= "integer" then return false end
  end
  return true
end

-- A playbook is a YAML list of plays; a play is a mapping with hosts: (or an import_playbook:).
-- Vars files, inventories and requirements.yml are not.
local function is_playbook(step, name)
  local doc, err = yaml.load_file(fs.join(step.dir, name))
  if doc == nil then
    step:fail(string.format("%s/%s is not valid YAML: %s (fix it, or name the playbooks to run in "
      .. "cli.main-playbook)", step.id, name, err))
  end
  if not is_list(doc) then return false end
  for _, play in ipairs(doc) do
    if type(play) ~= "table" or is_list(play) then return false end
    local found = false
    for _, k in ipairs(PLAY_KEYS) do
      if play[k] ~= nil then found = true end
    end
    if not found then return false end
  end
  return true
end

--- playbooks(step) -> names relative to step.dir: cli.main-playbook (one or a list), else
--- every *.yaml/*.yml playbook of the folder in name order
function M:playbooks(step)
  local named = step.config.cli["main-playbook"]
  if named and #named > 0 then
    for _, p in ipairs(named) do
      if p:sub(1, 1) == "-" then -- ansible-playbook would read it as an option
        step:fail(string.format("cli.main-playbook %s starts with '-': name the file ./%s (%s)", p, p, step.config_file))
      end
      local st = fs.stat(step:path(p, "cli.main-playbook"))
      if not st or st.type ~= "file" then
        step:fail(string.format("cli.main-playbook names %s, which is not a file in %s (%s)", p, step.id,
          step.config_file))
      end
    end
    return named
  end
  local out = {}
  for _, name in ipairs(assert(fs.list(step.dir))) do
    if name:match("%.ya?ml$") and name:sub(1, 1) ~= "." and name:sub(1, 1) ~= "-"
        and not name:match("^bitops%.config%.ya?ml$")
        and fs.type(fs.join(step.dir, name)) == "file" and is_playbook(step, name) then
      out[#out + 1] = name
    end
  end
  if #out == 0 then
    step:fail("no playbook in " .. step.id .. " (a .yaml file holding a list of plays), and no "
      .. "cli.main-playbook (" .. step.config_file .. ")")
  end
  return out
end

--- flags(step) -> the ansible-playbook flags of the config, the same for every playbook
function M:flags(step)
  local c, o = step.config.cli, step.config.options
  local f = {}
  local function add(...) for _, a in ipairs({...}) do f[#f + 1] = a end end
  if c.inventory then add("--inventory", c.inventory) end
  for _, v in ipairs(c["extra-vars"] or {}) do add("--extra-vars", v) end
  if c.tags then add("--tags", c.tags) end
  if c["skip-tags"] then add("--skip-tags", c["skip-tags"]) end
  if c.forks then
    local n = math.tointeger(c.forks)
    if not n or n < 1 then
      step:fail(string.format("cli.forks must be a whole number of at least 1, not %s (%s)",
        tostring(c.forks), step.config_file))
    end
    add("--forks", tostring(n))
  end
  if c["flush-cache"] then add("--flush-cache") end
  if c["force-handlers"] then add("--force-handlers") end
  if o.dryrun or c.dryrun then add("--check") end
  return f
end

--- run_env(step) -> variables for ansible-playbook alone: ANSIBLE_VERBOSITY from
--- options.verbosity, which then wins over one in the environment or extra_env
function M:run_env(step)
  local v = step.config.options.verbosity
  if v == nil then return nil end
  local n = math.tointeger(v)
  if not n or n < 0 or n > 6 then
    step:fail(string.format("options.verbosity must be a whole number from 0 to 6 (the number of -v), "
      .. "not %s (%s)", tostring(v), step.config_file))
  end
  return {ANSIBLE_VERBOSITY = tostring(n)}
end

function M:playbook(step, playbook)
  local argv = {"ansible-playbook", playbook}
  for _, a in ipairs(self:flags(step)) do argv[#argv + 1] = a end
  step:check(argv, {env = self:run_env(step)})
end

function M:deploy(step)
  self:environment(step)
  for _, p in ipairs(self:playbooks(step)) do self:playbook(step, p) end
end

return M
