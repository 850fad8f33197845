-- tools.terraform: the Terraform driver, configured as BitOps' terraform plugin is
-- (docs/parts/terraform.md). Stages: action, version, init, workspace, plan, apply, destroy,
-- outputs; deploy runs them for the stack-action (plan, apply or destroy). Each is a method a
-- repo may override in .opsrun/tools/terraform.lua (docs/drivers.md).
local json = require "ops.json"

local M = {}

local ACTIONS = {"plan", "apply", "destroy"}

-- Based on bitops-plugins/terraform bitops.schema.yaml; the differences are in
-- docs/parts/terraform.md.
M.schema = {
  cli = {
    ["var-file"] = {type = "list", export_env = "TF_VAR_FILE"},
    target = {type = "list", export_env = "TF_TARGET"},
    ["backend-config"] = {type = "list"},
    upgrade = {type = "boolean", default = false, export_env = "TERRAFORM_INIT_UPGRADE"},
    -- the BitOps plugin's README puts stack-action here, its schema under options
    ["stack-action"] = {type = "string", enum = ACTIONS},
  },
  options = {
    ["stack-action"] = {type = "string", enum = ACTIONS, export_env = "TERRAFORM_COMMAND"},
    workspace = {type = "string", export_env = "TERRAFORM_WORKSPACE"},
    version = {type = "string", export_env = "TERRAFORM_VERSION"},
    ["skip-deploy"] = {type = "boolean", export_env = "TERRAFORM_SKIP_DEPLOY"},
  },
}

local function append(argv, extra)
  for _, a in ipairs(extra) do argv[#argv + 1] = a end
  return argv
end

--- action(step) -> "plan" | "apply" | "destroy": options.stack-action, else cli.stack-action,
--- else plan. options wins because TERRAFORM_COMMAND (which BitOps pipelines export) lands
--- there, and a variable must beat the file.
function M:action(step)
  local o, c = step.config.options["stack-action"], step.config.cli["stack-action"]
  if o and c and o ~= c then
    step.log.warn(string.format("options.stack-action is %s and cli.stack-action is %s: running %s "
      .. "(options wins; remove one of them) (%s)", o, c, o, step.config_file))
  end
  return o or c or "plan"
end

--- plan_flags(step) -> {"-var-file=F", ..., "-target=T", ...} for plan, apply and destroy
function M:plan_flags(step)
  local flags = {}
  for _, f in ipairs(step.config.cli["var-file"] or {}) do flags[#flags + 1] = "-var-file=" .. f end
  for _, t in ipairs(step.config.cli.target or {}) do flags[#flags + 1] = "-target=" .. t end
  return flags
end

local function installed_version(step)
  local r = step:check({"terraform", "version", "-json"}, {quiet = true})
  local info = json.decode(r.stdout)
  if type(info) == "table" and type(info.terraform_version) == "string" then return info.terraform_version end
  -- terraform before 0.13 has no -json and prints "Terraform v0.12.29"
  return r.stdout:match("v(%d+%.%d+%.%d+)")
end

--- version(step): with options.version, the terraform on PATH must be that version; "1.5"
--- matches 1.5.0 and 1.5.7, not 1.50.0. Not checked in a dry run, which runs nothing.
function M:version(step)
  local want = step.config.options.version
  if not want or want == "" or step.dry_run then return end
  local w = want:gsub("^v", "")
  if not w:match("^%d+[%.%d]*$") or w:match("%.%.") or w:match("%.$") then
    step:fail(string.format("options.version must be a version such as 1.5 or 1.5.7, not '%s' (%s)",
      want, step.config_file))
  end
  local have = installed_version(step)
  if not have then step:fail("cannot tell terraform's version from `terraform version -json`") end
  if have ~= w and have:sub(1, #w + 1) ~= w .. "." then
    step:fail(string.format("terraform %s is installed, but options.version asks for %s (%s): put "
      .. "terraform %s first on PATH, or change options.version", have, want, step.config_file, w))
  end
end

function M:init(step)
  local argv = {"terraform", "init", "-input=false"}
  if step.config.cli.upgrade then argv[#argv + 1] = "-upgrade" end
  for _, b in ipairs(step.config.cli["backend-config"] or {}) do argv[#argv + 1] = "-backend-config=" .. b end
  step:check(argv)
end

--- workspace(step): select options.workspace, or create it when select fails (it does not exist)
function M:workspace(step)
  local ws = step.config.options.workspace
  if not ws or ws == "" then return end
  if ws:sub(1, 1) == "-" then -- an argument, not an option: terraform would take it for one
    step:fail(string.format("options.workspace %q starts with '-', which terraform would read as an option (%s)",
      ws, step.config_file))
  end
  local r = step:run({"terraform", "workspace", "select", ws})
  if r.ok then return end
  step:check({"terraform", "workspace", "new", ws})
end

function M:plan(step, destroy)
  local argv = {"terraform", "plan", "-input=false"}
  if destroy then argv[#argv + 1] = "-destroy" end
  step:check(append(argv, self:plan_flags(step)))
end

function M:apply(step)
  step:check(append({"terraform", "apply", "-input=false", "-auto-approve"}, self:plan_flags(step)))
end

function M:destroy(step)
  step:check(append({"terraform", "destroy", "-input=false", "-auto-approve"}, self:plan_flags(step)))
end

local function output_string(v)
  if type(v) == "string" then return v end
  if type(v) == "number" or type(v) == "boolean" then return tostring(v) end
  return json.encode(v) or ""
end

-- Masks every string inside a sensitive value.
local function hide(step, v)
  if type(v) == "string" then
    step:secret(v)
  elseif type(v) == "table" then
    for _, item in pairs(v) do hide(step, item) end
  end
end

--- outputs(step): `terraform output -json` into step.outputs.terraform.<name> (decoded) and,
--- for this step's after-hooks and every later step, TF_OUTPUT_<NAME> (strings as they are,
--- numbers and booleans as text, lists and maps as JSON). Sensitive values are masked.
function M:outputs(step)
  local r = step:check({"terraform", "output", "-json"}, {quiet = true})
  if r.dry_run or r.stdout:match("^%s*$") then return end
  local outs, err = json.decode(r.stdout, "terraform output -json")
  if type(outs) ~= "table" then step:fail("cannot read `terraform output -json`: " .. tostring(err)) end
  step.outputs.terraform = step.outputs.terraform or {}
  for name, o in pairs(outs) do
    if type(o) ~= "table" or o.value == nil then
      step:fail("cannot read `terraform output -json`: output " .. tostring(name) .. " has no value")
    end
    local value = o.value
    local text = output_string(value)
    if o.sensitive == true then
      hide(step, value)
      if type(value) ~= "string" then step:secret(text) end
    end
    step.outputs.terraform[name] = value
    local var = "TF_OUTPUT_" .. name:upper():gsub("[^%w]", "_")
    if text:find("\0", 1, true) then -- kept for Lua (step.outputs), but no variable can carry it
      step.log.warn(string.format("output %s holds a NUL byte: %s is not set (Lua hooks and overrides "
        .. "have it as step.outputs.terraform[%q])", name, var, name))
    else
      step:export(var, text)
    end
  end
end

function M:deploy(step)
  local action = self:action(step)
  -- the action as it was resolved, for the after-hooks (BitOps exported its default too)
  step.vars.TERRAFORM_COMMAND = action
  self:version(step)
  self:init(step)
  self:workspace(step)
  if action == "plan" then
    self:plan(step)
  elseif action == "apply" then
    self:plan(step)
    self:apply(step)
    self:outputs(step)
  elseif action == "destroy" then
    self:plan(step, true)
    self:destroy(step)
  else
    step:fail(string.format("stack-action must be one of plan, apply, destroy, not '%s' (%s)",
      tostring(action), step.config_file))
  end
end

return M
