-- The Terraform driver (lua/tools/terraform.lua) against docs/parts/terraform.md: the exact
-- terraform commands for every BitOps option and action, with the fake step. Real runs of
-- terraform through `opsrun deploy` are in deploy_tools_spec.lua.
local fake_step = require "fake_step"
local json = require "ops.json"
local terraform = require "tools.terraform"

local function ok(stdout) return {ok = true, code = 0, stdout = stdout or "", stderr = ""} end
local function err(stderr) return {ok = false, code = 1, stdout = "", stderr = stderr} end

-- A fake step with the driver's config (cli, options) and step:export, which the fake lacks:
-- exports land in step.exports as the real step keeps them.
local function step_with(o)
  o = o or {}
  local step = fake_step.new{tool = "terraform", config = {cli = o.cli or {}, options = o.options or {}},
                             results = o.results, dry_run = o.dry_run, outputs = o.outputs}
  step.exports = {}
  function step:export(name, value) self.exports[name] = tostring(value) end
  return step
end

-- The failure the driver raised through step:fail, as the user sees it.
local function failure(step)
  local okay, e = pcall(terraform.deploy, terraform, step)
  assert.is_false(okay, "expected the step to fail")
  assert.is_true(type(e) == "table" and e.step_failure, "not a step failure: " .. tostring(e))
  return e.message
end

local INIT = "terraform init -input=false"
local PLAN = "terraform plan -input=false"
local APPLY = "terraform apply -input=false -auto-approve"
local DESTROY = "terraform destroy -input=false -auto-approve"
local OUTPUT = "terraform output -json"

describe("terraform driver: stack-action", function()
  it("plans when no stack-action is set (BitOps' default)", function()
    local step = step_with()
    terraform:deploy(step)
    assert.are.same({INIT, PLAN}, step.commands)
    assert.are.equal("plan", step.vars.TERRAFORM_COMMAND)
  end)

  it("plan: init, then plan, and reads no outputs", function()
    local step = step_with{options = {["stack-action"] = "plan"}}
    terraform:deploy(step)
    assert.are.same({INIT, PLAN}, step.commands)
    assert.is_nil(step.outputs.terraform)
  end)

  it("apply: init, plan, apply -auto-approve, then output -json", function()
    local step = step_with{options = {["stack-action"] = "apply"}}
    terraform:deploy(step)
    assert.are.same({INIT, PLAN, APPLY, OUTPUT}, step.commands)
    assert.are.equal("apply", step.vars.TERRAFORM_COMMAND)
  end)

  it("destroy: init, plan -destroy, destroy -auto-approve, and reads no outputs", function()
    local step = step_with{options = {["stack-action"] = "destroy"}}
    terraform:deploy(step)
    assert.are.same({INIT, PLAN .. " -destroy", DESTROY}, step.commands)
  end)

  it("takes stack-action from cli: too, where the BitOps plugin's README puts it", function()
    for action, commands in pairs({
      plan = {INIT, PLAN},
      apply = {INIT, PLAN, APPLY, OUTPUT},
      destroy = {INIT, PLAN .. " -destroy", DESTROY},
    }) do
      local step = step_with{cli = {["stack-action"] = action}}
      terraform:deploy(step)
      assert.are.same(commands, step.commands)
    end
  end)

  it("lets options.stack-action win over cli.stack-action, with a warning when they differ", function()
    local step = step_with{cli = {["stack-action"] = "destroy"}, options = {["stack-action"] = "plan"}}
    terraform:deploy(step)
    assert.are.same({INIT, PLAN}, step.commands)
    assert.are.same({"warn: options.stack-action is plan and cli.stack-action is destroy: running plan "
      .. "(options wins; remove one of them) (test/terraform/bitops.config.yaml)"}, step.log.lines)

    step = step_with{cli = {["stack-action"] = "apply"}, options = {["stack-action"] = "apply"}}
    terraform:deploy(step)
    assert.are.same({INIT, PLAN, APPLY, OUTPUT}, step.commands)
    assert.are.same({}, step.log.lines)
  end)

  it("refuses an action an override returns that it does not know, before running anything", function()
    local custom = setmetatable({}, {__index = terraform})
    function custom:action() return "Apply" end
    local step = step_with()
    local okay, e = pcall(custom.deploy, custom, step)
    assert.is_false(okay)
    assert.are.equal("stack-action must be one of plan, apply, destroy, not 'Apply' "
      .. "(test/terraform/bitops.config.yaml)", e.message)
    assert.are.same({INIT}, step.commands)
  end)

  it("stops at the first command that fails", function()
    local step = step_with{options = {["stack-action"] = "apply"},
                           results = {["terraform plan"] = err("Error: Unsupported argument")}}
    assert.are.equal("terraform plan failed (exit 1): Error: Unsupported argument", failure(step))
    assert.are.same({INIT, PLAN}, step.commands)

    step = step_with{options = {["stack-action"] = "apply"},
                     results = {["terraform init"] = err("Error: Backend initialization required")}}
    assert.are.equal("terraform init failed (exit 1): Error: Backend initialization required", failure(step))
    assert.are.same({INIT}, step.commands)
  end)
end)

describe("terraform driver: init", function()
  it("adds -upgrade when cli.upgrade is true, and not when it is false", function()
    local step = step_with{cli = {upgrade = true}}
    terraform:deploy(step)
    assert.are.same({INIT .. " -upgrade", PLAN}, step.commands)
    step = step_with{cli = {upgrade = false}}
    terraform:deploy(step)
    assert.are.same({INIT, PLAN}, step.commands)
  end)

  it("passes each cli.backend-config item as -backend-config=ITEM, in order, to init only", function()
    local step = step_with{cli = {["backend-config"] = {"bucket=tf-state", "key=prod/terraform.tfstate",
                                                        "backend.hcl"}, upgrade = true},
                           options = {["stack-action"] = "apply"}}
    terraform:deploy(step)
    assert.are.same({
      INIT .. " -upgrade -backend-config=bucket=tf-state -backend-config=key=prod/terraform.tfstate "
        .. "-backend-config=backend.hcl",
      PLAN, APPLY, OUTPUT,
    }, step.commands)
  end)
end)

describe("terraform driver: workspace", function()
  it("selects options.workspace after init, before the plan", function()
    local step = step_with{options = {workspace = "staging"}}
    terraform:deploy(step)
    assert.are.same({INIT, "terraform workspace select staging", PLAN}, step.commands)
  end)

  it("creates the workspace with `workspace new` when select fails because it does not exist", function()
    local step = step_with{options = {workspace = "staging", ["stack-action"] = "apply"},
                           results = {["terraform workspace select"] = err('Workspace "staging" doesn\'t exist.')}}
    terraform:deploy(step)
    assert.are.same({INIT, "terraform workspace select staging", "terraform workspace new staging",
                     PLAN, APPLY, OUTPUT}, step.commands)
  end)

  it("fails with new's error when the workspace can be neither selected nor created", function()
    local step = step_with{options = {workspace = "bad name"},
                           results = {["terraform workspace select"] = err("no"),
                                      ["terraform workspace new"] = err('Error: "bad name" is not a valid workspace name')}}
    assert.are.equal('terraform workspace failed (exit 1): Error: "bad name" is not a valid workspace name',
      failure(step))
    assert.are.same({INIT, "terraform workspace select bad name", "terraform workspace new bad name"},
      step.commands)
  end)

  it("refuses a workspace that terraform would read as an option, before selecting it", function()
    local step = step_with{options = {workspace = "-delete"}}
    assert.are.equal([[options.workspace "-delete" starts with '-', which terraform would read as an option ]]
      .. "(test/terraform/bitops.config.yaml)", failure(step))
    assert.are.same({INIT}, step.commands)
  end)

  it("runs no workspace command without options.workspace, or with an empty one", function()
    for _, ws in ipairs({false, ""}) do
      local step = step_with{options = {workspace = ws or nil}}
      terraform:deploy(step)
      assert.are.same({INIT, PLAN}, step.commands)
    end
  end)
end)

describe("terraform driver: var-file and target", function()
  local cli = {["var-file"] = {"common.tfvars", "prod.tfvars"}, target = {"module.vpc", "aws_instance.web"}}
  local flags = " -var-file=common.tfvars -var-file=prod.tfvars -target=module.vpc -target=aws_instance.web"

  it("passes each item, in order, to plan and apply (not to init or output)", function()
    local step = step_with{cli = cli, options = {["stack-action"] = "apply"}}
    terraform:deploy(step)
    assert.are.same({INIT, PLAN .. flags, APPLY .. flags, OUTPUT}, step.commands)
  end)

  it("passes them to plan -destroy and destroy", function()
    local step = step_with{cli = cli, options = {["stack-action"] = "destroy"}}
    terraform:deploy(step)
    assert.are.same({INIT, PLAN .. " -destroy" .. flags, DESTROY .. flags}, step.commands)
  end)

  it("takes one var-file alone (BitOps' form: a string, which the engine makes a one-item list)", function()
    local step = step_with{cli = {["var-file"] = {"my-vars.tfvars"}}}
    terraform:deploy(step)
    assert.are.same({INIT, PLAN .. " -var-file=my-vars.tfvars"}, step.commands)
  end)
end)

describe("terraform driver: version", function()
  local function installed(v)
    return {["terraform version -json"] = ok(json.encode({terraform_version = v, platform = "linux_amd64"}))}
  end

  it("checks `terraform version -json` first when options.version is set", function()
    local step = step_with{options = {version = "1.5.7"}, results = installed("1.5.7")}
    terraform:deploy(step)
    assert.are.same({"terraform version -json", INIT, PLAN}, step.commands)
    assert.is_true(step.runs[1].opts.quiet)
  end)

  it("matches a prefix at a version boundary, with or without a leading v", function()
    for _, want in ipairs({"1", "1.5", "v1.5", "1.5.7", "v1.5.7"}) do
      local step = step_with{options = {version = want}, results = installed("1.5.7")}
      terraform:deploy(step)
      assert.are.same({"terraform version -json", INIT, PLAN}, step.commands)
    end
  end)

  it("fails on a mismatch, saying what is installed and what to do, before init", function()
    local step = step_with{options = {version = "1.5"}, results = installed("1.11.4")}
    assert.are.equal("terraform 1.11.4 is installed, but options.version asks for 1.5 "
      .. "(test/terraform/bitops.config.yaml): put terraform 1.5 first on PATH, or change options.version",
      failure(step))
    assert.are.same({"terraform version -json"}, step.commands)
    -- 1.5 is not a prefix of 1.50.0
    assert.truthy(failure(step_with{options = {version = "1.5"}, results = installed("1.50.0")})
      :find("terraform 1.50.0 is installed, but options.version asks for 1.5", 1, true))
  end)

  it("reads the version an old terraform without -json prints", function()
    local step = step_with{options = {version = "0.12.29"},
                           results = {["terraform version"] = ok("Terraform v0.12.29\n\nYour version is out of date")}}
    terraform:deploy(step)
    assert.are.same({"terraform version -json", INIT, PLAN}, step.commands)
    assert.truthy(failure(step_with{options = {version = "0.13"},
      results = {["terraform version"] = ok("Terraform v0.12.29\n")}}):find("terraform 0.12.29 is installed", 1, true))
  end)

  it("fails when the version cannot be read", function()
    local step = step_with{options = {version = "1.5"}, results = {["terraform version"] = ok("something else")}}
    assert.are.equal("cannot tell terraform's version from `terraform version -json`", failure(step))
  end)

  it("refuses an options.version that is not a version number", function()
    for _, bad in ipairs({">= 1.5", "latest", "1..2", "1.5."}) do
      local step = step_with{options = {version = bad}}
      assert.are.equal("options.version must be a version such as 1.5 or 1.5.7, not '" .. bad
        .. "' (test/terraform/bitops.config.yaml)", failure(step))
      assert.are.same({}, step.commands)
    end
  end)

  it("checks nothing without options.version, or in a dry run", function()
    local step = step_with()
    terraform:deploy(step)
    assert.are.same({INIT, PLAN}, step.commands)
    step = step_with{options = {version = "9.9"}, dry_run = true}
    terraform:deploy(step)
    assert.are.same({INIT, PLAN}, step.commands)
  end)
end)

describe("terraform driver: outputs", function()
  local OUTPUTS = json.encode({
    vpc_id = {sensitive = false, type = "string", value = "vpc-0abc"},
    ["db-port"] = {sensitive = false, type = "number", value = 5432},
    public = {sensitive = false, type = "bool", value = true},
    subnets = {sensitive = false, type = {"list", "string"}, value = {"subnet-a", "subnet-b"}},
    db_password = {sensitive = true, type = "string", value = "hunter2-pw"},
    db_creds = {sensitive = true, type = {"object", {user = "string"}}, value = {user = "admin-user"}},
  })

  local function applied(stdout, outputs)
    local step = step_with{options = {["stack-action"] = "apply"}, outputs = outputs,
                           results = {[OUTPUT] = ok(stdout)}}
    terraform:deploy(step)
    return step
  end

  it("reads `terraform output -json` quietly (machine-read, not streamed)", function()
    local step = applied(OUTPUTS)
    assert.are.equal(OUTPUT, step.commands[4])
    assert.is_true(step.runs[4].opts.quiet)
  end)

  it("offers each output, decoded, to later steps as step.outputs.terraform.<name>", function()
    local step = applied(OUTPUTS)
    local o = step.outputs.terraform
    assert.are.equal("vpc-0abc", o.vpc_id)
    assert.are.equal(5432, o["db-port"])
    assert.are.equal(true, o.public)
    assert.are.same({"subnet-a", "subnet-b"}, o.subnets)
    assert.are.equal("hunter2-pw", o.db_password)
    assert.are.same({user = "admin-user"}, o.db_creds)
  end)

  it("exports TF_OUTPUT_<NAME>: upper case, other characters as _, lists and maps as JSON", function()
    local step = applied(OUTPUTS)
    local e = step.exports
    assert.are.equal("vpc-0abc", e.TF_OUTPUT_VPC_ID)
    assert.are.equal("5432", e.TF_OUTPUT_DB_PORT)
    assert.are.equal("true", e.TF_OUTPUT_PUBLIC)
    assert.are.equal('["subnet-a","subnet-b"]', e.TF_OUTPUT_SUBNETS)
    assert.are.equal("hunter2-pw", e.TF_OUTPUT_DB_PASSWORD)
    assert.are.same({user = "admin-user"}, json.decode(e.TF_OUTPUT_DB_CREDS))
    local n = 0
    for _ in pairs(e) do n = n + 1 end
    assert.are.equal(6, n)
  end)

  it("keeps a string output with a NUL byte for Lua, and sets no variable for it, saying so", function()
    local step = applied(json.encode({odd = {sensitive = false, type = "string", value = "a\0b"},
                                      fine = {sensitive = false, type = "string", value = "ok"}}))
    assert.are.equal("a\0b", step.outputs.terraform.odd)
    assert.are.same({TF_OUTPUT_FINE = "ok"}, step.exports)
    assert.are.same({'warn: output odd holds a NUL byte: TF_OUTPUT_ODD is not set (Lua hooks and overrides have it '
      .. 'as step.outputs.terraform["odd"])'}, (function()
        local w = {}
        for _, l in ipairs(step.log.lines) do if l:match("^warn:") then w[#w + 1] = l end end
        return w
      end)())
  end)

  it("registers every string of a sensitive output as a secret, and nothing else", function()
    local step = applied(OUTPUTS)
    table.sort(step.secrets)
    assert.are.same({"admin-user", "hunter2-pw", '{"user":"admin-user"}'}, step.secrets)
  end)

  it("keeps the outputs of an earlier terraform step of the run, replacing those of the same name", function()
    local shared = {terraform = {network_id = "net-1", vpc_id = "old"}}
    local step = applied(json.encode({vpc_id = {sensitive = false, type = "string", value = "vpc-new"}}), shared)
    assert.are.same({network_id = "net-1", vpc_id = "vpc-new"}, shared.terraform)
  end)

  it("exports nothing when there are no outputs", function()
    local step = applied("{}\n")
    assert.are.same({}, step.outputs.terraform)
    assert.are.same({}, step.exports)
  end)

  it("fails clearly when the output is not JSON", function()
    local step = step_with{options = {["stack-action"] = "apply"}, results = {[OUTPUT] = ok("Warning: no outputs\n")}}
    local msg = failure(step)
    assert.truthy(msg:find("cannot read `terraform output -json`: terraform output -json:", 1, true), msg)
  end)
end)

describe("terraform driver: stages", function()
  it("calls its stages through self, so an override of one is seen by deploy", function()
    local custom = setmetatable({}, {__index = terraform})
    function custom:plan_flags() return {"-parallelism=2"} end
    function custom:init(step) step:check({"terraform", "init", "-input=false", "-reconfigure"}) end
    local step = step_with{options = {["stack-action"] = "destroy"}}
    custom:deploy(step)
    assert.are.same({INIT .. " -reconfigure", PLAN .. " -destroy -parallelism=2",
                     DESTROY .. " -parallelism=2"}, step.commands)
  end)
end)
