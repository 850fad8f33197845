-- tools.terraform: the Terraform driver. Stages: version, init, workspace, plan, apply,
-- destroy, outputs; deploy runs them for options.stack-action (plan, apply or destroy).
local json = require "ops.json"

local M = {}

M.schema = {
  cli = {
    ["var-file"] = {type = "list", export_env = "TF_VAR_FILE"},
    target = {type = "list", export_env = "TF_TARGET"},
    ["backend-config"] = {type = "list"},
    upgrade = {type = "boolean", default = false, export_env = "TERRAFORM_INIT_UPGRADE"},
    -- BitOps documents stack-action under cli: in one place and options: in another
    ["stack-action"] = {type = "string", enum = {"plan", "apply", "destroy"}},
  },
  options = {
    ["stack-action"] = {type = "string", enum = {"plan", "apply", "destroy"}, export_env = "TERRAFORM_COMMAND"},
    workspace = {type = "string", export_env = "TERRAFORM_WORKSPACE"},
    version = {type = "string", export_env = "TERRAFORM_VERSION"},
    ["skip-deploy"] = {type = "boolean", export_env = "TERRAFORM_SKIP_DEPLOY"},
  },
}

--- the action: cli.stack-action, else options.stack-action, else "plan" (BitOps' default)
function M:action(step)
  return step.config.cli["stack-action"] or step.config.options["stack-action"] or "plan"
end

-- -var-file=F ... -target=T ... as terraform wants them
function M:plan_flags(step)
  local flags = {}
  for _, f in ipairs(step.config.cli["var-file"] or {}) do flags[#flags + 1] = "-var-file=" .. f end
  for _, t in ipairs(step.config.cli.target or {}) do flags[#flags + 1] = "-target=" .. t end
  return flags
end

local function cmd(base, extra)
  for _, a in ipairs(extra or {}) do base[#base + 1] = a end
  return base
end

--- version: with options.version, terraform must be that version (a prefix: "1.5" matches 1.5.7)
function M:version(step)
  local want = step.config.options.version
  if not want or step.dry_run then return end
  local r = step:check({"terraform", "version", "-json"}, {quiet = true})
  local info = json.decode(r.stdout)
  local have = type(info) == "table" and info.terraform_version or (r.stdout:match("v(%d+%.%d+%.%d+)"))
  if not have then step:fail("cannot tell terraform's version from `terraform version -json`") end
  local w = want:gsub("^v", "")
  if have ~= w and have:sub(1, #w + 1) ~= w .. "." then
    step:fail(string.format("terraform %s is installed, but options.version asks for %s (%s)", have, want, step.config_file))
  end
end

function M:init(step)
  local argv = {"terraform", "init", "-input=false"}
  if step.config.cli.upgrade then argv[#argv + 1] = "-upgrade" end
  for _, b in ipairs(step.config.cli["backend-config"] or {}) do argv[#argv + 1] = "-backend-config=" .. b end
  step:check(argv)
end

--- workspace: select it, or create it when it does not exist yet
function M:workspace(step)
  local ws = step.config.options.workspace
  if not ws or ws == "" then return end
  local r = step:run({"terraform", "workspace", "select", ws})
  if r.ok then return end
  step:check({"terraform", "workspace", "new", ws})
end

function M:plan(step, destroy)
  step:check(cmd({"terraform", "plan", "-input=false", destroy and "-destroy" or nil}, self:plan_flags(step)))
end

function M:apply(step)
  step:check(cmd({"terraform", "apply", "-input=false", "-auto-approve"}, self:plan_flags(step)))
end

function M:destroy(step)
  step:check(cmd({"terraform", "destroy", "-input=false", "-auto-approve"}, self:plan_flags(step)))
end

local function output_string(v)
  if type(v) == "string" then return v end
  if type(v) == "number" or type(v) == "boolean" then return tostring(v) end
  return json.encode(v) or ""
end

--- outputs: `terraform output -json` into step.outputs.terraform.<name> and, for later
--- steps and hooks, TF_OUTPUT_<NAME> (strings as they are, the rest as JSON)
function M:outputs(step)
  local r = step:check({"terraform", "output", "-json"}, {quiet = true})
  if r.dry_run or r.stdout:match("^%s*$") then return end
  local outs, err = json.decode(r.stdout)
  if type(outs) ~= "table" then step:fail("cannot read `terraform output -json`: " .. tostring(err)) end
  step.outputs.terraform = step.outputs.terraform or {}
  for name, o in pairs(outs) do
    local value = type(o) == "table" and o.value
    if o.sensitive and type(value) == "string" then step:secret(value) end
    step.outputs.terraform[name] = value
    step:export("TF_OUTPUT_" .. name:upper():gsub("[^%w]", "_"), output_string(value))
  end
end

function M:deploy(step)
  local action = self:action(step)
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
  end
end

return M
