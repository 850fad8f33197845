-- tools.cloudformation: deploys one CloudFormation stack with the aws CLI, configured as
-- BitOps' cloudformation plugin is (docs/parts/cloudformation.md). Each stage below is a
-- method a repo may override in .opsrun/tools/cloudformation.lua (docs/drivers.md).
local fs = require "ops.fs"
local json = require "ops.json"

local M = {}

M.schema = {
  cli = {
    ["validate-cfn"] = {type = "boolean", default = true, export_env = "CFN_TEMPLATE_VALIDATION"},
    -- deploy or delete; BitOps also took Deploy and Delete, so the case is not checked here
    ["stack-action"] = {type = "string", default = "deploy", export_env = "CFN_STACK_ACTION"},
    ["skip-deploy"] = {type = "boolean", export_env = "CFN_SKIP_DEPLOY"},
  },
  options = {
    ["cfn-stack-name"] = {type = "string", required = true, export_env = "CFN_STACK_NAME"},
    -- BitOps' form is a string ("CAPABILITY_IAM CAPABILITY_NAMED_IAM"); a list works too
    capabilities = {type = "list", export_env = "CFN_CAPABILITY"},
    s3bucket = {type = "string", export_env = "CFN_TEMPLATE_S3_BUCKET"},
    s3prefix = {type = "string", export_env = "CFN_S3_PREFIX"},
    region = {type = "string"},
    ["cfn-files"] = {type = "object", properties = {
      ["template-file"] = {type = "string", default = "template.yaml", export_env = "CFN_TEMPLATE_FILENAME"},
      parameters = {type = "object", properties = {
        ["template-param-flag"] = {type = "boolean", default = true, export_env = "CFN_PARAMS_FLAG"},
        enabled = {type = "boolean"}, -- the BitOps 1.x name of template-param-flag
        ["template-param-file"] = {type = "string", export_env = "CFN_TEMPLATE_PARAMS_FILENAME"},
      }},
    }},
    ["cfn-merge-parameters"] = {type = "object", properties = {
      enabled = {type = "boolean", default = false, export_env = "CFN_MERGE_PARAMETER"},
      directory = {type = "string", default = "parameters", export_env = "CFN_MERGE_DIRECTORY"},
    }},
  },
}

-- The env of every aws command: an AWS CLI v2 would otherwise page its output through less.
-- A new table each time, so that nothing a step does to one command's env reaches the next.
local function aws_env() return {AWS_PAGER = ""} end

-- Statuses in which update-stack is accepted.
local UPDATABLE = {
  CREATE_COMPLETE = true, UPDATE_COMPLETE = true, UPDATE_ROLLBACK_COMPLETE = true,
  IMPORT_COMPLETE = true, IMPORT_ROLLBACK_COMPLETE = true,
}

-- The value at config[section][k1][k2]..., or the schema's default; "" and null are unset,
-- as BitOps treated them.
local function setting(step, section, ...)
  local v, spec = step.config[section], {properties = M.schema[section]}
  for _, k in ipairs({...}) do
    if type(v) == "table" then v = v[k] else v = nil end
    spec = spec and spec.properties and spec.properties[k]
  end
  if v == json.null or v == "" then v = nil end
  if v == nil and spec then v = spec.default end
  return v
end

-- "A B", "A,B" or a list of such: the words in order
local function words(v)
  local list = {}
  for _, item in ipairs(type(v) == "table" and v or {v}) do
    for w in tostring(item or ""):gmatch("[^%s,]+") do list[#list + 1] = w end
  end
  return list
end

local function tail(s, n)
  s = (s or ""):gsub("%s+$", "")
  return #s > n and ("…" .. s:sub(-n)) or s
end

local function fail_config(step, key, problem)
  step:fail(string.format("%s %s (%s)", key, problem, step.config_file))
end

-- Fails the step for a command that did not succeed, naming the stack.
local function fail_command(step, stack, what, r, key)
  local where = key and string.format(" (%s, %s)", key, step.config_file) or ""
  step:fail(string.format("stack '%s': %s failed (exit %s)%s: %s", stack.name, what,
    tostring(r.code or r.signal), where, tail(r.stderr, 1500)))
end

-- argv + {"--region", region} when a region is configured.
local function with_region(stack, argv)
  if stack.region then
    argv[#argv + 1] = "--region"
    argv[#argv + 1] = stack.region
  end
  return argv
end

--- M:stack(step) -> stack: the step's configuration, checked, as the other stages use it:
-- {name, action, template_file, template (absolute path), capabilities, region,
--  s3 = {bucket, key} | nil, validate}; M:parameters adds parameters (a path) and
-- M:upload template_url.
function M:stack(step)
  local name = setting(step, "options", "cfn-stack-name")
  if not name then fail_config(step, "options.cfn-stack-name", "is required") end
  local action = tostring(setting(step, "cli", "stack-action")):lower()
  if action ~= "deploy" and action ~= "delete" then
    fail_config(step, "cli.stack-action",
      string.format("must be deploy or delete, not '%s'", setting(step, "cli", "stack-action")))
  end
  local template_file = setting(step, "options", "cfn-files", "template-file")
  local stack = {
    name = name,
    action = action,
    template_file = template_file,
    template = step:path(template_file, "options.cfn-files.template-file"),
    capabilities = words(setting(step, "options", "capabilities")),
    region = setting(step, "options", "region"),
    validate = setting(step, "cli", "validate-cfn") ~= false,
  }
  local bucket = setting(step, "options", "s3bucket")
  local prefix = setting(step, "options", "s3prefix")
  if bucket then
    prefix = prefix and prefix:gsub("^/+", ""):gsub("/+$", "") or ""
    stack.s3 = {bucket = bucket, key = (prefix ~= "" and prefix .. "/" or "") .. template_file}
  elseif prefix then
    fail_config(step, "options.s3prefix", "is set but options.s3bucket is not")
  end
  if action == "deploy" and not fs.exists(stack.template) then
    fail_config(step, "options.cfn-files.template-file",
      string.format("names %s, which does not exist in %s (stack '%s')", template_file, step.dir, name))
  end
  return stack
end

-- Reads a parameters file: a JSON array of {ParameterKey, ParameterValue}.
local function read_parameters(step, path, key)
  local text, err = fs.read(path)
  if not text then fail_config(step, key, "names a file that cannot be read: " .. err) end
  local list, jerr = json.decode(text, path)
  if type(list) ~= "table" or (next(list) ~= nil and #list == 0) then
    fail_config(step, key, string.format("names %s, which is not a JSON array of "
      .. "{\"ParameterKey\", \"ParameterValue\"}%s", path, jerr and (": " .. jerr) or ""))
  end
  for i, p in ipairs(list) do
    if type(p) ~= "table" or type(p.ParameterKey) ~= "string" then
      fail_config(step, key, string.format("names %s, whose entry %d has no ParameterKey", path, i))
    end
  end
  return list
end

--- M:parameters(step, stack) -> path | nil: the --parameters file, also in stack.parameters.
-- With cfn-merge-parameters, the template-param-file's entries and then those of every
-- *.json in the merge directory (in name order) are written to one private file; a key
-- given again replaces the earlier value.
function M:parameters(step, stack)
  local flag = setting(step, "options", "cfn-files", "parameters", "template-param-flag") ~= false
    and setting(step, "options", "cfn-files", "parameters", "enabled") ~= false
  local file = flag and setting(step, "options", "cfn-files", "parameters", "template-param-file")
  local file_key = "options.cfn-files.parameters.template-param-file"
  local path = file and step:path(file, file_key)
  if path and not fs.exists(path) then
    fail_config(step, file_key, string.format("names %s, which does not exist in %s (stack '%s')",
      file, step.dir, stack.name))
  end
  if setting(step, "options", "cfn-merge-parameters", "enabled") == true then
    local dir_name = setting(step, "options", "cfn-merge-parameters", "directory")
    local dir_key = "options.cfn-merge-parameters.directory"
    local dir = step:path(dir_name, dir_key)
    local names, err = fs.glob("*.json", dir)
    if not names or not fs.exists(dir) then
      fail_config(step, dir_key, string.format("names %s, which is not a directory in %s%s",
        dir_name, step.dir, err and (": " .. err) or ""))
    end
    local merged, index = json.array(), {}
    local function add(list)
      for _, p in ipairs(list) do
        local i = index[p.ParameterKey]
        if not i then i = #merged + 1; index[p.ParameterKey] = i end
        merged[i] = p
      end
    end
    if path then add(read_parameters(step, path, file_key)) end
    for _, n in ipairs(names) do add(read_parameters(step, fs.join(dir, n), dir_key)) end
    path = step:private_file("cfn-parameters.json", json.encode(merged, {indent = 2}))
  elseif path then
    read_parameters(step, path, file_key)
  end
  stack.parameters = path
  return path
end

--- M:upload(step, stack) -> template url | nil
-- aws s3 cp <template> s3://<bucket>/<prefix>/<template-file>; stack.template_url is then
-- used instead of the local template by validate, create and update.
function M:upload(step, stack)
  if not stack.s3 then return nil end
  local dest = "s3://" .. stack.s3.bucket .. "/" .. stack.s3.key
  local r = step:run(with_region(stack, {"aws", "s3", "cp", stack.template, dest}), {env = aws_env()})
  if not r.ok then fail_command(step, stack, "uploading the template to " .. dest, r, "options.s3bucket") end
  stack.template_url = "https://" .. stack.s3.bucket .. ".s3.amazonaws.com/" .. stack.s3.key
  return stack.template_url
end

-- The template arguments of validate-template, create-stack and update-stack.
local function template_args(argv, stack)
  if stack.template_url then
    argv[#argv + 1] = "--template-url"
    argv[#argv + 1] = stack.template_url
  else
    argv[#argv + 1] = "--template-body"
    argv[#argv + 1] = "file://" .. stack.template
  end
  return argv
end

--- M:validate(step, stack): aws cloudformation validate-template --template-body file://<template>
-- (--template-url <url> once uploaded)
function M:validate(step, stack)
  local r = step:run(with_region(stack, template_args({"aws", "cloudformation", "validate-template"}, stack)),
    {quiet = true, env = aws_env()})
  if not r.ok then
    fail_command(step, stack, "validate-template of " .. stack.template_file, r,
      "options.cfn-files.template-file")
  end
end

--- M:exists(step, stack) -> description | nil: the stack as describe-stacks gives it
-- (StackStatus, Outputs, …), nil when it does not exist. In a dry run nothing runs, so nil.
function M:exists(step, stack)
  local r = step:run(with_region(stack, {"aws", "cloudformation", "describe-stacks",
    "--stack-name", stack.name, "--output", "json"}), {quiet = true, env = aws_env()})
  if r.dry_run then return nil end
  if not r.ok then
    if (r.stderr or ""):find("does not exist", 1, true) then return nil end
    fail_command(step, stack, "describe-stacks", r)
  end
  local doc, err = json.decode(r.stdout or "", "describe-stacks")
  if not doc or type(doc.Stacks) ~= "table" or not doc.Stacks[1] then
    step:fail(string.format("stack '%s': describe-stacks gave output that is not a stack description: %s",
      stack.name, err or tail(r.stdout, 300)))
  end
  return doc.Stacks[1]
end

--- M:failure_reason(step, stack) -> string | nil: why the last operation on the stack failed,
-- from describe-stack-events: the first *_FAILED event since the operation began.
function M:failure_reason(step, stack)
  local r = step:run(with_region(stack, {"aws", "cloudformation", "describe-stack-events",
    "--stack-name", stack.name, "--output", "json"}), {quiet = true, env = aws_env()})
  local doc = r.ok and json.decode(r.stdout or "")
  if type(doc) ~= "table" or type(doc.StackEvents) ~= "table" then return nil end
  local reason
  for _, e in ipairs(doc.StackEvents) do -- newest first
    if e.ResourceStatusReason == "User Initiated" and e.LogicalResourceId == stack.name then break end
    if type(e.ResourceStatus) == "string" and e.ResourceStatus:find("FAILED$")
        and type(e.ResourceStatusReason) == "string" then
      reason = string.format("%s %s: %s", tostring(e.LogicalResourceId), e.ResourceStatus,
        e.ResourceStatusReason)
    end
  end
  return reason
end

--- M:wait(step, stack, waiter): aws cloudformation wait <waiter> --stack-name <name>
function M:wait(step, stack, waiter)
  local r = step:run(with_region(stack, {"aws", "cloudformation", "wait", waiter, "--stack-name", stack.name}),
    {env = aws_env()})
  if not r.ok then
    local reason = self:failure_reason(step, stack)
    if reason then r = {code = r.code, signal = r.signal, stderr = tail(r.stderr, 300) .. "\n" .. reason} end
    fail_command(step, stack, "wait " .. waiter, r)
  end
end

-- The arguments create-stack and update-stack share.
local function stack_args(stack, subcommand)
  local argv = template_args({"aws", "cloudformation", subcommand, "--stack-name", stack.name}, stack)
  if stack.parameters then
    argv[#argv + 1] = "--parameters"
    argv[#argv + 1] = "file://" .. stack.parameters
  end
  if #stack.capabilities > 0 then
    argv[#argv + 1] = "--capabilities"
    for _, c in ipairs(stack.capabilities) do argv[#argv + 1] = c end
  end
  return with_region(stack, argv)
end

-- Logs what became of the stack: not in a dry run, where nothing did.
local function done(step, stack, what)
  if not step.dry_run then step.log.info(string.format("stack '%s' %s", stack.name, what)) end
end

--- M:create(step, stack): create-stack, then wait stack-create-complete
function M:create(step, stack)
  local r = step:run(stack_args(stack, "create-stack"), {env = aws_env()})
  if not r.ok then fail_command(step, stack, "create-stack", r) end
  self:wait(step, stack, "stack-create-complete")
  done(step, stack, "created")
end

--- M:update(step, stack) -> changed: update-stack, then wait stack-update-complete.
-- "No updates are to be performed" is success: false, and no wait.
function M:update(step, stack)
  local r = step:run(stack_args(stack, "update-stack"), {env = aws_env()})
  if not r.ok then
    if (r.stderr or ""):find("No updates are to be performed", 1, true) then
      step.log.info(string.format("stack '%s': no changes", stack.name))
      return false
    end
    fail_command(step, stack, "update-stack", r)
  end
  self:wait(step, stack, "stack-update-complete")
  done(step, stack, "updated")
  return true
end

--- M:delete(step, stack): delete-stack, then wait stack-delete-complete
function M:delete(step, stack)
  local r = step:run(with_region(stack, {"aws", "cloudformation", "delete-stack", "--stack-name", stack.name}),
    {env = aws_env()})
  if not r.ok then fail_command(step, stack, "delete-stack", r) end
  self:wait(step, stack, "stack-delete-complete")
  done(step, stack, "deleted")
end

--- M:outputs(step, stack) -> {OutputKey = OutputValue}: describe-stacks; each output goes to
-- step.outputs.cloudformation[OutputKey] and step.vars CFN_OUTPUT_<OUTPUTKEY>.
function M:outputs(step, stack)
  local desc = self:exists(step, stack)
  local outputs = {}
  step.outputs.cloudformation = step.outputs.cloudformation or {}
  for _, o in ipairs(desc and type(desc.Outputs) == "table" and desc.Outputs or {}) do
    if type(o.OutputKey) == "string" and o.OutputValue ~= nil then
      local value = tostring(o.OutputValue)
      outputs[o.OutputKey] = value
      step.outputs.cloudformation[o.OutputKey] = value
      step.vars["CFN_OUTPUT_" .. o.OutputKey:upper()] = value
    end
  end
  return outputs
end

-- Why update-stack cannot be used in this state, and what to do.
local function blocked(stack, status)
  if status == "REVIEW_IN_PROGRESS" then
    return "a change set created it and was not executed; execute or delete that change set "
      .. "('aws cloudformation delete-stack --stack-name " .. stack.name .. "' removes both)"
  elseif status:find("_IN_PROGRESS$") then
    return "another operation is running on it; deploy again once it has ended"
  elseif status == "UPDATE_ROLLBACK_FAILED" then
    return "fix what made the rollback fail, then run "
      .. "'aws cloudformation continue-update-rollback --stack-name " .. stack.name .. "'"
  end
  return "fix what made it fail, delete it ('aws cloudformation delete-stack --stack-name "
    .. stack.name .. "') and deploy again"
end

--- M:deploy(step): the lifecycle.
--   delete: describe-stacks; delete + wait when it exists
--   deploy: parameters, upload (with s3bucket), validate (validate-cfn), describe-stacks,
--           then create + wait, or update + wait; then outputs.
-- A stack in ROLLBACK_COMPLETE (its first creation failed and it holds no resources) cannot
-- be updated: it is deleted and created again.
function M:deploy(step)
  local stack = self:stack(step) -- (cli.skip-deploy: the engine skips the step before it gets here)
  if stack.action == "delete" then
    if not self:exists(step, stack) and not step.dry_run then
      step.log.info(string.format("stack '%s' does not exist: nothing to delete", stack.name))
      return
    end
    self:delete(step, stack)
    return
  end
  self:parameters(step, stack)
  self:upload(step, stack)
  if stack.validate then self:validate(step, stack) end
  local current = self:exists(step, stack)
  local status = current and tostring(current.StackStatus)
  if status == "ROLLBACK_COMPLETE" then
    local reason = self:failure_reason(step, stack)
    step.log.warn(string.format("stack '%s' is in ROLLBACK_COMPLETE (its creation failed%s): "
      .. "deleting it to create it again", stack.name, reason and (": " .. reason) or ""))
    self:delete(step, stack)
    current = nil
  end
  if current then
    if not UPDATABLE[status] then
      step:fail(string.format("stack '%s' is in state %s and cannot be updated: %s",
        stack.name, status, blocked(stack, status)))
    end
    step.log.info(string.format("stack '%s' exists (%s): updating", stack.name, status))
    self:update(step, stack)
  else
    if step.dry_run then
      step.log.info(string.format("dry run: whether stack '%s' exists is not known; "
        .. "update-stack replaces create-stack when it does", stack.name))
    else
      step.log.info(string.format("stack '%s' does not exist: creating", stack.name))
    end
    self:create(step, stack)
  end
  self:outputs(step, stack)
end

return M
