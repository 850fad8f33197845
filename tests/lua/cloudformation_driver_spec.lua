-- tools.cloudformation: the exact aws commands for every option (with the fake step), then
-- real runs of the aws CLI against moto_server on loopback.
local fake_step = require "fake_step"
local helpers = require "helpers"
local moto = require "moto"
local json = require "ops.json"
local cfn = require "tools.cloudformation"

local TEMPLATE = [[
AWSTemplateFormatVersion: "2010-09-09"
Description: opsrun cloudformation driver spec
Parameters:
  Suffix:
    Type: String
Resources:
  Bucket:
    Type: AWS::S3::Bucket
    Properties:
      BucketName: !Sub "opsrun-spec-${AWS::StackName}"
Outputs:
  BucketName:
    Value: !Ref Bucket
  Label:
    Value: !Sub "label-${Suffix}"
]]

local function params(suffix)
  return json.encode({{ParameterKey = "Suffix", ParameterValue = suffix}})
end

local dir -- a step folder with template.yaml, parameters.json and parameters/

local function ok(stdout) return {ok = true, code = 0, stdout = stdout or "", stderr = ""} end
local function err(stderr) return {ok = false, code = 255, stdout = "", stderr = stderr} end

local ABSENT = err("\nAn error occurred (ValidationError) when calling the DescribeStacks operation: "
  .. "Stack with id web does not exist\n")

local function described(status, outputs)
  return ok(json.encode({Stacks = {{StackName = "web", StackStatus = status, Outputs = outputs}}}))
end

-- successive results for successive calls: the last one repeats
local function sequence(...)
  local list, i = {...}, 0
  return function()
    i = math.min(i + 1, #list)
    return list[i]
  end
end

local function new_step(options, cli, results, extra)
  local o = {tool = "cloudformation", dir = dir, results = results or {},
             config = {cli = cli or {}, options = options}}
  for k, v in pairs(extra or {}) do o[k] = v end
  return fake_step.new(o)
end

-- the step's failure message (fake_step raises {step_failure, message})
local function failure(fn)
  local okay, e = pcall(fn)
  assert.is_false(okay, "the step did not fail")
  assert.is_table(e, tostring(e))
  return e.message
end

local function logged(step, pattern)
  for _, line in ipairs(step.log.lines) do
    if line:find(pattern, 1, true) then return true end
  end
  return false
end

local function cmd(s) return (s:gsub("DIR", dir)) end

before_each(function()
  dir = helpers.tmpdir()
  helpers.write(dir .. "/template.yaml", TEMPLATE)
  helpers.write(dir .. "/parameters.json", params("a"))
end)

after_each(function() helpers.rmtree(dir) end)

describe("cloudformation deploy", function()
  it("validates, finds no stack, creates it, waits and reads its outputs", function()
    local step = new_step({["cfn-stack-name"] = "web"}, nil, {
      ["aws cloudformation describe-stacks"] = sequence(ABSENT,
        described("CREATE_COMPLETE", {{OutputKey = "BucketName", OutputValue = "b-1"},
                                      {OutputKey = "vpcId", OutputValue = "vpc-9"}})),
    })
    cfn:deploy(step)
    assert.are.same({
      cmd "aws cloudformation validate-template --template-body file://DIR/template.yaml",
      "aws cloudformation describe-stacks --stack-name web --output json",
      cmd "aws cloudformation create-stack --stack-name web --template-body file://DIR/template.yaml",
      "aws cloudformation wait stack-create-complete --stack-name web",
      "aws cloudformation describe-stacks --stack-name web --output json",
    }, step.commands)
    assert.are.same({BucketName = "b-1", vpcId = "vpc-9"}, step.outputs.cloudformation)
    assert.equals("b-1", step.vars.CFN_OUTPUT_BUCKETNAME)
    assert.equals("vpc-9", step.vars.CFN_OUTPUT_VPCID)
    assert.is_true(logged(step, "stack 'web' created"))
  end)

  it("updates a stack that exists and waits for stack-update-complete", function()
    local step = new_step({["cfn-stack-name"] = "web"}, nil, {
      ["aws cloudformation describe-stacks"] = described("UPDATE_ROLLBACK_COMPLETE"),
    })
    cfn:deploy(step)
    assert.are.same({
      cmd "aws cloudformation validate-template --template-body file://DIR/template.yaml",
      "aws cloudformation describe-stacks --stack-name web --output json",
      cmd "aws cloudformation update-stack --stack-name web --template-body file://DIR/template.yaml",
      "aws cloudformation wait stack-update-complete --stack-name web",
      "aws cloudformation describe-stacks --stack-name web --output json",
    }, step.commands)
  end)

  it("takes 'No updates are to be performed' as success: no wait, logged as no changes", function()
    local step = new_step({["cfn-stack-name"] = "web"}, nil, {
      ["aws cloudformation describe-stacks"] = described("CREATE_COMPLETE",
        {{OutputKey = "Url", OutputValue = "https://x"}}),
      ["aws cloudformation update-stack"] = err("\nAn error occurred (ValidationError) when calling "
        .. "the UpdateStack operation: No updates are to be performed.\n"),
    })
    cfn:deploy(step)
    assert.are.same({
      cmd "aws cloudformation validate-template --template-body file://DIR/template.yaml",
      "aws cloudformation describe-stacks --stack-name web --output json",
      cmd "aws cloudformation update-stack --stack-name web --template-body file://DIR/template.yaml",
      "aws cloudformation describe-stacks --stack-name web --output json",
    }, step.commands)
    assert.is_true(logged(step, "stack 'web': no changes"))
    assert.equals("https://x", step.vars.CFN_OUTPUT_URL)
  end)

  it("fails an update-stack error that is not 'no updates', naming the stack and the error", function()
    local step = new_step({["cfn-stack-name"] = "web"}, nil, {
      ["aws cloudformation describe-stacks"] = described("CREATE_COMPLETE"),
      ["aws cloudformation update-stack"] = err("An error occurred (InsufficientCapabilitiesException)"),
    })
    local msg = failure(function() cfn:deploy(step) end)
    assert.matches("stack 'web': update-stack failed (exit 255): An error occurred (InsufficientCapabilitiesException)",
      msg, 1, true)
  end)

  it("passes the parameters file, the capabilities and the region to create-stack", function()
    local step = new_step({
      ["cfn-stack-name"] = "web", region = "eu-west-1",
      capabilities = "CAPABILITY_IAM CAPABILITY_NAMED_IAM",
      ["cfn-files"] = {["template-file"] = "template.yaml",
                       parameters = {["template-param-file"] = "parameters.json"}},
    }, nil, {["aws cloudformation describe-stacks"] = sequence(ABSENT, described("CREATE_COMPLETE"))})
    cfn:deploy(step)
    assert.are.same({
      cmd "aws cloudformation validate-template --template-body file://DIR/template.yaml --region eu-west-1",
      "aws cloudformation describe-stacks --stack-name web --output json --region eu-west-1",
      cmd("aws cloudformation create-stack --stack-name web --template-body file://DIR/template.yaml "
        .. "--parameters file://DIR/parameters.json --capabilities CAPABILITY_IAM CAPABILITY_NAMED_IAM "
        .. "--region eu-west-1"),
      "aws cloudformation wait stack-create-complete --stack-name web --region eu-west-1",
      "aws cloudformation describe-stacks --stack-name web --output json --region eu-west-1",
    }, step.commands)
  end)

  it("takes capabilities as a list too, and gives update-stack the same arguments", function()
    local step = new_step({
      ["cfn-stack-name"] = "web", capabilities = {"CAPABILITY_AUTO_EXPAND"},
      ["cfn-files"] = {parameters = {["template-param-file"] = "parameters.json"}},
    }, nil, {["aws cloudformation describe-stacks"] = described("UPDATE_COMPLETE")})
    cfn:deploy(step)
    assert.equals(cmd("aws cloudformation update-stack --stack-name web --template-body file://DIR/template.yaml "
      .. "--parameters file://DIR/parameters.json --capabilities CAPABILITY_AUTO_EXPAND"), step.commands[3])
  end)

  it("leaves the parameters file out when template-param-flag (or 1.x's enabled) is false", function()
    for _, p in ipairs({{["template-param-flag"] = false}, {enabled = false}}) do
      p["template-param-file"] = "parameters.json"
      local step = new_step({["cfn-stack-name"] = "web", ["cfn-files"] = {parameters = p}},
        {["validate-cfn"] = false}, {["aws cloudformation describe-stacks"] = described("CREATE_COMPLETE")})
      cfn:deploy(step)
      assert.equals(cmd "aws cloudformation update-stack --stack-name web --template-body file://DIR/template.yaml",
        step.commands[2])
    end
  end)

  it("merges the parameters file and the merge directory's *.json, later keys winning", function()
    ops.fs.mkdir(dir .. "/parameters")
    helpers.write(dir .. "/parameters/b.json",
      json.encode({{ParameterKey = "Size", ParameterValue = "2"}}))
    helpers.write(dir .. "/parameters/a.json", json.encode({
      {ParameterKey = "Suffix", ParameterValue = "z"}, {ParameterKey = "Size", ParameterValue = "1"}}))
    local step = new_step({["cfn-stack-name"] = "web",
      ["cfn-files"] = {parameters = {["template-param-file"] = "parameters.json"}},
      ["cfn-merge-parameters"] = {enabled = true}}, {["validate-cfn"] = false},
      {["aws cloudformation describe-stacks"] = described("CREATE_COMPLETE")})
    cfn:deploy(step)
    assert.equals("aws cloudformation update-stack --stack-name web --template-body file://"
      .. dir .. "/template.yaml --parameters file:///private/cfn-parameters.json", step.commands[2])
    assert.are.same({{ParameterKey = "Suffix", ParameterValue = "z"}, {ParameterKey = "Size", ParameterValue = "2"}},
      json.decode(step.files["/private/cfn-parameters.json"]))
  end)

  it("uploads the template with s3bucket and s3prefix and deploys it from its URL", function()
    local step = new_step({["cfn-stack-name"] = "web", s3bucket = "tpl-bucket", s3prefix = "/stacks/web/"},
      nil, {["aws cloudformation describe-stacks"] = sequence(ABSENT, described("CREATE_COMPLETE"))})
    cfn:deploy(step)
    local url = "https://tpl-bucket.s3.amazonaws.com/stacks/web/template.yaml"
    assert.are.same({
      cmd "aws s3 cp DIR/template.yaml s3://tpl-bucket/stacks/web/template.yaml",
      "aws cloudformation validate-template --template-url " .. url,
      "aws cloudformation describe-stacks --stack-name web --output json",
      "aws cloudformation create-stack --stack-name web --template-url " .. url,
      "aws cloudformation wait stack-create-complete --stack-name web",
      "aws cloudformation describe-stacks --stack-name web --output json",
    }, step.commands)
  end)

  it("fails a failed upload naming the stack, the key and the config file", function()
    local step = new_step({["cfn-stack-name"] = "web", s3bucket = "nope"}, nil,
      {["aws s3 cp"] = err("upload failed: NoSuchBucket")})
    local msg = failure(function() cfn:deploy(step) end)
    assert.equals("stack 'web': uploading the template to s3://nope/template.yaml failed (exit 255) "
      .. "(options.s3bucket, test/cloudformation/bitops.config.yaml): upload failed: NoSuchBucket", msg)
  end)

  it("skips validate-template with validate-cfn: false", function()
    local step = new_step({["cfn-stack-name"] = "web"}, {["validate-cfn"] = false},
      {["aws cloudformation describe-stacks"] = described("CREATE_COMPLETE")})
    cfn:deploy(step)
    assert.equals("aws cloudformation describe-stacks --stack-name web --output json", step.commands[1])
  end)

  it("fails an invalid template naming the stack, the key, the file and the error", function()
    local step = new_step({["cfn-stack-name"] = "web"}, nil,
      {["aws cloudformation validate-template"] = err("An error occurred (ValidationError): bad node")})
    local msg = failure(function() cfn:deploy(step) end)
    assert.equals("stack 'web': validate-template of template.yaml failed (exit 255) "
      .. "(options.cfn-files.template-file, test/cloudformation/bitops.config.yaml): "
      .. "An error occurred (ValidationError): bad node", msg)
    assert.equals(1, #step.commands)
  end)

  it("deletes a ROLLBACK_COMPLETE stack before creating it again, logging why it failed", function()
    local step = new_step({["cfn-stack-name"] = "web"}, {["validate-cfn"] = false}, {
      ["aws cloudformation describe-stacks"] = sequence(described("ROLLBACK_COMPLETE"),
        described("CREATE_COMPLETE")),
      ["aws cloudformation describe-stack-events"] = ok(json.encode({StackEvents = {
        {LogicalResourceId = "Bucket", ResourceStatus = "CREATE_FAILED", ResourceStatusReason = "Bucket exists"},
      }})),
    })
    cfn:deploy(step)
    assert.are.same({
      "aws cloudformation describe-stacks --stack-name web --output json",
      "aws cloudformation describe-stack-events --stack-name web --output json",
      "aws cloudformation delete-stack --stack-name web",
      "aws cloudformation wait stack-delete-complete --stack-name web",
      cmd "aws cloudformation create-stack --stack-name web --template-body file://DIR/template.yaml",
      "aws cloudformation wait stack-create-complete --stack-name web",
      "aws cloudformation describe-stacks --stack-name web --output json",
    }, step.commands)
    assert.is_true(logged(step, "warn: stack 'web' is in ROLLBACK_COMPLETE (its creation failed: "
      .. "Bucket CREATE_FAILED: Bucket exists): deleting it to create it again"))
  end)

  it("refuses a stack that is busy or failed, saying what to do", function()
    local cases = {
      UPDATE_IN_PROGRESS = "another operation is running on it",
      UPDATE_ROLLBACK_FAILED = "aws cloudformation continue-update-rollback --stack-name web",
      DELETE_FAILED = "aws cloudformation delete-stack --stack-name web",
      REVIEW_IN_PROGRESS = "a change set created it and was not executed",
    }
    for status, hint in pairs(cases) do
      local step = new_step({["cfn-stack-name"] = "web"}, {["validate-cfn"] = false},
        {["aws cloudformation describe-stacks"] = described(status)})
      local msg = failure(function() cfn:deploy(step) end)
      assert.matches("stack 'web' is in state " .. status .. " and cannot be updated: ", msg, 1, true)
      assert.matches(hint, msg, 1, true)
      assert.equals(1, #step.commands)
    end
  end)

  it("explains a failed creation with the first failed event of the stack", function()
    local events = json.encode({StackEvents = {
      {LogicalResourceId = "web", ResourceStatus = "ROLLBACK_COMPLETE"},
      {LogicalResourceId = "Bucket", ResourceStatus = "DELETE_COMPLETE"},
      {LogicalResourceId = "web", ResourceStatus = "ROLLBACK_IN_PROGRESS", ResourceStatusReason = "x"},
      {LogicalResourceId = "Bucket", ResourceStatus = "CREATE_FAILED", ResourceStatusReason = "Bucket exists"},
      {LogicalResourceId = "web", ResourceStatus = "CREATE_IN_PROGRESS", ResourceStatusReason = "User Initiated"},
      {LogicalResourceId = "Old", ResourceStatus = "UPDATE_FAILED", ResourceStatusReason = "older run"},
    }})
    local step = new_step({["cfn-stack-name"] = "web"}, {["validate-cfn"] = false}, {
      ["aws cloudformation describe-stacks"] = ABSENT,
      ["aws cloudformation wait"] = err("Waiter StackCreateComplete failed: terminal failure state"),
      ["aws cloudformation describe-stack-events"] = ok(events),
    })
    local msg = failure(function() cfn:deploy(step) end)
    assert.equals("stack 'web': wait stack-create-complete failed (exit 255): Waiter StackCreateComplete "
      .. "failed: terminal failure state\nBucket CREATE_FAILED: Bucket exists", msg)
    assert.equals("aws cloudformation describe-stack-events --stack-name web --output json", step.commands[#step.commands])
  end)

  it("fails a describe-stacks error other than 'does not exist'", function()
    local step = new_step({["cfn-stack-name"] = "web"}, {["validate-cfn"] = false},
      {["aws cloudformation describe-stacks"] = err("Could not connect to the endpoint URL")})
    local msg = failure(function() cfn:deploy(step) end)
    assert.equals("stack 'web': describe-stacks failed (exit 255): Could not connect to the endpoint URL", msg)
  end)

  it("in a dry run, shows the create path (whether the stack exists is unknown)", function()
    local dry = {ok = true, code = 0, stdout = "", stderr = "", dry_run = true}
    local step = new_step({["cfn-stack-name"] = "web"}, nil, {aws = dry}, {dry_run = true})
    cfn:deploy(step)
    assert.are.same({
      cmd "aws cloudformation validate-template --template-body file://DIR/template.yaml",
      "aws cloudformation describe-stacks --stack-name web --output json",
      cmd "aws cloudformation create-stack --stack-name web --template-body file://DIR/template.yaml",
      "aws cloudformation wait stack-create-complete --stack-name web",
      "aws cloudformation describe-stacks --stack-name web --output json",
    }, step.commands)
    -- and says nothing was created
    for _, line in ipairs(step.log.lines) do assert.not_matches("created", line) end
  end)

  it("runs every aws command with AWS_PAGER empty and in the step's folder", function()
    local step = new_step({["cfn-stack-name"] = "web"}, nil,
      {["aws cloudformation describe-stacks"] = described("CREATE_COMPLETE")})
    cfn:deploy(step)
    for _, r in ipairs(step.runs) do
      assert.equals("", r.opts.env.AWS_PAGER)
      assert.is_nil(r.opts.cwd)
    end
  end)
end)

describe("cloudformation delete", function()
  it("deletes a stack that exists and waits for stack-delete-complete, without validating", function()
    local step = new_step({["cfn-stack-name"] = "web", region = "us-west-2"}, {["stack-action"] = "Delete"},
      {["aws cloudformation describe-stacks"] = described("CREATE_COMPLETE")})
    cfn:deploy(step)
    assert.are.same({
      "aws cloudformation describe-stacks --stack-name web --output json --region us-west-2",
      "aws cloudformation delete-stack --stack-name web --region us-west-2",
      "aws cloudformation wait stack-delete-complete --stack-name web --region us-west-2",
    }, step.commands)
    assert.is_true(logged(step, "stack 'web' deleted"))
  end)

  it("does nothing for a stack that does not exist", function()
    local step = new_step({["cfn-stack-name"] = "web"}, {["stack-action"] = "delete"},
      {["aws cloudformation describe-stacks"] = ABSENT})
    cfn:deploy(step)
    assert.are.same({"aws cloudformation describe-stacks --stack-name web --output json"}, step.commands)
    assert.is_true(logged(step, "stack 'web' does not exist: nothing to delete"))
  end)

  it("does not need the template", function()
    helpers.rmtree(dir)
    dir = helpers.tmpdir()
    local step = new_step({["cfn-stack-name"] = "web"}, {["stack-action"] = "delete"},
      {["aws cloudformation describe-stacks"] = described("CREATE_COMPLETE")})
    cfn:deploy(step)
    assert.equals(3, #step.commands)
  end)
end)

describe("cloudformation configuration errors", function()
  it("names the key and the file when cfn-stack-name is missing", function()
    local step = new_step({})
    assert.equals("options.cfn-stack-name is required (test/cloudformation/bitops.config.yaml)",
      failure(function() cfn:deploy(step) end))
    assert.are.same({}, step.commands)
  end)

  it("takes an empty cfn-stack-name or a YAML null as missing, as BitOps did", function()
    for _, v in ipairs({"", json.null}) do
      local msg = failure(function() cfn:deploy(new_step({["cfn-stack-name"] = v})) end)
      assert.matches("options.cfn-stack-name is required", msg, 1, true)
    end
  end)

  it("refuses a stack-action other than deploy or delete", function()
    local msg = failure(function() cfn:deploy(new_step({["cfn-stack-name"] = "web"}, {["stack-action"] = "apply"})) end)
    assert.equals("cli.stack-action must be deploy or delete, not 'apply' (test/cloudformation/bitops.config.yaml)", msg)
  end)

  it("names the key, the file and the folder when the template is missing", function()
    local step = new_step({["cfn-stack-name"] = "web", ["cfn-files"] = {["template-file"] = "stack.yaml"}})
    assert.equals("options.cfn-files.template-file names stack.yaml, which does not exist in " .. dir
      .. " (stack 'web') (test/cloudformation/bitops.config.yaml)", failure(function() cfn:deploy(step) end))
    assert.are.same({}, step.commands)
  end)

  it("names the key and the file when the parameters file is missing or malformed", function()
    local step = new_step({["cfn-stack-name"] = "web",
      ["cfn-files"] = {parameters = {["template-param-file"] = "params.json"}}})
    assert.equals("options.cfn-files.parameters.template-param-file names params.json, which does not exist in "
      .. dir .. " (stack 'web') (test/cloudformation/bitops.config.yaml)", failure(function() cfn:deploy(step) end))
    helpers.write(dir .. "/params.json", '{"Suffix": "a"}')
    local msg = failure(function() cfn:deploy(step) end)
    assert.matches("options.cfn-files.parameters.template-param-file names " .. dir .. "/params.json, "
      .. "which is not a JSON array", msg, 1, true)
    assert.are.same({}, step.commands)
  end)

  it("refuses s3prefix without s3bucket", function()
    local msg = failure(function() cfn:deploy(new_step({["cfn-stack-name"] = "web", s3prefix = "x"})) end)
    assert.equals("options.s3prefix is set but options.s3bucket is not (test/cloudformation/bitops.config.yaml)", msg)
  end)

  it("declares BitOps' keys and environment variables in its schema", function()
    local s = cfn.schema
    assert.equals("CFN_STACK_NAME", s.options["cfn-stack-name"].export_env)
    assert.is_true(s.options["cfn-stack-name"].required)
    assert.equals("CFN_STACK_ACTION", s.cli["stack-action"].export_env)
    assert.equals("CFN_SKIP_DEPLOY", s.cli["skip-deploy"].export_env)
    assert.equals("CFN_TEMPLATE_VALIDATION", s.cli["validate-cfn"].export_env)
    assert.equals("template.yaml", s.options["cfn-files"].properties["template-file"].default)
    assert.equals("CFN_TEMPLATE_PARAMS_FILENAME",
      s.options["cfn-files"].properties.parameters.properties["template-param-file"].export_env)
  end)
end)

describe("cloudformation overrides", function()
  it("sees an overridden stage, because stages call each other through self", function()
    local custom = setmetatable({}, {__index = cfn})
    function custom:update(step, stack)
      step.log.info("custom update of " .. stack.name)
      return false
    end
    local step = new_step({["cfn-stack-name"] = "web"}, {["validate-cfn"] = false},
      {["aws cloudformation describe-stacks"] = described("CREATE_COMPLETE")})
    custom:deploy(step)
    assert.is_true(logged(step, "custom update of web"))
    assert.are.same({"aws cloudformation describe-stacks --stack-name web --output json",
      "aws cloudformation describe-stacks --stack-name web --output json"}, step.commands)
  end)
end)

-- A step that really runs its commands: ops.proc.run in step.dir with step.vars, the
-- command's own env and moto's AWS_* variables.
local function real_step(folder, options, cli, aws_env)
  local step = fake_step.new{tool = "cloudformation", dir = folder, config = {cli = cli or {}, options = options}}
  function step:run(argv, opts)
    opts = opts or {}
    self.commands[#self.commands + 1] = table.concat(argv, " ")
    local env = {}
    for _, t in ipairs({self.vars, aws_env, opts.env or {}}) do
      for k, v in pairs(t) do env[k] = v end
    end
    return assert(ops.proc.run(argv, {cwd = opts.cwd or self.dir, env = env, stdin = opts.stdin,
                                      timeout = opts.timeout or 60}))
  end
  function step:private_file(name, content)
    local path = self.dir .. "/.private-" .. name
    helpers.write(path, content)
    return path
  end
  return step
end

-- The its below run in order against one stack, each starting from what the last left.
describe("cloudformation against moto_server", function()
  local why = moto.missing()
  if why then
    pending(why)
    return
  end

  local server, folder
  local stack = "opsrun-spec-" .. ops.crypto.hex(ops.crypto.random(4))

  local function aws(argv)
    local full = {"aws"}
    for _, a in ipairs(argv) do full[#full + 1] = a end
    local r = assert(ops.proc.run(full, {env = server.env, timeout = 60}))
    assert(r.ok, table.concat(full, " ") .. ": " .. r.stderr)
    return r.stdout
  end

  local function status()
    local out = aws({"cloudformation", "describe-stacks", "--stack-name", stack, "--output", "json"})
    return json.decode(out).Stacks[1].StackStatus
  end

  local function deploy(extra_options, cli)
    local options = {["cfn-stack-name"] = stack,
                     ["cfn-files"] = {parameters = {["template-param-file"] = "parameters.json"}}}
    for k, v in pairs(extra_options or {}) do options[k] = v end
    local step = real_step(folder, options, cli, server.env)
    cfn:deploy(step)
    return step
  end

  setup(function()
    server = assert(moto.start())
    folder = helpers.tmpdir()
    helpers.write(folder .. "/template.yaml", TEMPLATE)
    helpers.write(folder .. "/parameters.json", params("a"))
  end)

  teardown(function()
    if server then server:stop() end
    if folder then helpers.rmtree(folder) end
  end)

  local t_create = "aws cloudformation create-stack --stack-name STACK --template-body file://FOLDER/template.yaml "
    .. "--parameters file://FOLDER/parameters.json"
  local function real(s) return (s:gsub("STACK", stack):gsub("FOLDER", folder)) end

  it("creates the stack (an S3 bucket), waits for it and reads its outputs", function()
    local step = deploy()
    assert.are.same({
      real "aws cloudformation validate-template --template-body file://FOLDER/template.yaml",
      real "aws cloudformation describe-stacks --stack-name STACK --output json",
      real(t_create),
      real "aws cloudformation wait stack-create-complete --stack-name STACK",
      real "aws cloudformation describe-stacks --stack-name STACK --output json",
    }, step.commands)
    assert.equals("CREATE_COMPLETE", status())
    assert.equals("opsrun-spec-" .. stack, step.outputs.cloudformation.BucketName)
    assert.equals("label-a", step.vars.CFN_OUTPUT_LABEL)
    aws({"s3api", "head-bucket", "--bucket", "opsrun-spec-" .. stack})
  end)

  -- validate-cfn: false from here on saves time: each aws call costs about a second
  it("updates it when a parameter changes, and reads the new outputs", function()
    helpers.write(folder .. "/parameters.json", params("b"))
    local step = deploy(nil, {["validate-cfn"] = false})
    assert.are.same({
      real "aws cloudformation describe-stacks --stack-name STACK --output json",
      real((t_create:gsub("create%-stack", "update-stack"))),
      real "aws cloudformation wait stack-update-complete --stack-name STACK",
      real "aws cloudformation describe-stacks --stack-name STACK --output json",
    }, step.commands)
    assert.equals("label-b", step.outputs.cloudformation.Label)
  end)

  it("takes 'No updates are to be performed' from the real CLI as success", function()
    local step = deploy(nil, {["validate-cfn"] = false})
    assert.equals(3, #step.commands) -- describe, update-stack, describe: no wait
    assert.is_true(logged(step, "stack '" .. stack .. "': no changes"))
    assert.equals("label-b", step.vars.CFN_OUTPUT_LABEL)
  end)

  it("uploads the template to S3 and deploys it from its URL", function()
    aws({"s3", "mb", "s3://opsrun-spec-templates"})
    local step = deploy({s3bucket = "opsrun-spec-templates", s3prefix = "cfn"})
    local url = "https://opsrun-spec-templates.s3.amazonaws.com/cfn/template.yaml"
    assert.equals(real "aws s3 cp FOLDER/template.yaml s3://opsrun-spec-templates/cfn/template.yaml",
      step.commands[1])
    assert.equals("aws cloudformation validate-template --template-url " .. url, step.commands[2])
    assert.matches("--template-url " .. url, step.commands[4], 1, true)
    assert.is_true(logged(step, "no changes")) -- same template and parameters, read from S3
    assert.matches("template.yaml", aws({"s3", "ls", "s3://opsrun-spec-templates/cfn/"}), 1, true)
  end)

  it("deletes the stack and waits until it is gone", function()
    local step = deploy(nil, {["stack-action"] = "delete"})
    assert.are.same({
      real "aws cloudformation describe-stacks --stack-name STACK --output json",
      real "aws cloudformation delete-stack --stack-name STACK",
      real "aws cloudformation wait stack-delete-complete --stack-name STACK",
    }, step.commands)
    local r = assert(ops.proc.run({"aws", "cloudformation", "describe-stacks", "--stack-name", stack},
      {env = server.env}))
    assert.is_false(r.ok)
    assert.matches("does not exist", r.stderr, 1, true)
  end)

  it("deletes nothing when the stack does not exist", function()
    local step = deploy(nil, {["stack-action"] = "delete"})
    assert.equals(1, #step.commands)
  end)

  it("stops moto_server and leaves no process behind", function()
    local pid = server.pid
    server:stop()
    assert.is_false(helpers.alive(pid))
    for _, child in ipairs(helpers.children()) do assert.are_not.equal(pid, child) end
  end)
end)
