-- ops.deploy.config and repo helpers: precedence, empty variables, BitOps masks.
local config = require "ops.deploy.config"
local repo = require "ops.deploy.repo"
local failure = require "ops.deploy.failure"

local SCHEMA = {
  options = {
    ["stack-action"] = {type = "string", export_env = "TERRAFORM_COMMAND"},
    ["skip-deploy"] = {type = "boolean", export_env = "TERRAFORM_SKIP_DEPLOY"},
  },
  cli = {target = {type = "list"}},
}

local function resolve(file, env)
  return config.resolve(SCHEMA, file, {
    tool = "terraform", where = "environment 'e': terraform step", file = "e/terraform/bitops.config.yaml",
    getenv = function(name) return env[name] end,
  })
end

describe("config precedence", function()
  local file = {terraform = {options = {["stack-action"] = "plan", ["skip-deploy"] = false}}}

  it("takes BITOPS_<TOOL>_<KEY> over BITOPS_<EXPORT_ENV> over <EXPORT_ENV> over the file", function()
    assert.are.equal("plan", resolve(file, {}).options["stack-action"])
    assert.are.equal("apply", resolve(file, {TERRAFORM_COMMAND = "apply"}).options["stack-action"])
    assert.are.equal("destroy", resolve(file, {TERRAFORM_COMMAND = "apply", BITOPS_TERRAFORM_COMMAND = "destroy"})
      .options["stack-action"])
    assert.are.equal("apply", resolve(file, {BITOPS_TERRAFORM_COMMAND = "destroy", BITOPS_TERRAFORM_STACK_ACTION = "apply"})
      .options["stack-action"])
  end)

  it("reads the process environment when no getenv is given, and sees sys.setenv's changes", function()
    local sys = require "ops.sys"
    local function action()
      return config.resolve(SCHEMA, file, {tool = "terraform", where = "w", file = "f"}).options["stack-action"]
    end
    sys.setenv("BITOPS_TERRAFORM_STACK_ACTION", nil)
    assert.are.equal("plan", action())
    sys.setenv("BITOPS_TERRAFORM_STACK_ACTION", "destroy")
    assert.are.equal("destroy", action())
    sys.setenv("BITOPS_TERRAFORM_STACK_ACTION", "apply")
    assert.are.equal("apply", action())
    sys.setenv("BITOPS_TERRAFORM_STACK_ACTION", nil)
    assert.are.equal("plan", action())
  end)

  it("treats a variable set to the empty string as not set", function()
    local cfg = resolve(file, {TERRAFORM_SKIP_DEPLOY = "", BITOPS_TERRAFORM_STACK_ACTION = ""})
    assert.is_false(cfg.options["skip-deploy"])
    assert.are.equal("plan", cfg.options["stack-action"])
  end)

  it("keeps a false from the file and exports what it resolved", function()
    local cfg, exports = resolve(file, {})
    assert.is_false(cfg.options["skip-deploy"])
    assert.are.equal("false", exports.TERRAFORM_SKIP_DEPLOY)
    assert.are.equal("plan", exports.TERRAFORM_COMMAND)
    assert.are.equal("plan", exports.BITOPS_TERRAFORM_COMMAND)
  end)

  it("names the key, the value and the file when a type is wrong", function()
    local ok, err = pcall(resolve, {terraform = {options = {["skip-deploy"] = "maybe"}}}, {})
    assert.is_false(ok)
    assert.is_true(failure.is(err))
    assert.matches("options.skip%-deploy must be true or false, not the string \"maybe\" %(e/terraform/bitops.config.yaml%)",
      failure.message(err))
  end)

  it("refuses a string with a NUL byte, which no command line can carry", function()
    local nul = "contains a NUL byte (\\0), which no command line or variable can carry (e/terraform/bitops.config.yaml)"
    for _, c in ipairs({
      {{options = {["stack-action"] = "pl\0an"}}, "options.stack-action " .. nul},
      {{cli = {target = {"a", "b\0"}}}, "cli.target item 2 " .. nul},
      {{cli = {target = "a\0"}}, "cli.target " .. nul},
    }) do
      local ok, err = pcall(resolve, c[1], {})
      assert.is_false(ok)
      assert.are.equal("environment 'e': terraform step: " .. c[2], failure.message(err))
    end
  end)

  it("reads a comma-separated list from a variable", function()
    assert.are.same({"a.b", "c"}, resolve({}, {BITOPS_TERRAFORM_TARGET = "a.b, c"}).cli.target)
  end)

  local NESTED = {
    options = {
      k8s = {type = "object", properties = {
        kubeconfigpath = {type = "string"},
        fetch = {type = "object", properties = {enabled = {type = "boolean", default = true}}},
      }},
      empty = {type = "object", properties = {}},
    },
  }
  local function nested(file, env, tool)
    return config.resolve(NESTED, file, {
      tool = tool or "helm", where = "environment 'e': helm step", file = "e/helm/bitops.config.yaml",
      getenv = function(name) return (env or {})[name] end,
    })
  end

  it("reads nested settings from the file, the environment and the defaults", function()
    local cfg = nested({helm = {options = {k8s = {kubeconfigpath = "/k"}}}})
    assert.are.equal("/k", cfg.options.k8s.kubeconfigpath)
    assert.is_true(cfg.options.k8s.fetch.enabled)
    assert.are.same({}, cfg.options.empty)
    cfg = nested({options = {k8s = {fetch = {enabled = false}}}}, {BITOPS_HELM_K8S_KUBECONFIGPATH = "/env"})
    assert.are.equal("/env", cfg.options.k8s.kubeconfigpath)
    assert.is_false(cfg.options.k8s.fetch.enabled)
    assert.is_false(nested({}, {BITOPS_HELM_K8S_FETCH_ENABLED = "no"}).options.k8s.fetch.enabled)
    -- the same schema for another tool reads that tool's variables
    assert.are.equal("/t", nested({}, {BITOPS_TERRAFORM_K8S_KUBECONFIGPATH = "/t"}, "terraform").options.k8s.kubeconfigpath)
    assert.is_nil(nested({}, {BITOPS_TERRAFORM_K8S_KUBECONFIGPATH = "/t"}).options.k8s.kubeconfigpath)
  end)

  it("warns of settings and sections it does not know, naming the key and the file", function()
    local _, _, warnings = nested({helm = {options = {k8s = {kubeconfig = "/k", fetch = {on = 1}}, colour = "red"}, extra = {}}})
    table.sort(warnings)
    assert.are.same({
      "environment 'e': helm step: extra is not a section opsrun knows (e/helm/bitops.config.yaml); ignored",
      "environment 'e': helm step: options.colour is not a setting opsrun knows; ignored (e/helm/bitops.config.yaml)",
      "environment 'e': helm step: options.k8s.fetch.on is not a setting opsrun knows; ignored (e/helm/bitops.config.yaml)",
      "environment 'e': helm step: options.k8s.kubeconfig is not a setting opsrun knows; ignored (e/helm/bitops.config.yaml)",
    }, warnings)
  end)

  it("fails when a level that holds settings is not a mapping", function()
    for _, file in ipairs({{options = "x"}, {options = {k8s = {"a", "b"}}}, {options = {k8s = {fetch = 3}}}}) do
      local ok, err = pcall(nested, file)
      assert.is_false(ok)
      assert.matches("must be a mapping, not", failure.message(err))
      assert.matches("(e/helm/bitops.config.yaml)", failure.message(err), 1, true)
    end
  end)

  it("takes the tool's own section left empty as no settings, and refuses one of another kind", function()
    local yaml = require "ops.yaml"
    for _, file in ipairs({{helm = yaml.null}, {helm = {}}, yaml.load("helm:\n")}) do
      local cfg, _, warnings = nested(file)
      assert.are.same({}, warnings)
      assert.is_nil(cfg.options.k8s.kubeconfigpath)
    end
    -- left empty beside the settings written flat: those count
    local cfg, _, warnings = nested({helm = yaml.null, options = {k8s = {kubeconfigpath = "/k"}}})
    assert.are.same({}, warnings)
    assert.are.equal("/k", cfg.options.k8s.kubeconfigpath)
    for file, kind in pairs({[{helm = 5}] = "the number 5", [{helm = {"a"}}] = "a list", [{helm = "on"}] = 'the string "on"'}) do
      local ok, err = pcall(nested, file)
      assert.is_false(ok)
      assert.are.equal("environment 'e': helm step: helm must be a mapping (cli:, options:), not " .. kind
        .. " (e/helm/bitops.config.yaml)", failure.message(err))
    end
  end)
end)

describe("BitOps logging.masks", function()
  it("translates the regex subset, groups and \\1 included", function()
    local masks = repo.mask_patterns({
      {search = [[(AWS_SECRET_ACCESS_KEY=)(\S+)]], replace = [[\1*******]]},
      {search = "[a-z]*_token", replace = "TOKEN"},
    }, "e/bitops.config.yaml")
    local line = "AWS_SECRET_ACCESS_KEY=abc/123 and github_token here"
    for _, m in ipairs(masks) do line = line:gsub(m[1], m[2]) end
    assert.are.equal("AWS_SECRET_ACCESS_KEY=******* and TOKEN here", line)
  end)

  it("refuses what Lua patterns cannot say, naming the mask", function()
    for _, re in ipairs({"a|b", "(ab)+", "x{3}", "(?i)x", "(open"}) do
      local ok, err = pcall(repo.mask_patterns, {{search = re}}, "e/bitops.config.yaml")
      assert.is_false(ok, re)
      assert.matches("bitops.logging.masks%[1%]", failure.message(err))
    end
  end)

  it("makes lazy quantifiers lazy", function()
    local p = repo.regex_to_pattern("<.+?>", "x")
    assert.are.equal("<a>", ("<a><b>"):match(p))
  end)
end)

describe("a step's output lines", function()
  it("lose terminal colour codes before they are logged or kept", function()
    local Step = require "ops.deploy.step"
    local s = Step.new({id = "e/terraform", vars = {}})
    s:output_line("\27[1m\27[32mApply complete!\27[0m Resources: 1 added.", "stdout")
    assert.are.equal("Apply complete! Resources: 1 added.", s.tail[1])
  end)
end)

describe("the order steps start in", function()
  local deploy = require "ops.deploy"
  local function chains(envs, len)
    local steps = {}
    for e = 1, envs do
      for k = 1, len do
        steps[#steps + 1] = {id = e .. "/" .. k, env = tostring(e), needs = k > 1 and {e .. "/" .. (k - 1)} or {}}
      end
    end
    return steps
  end
  local function ids(list)
    local out = {}
    for i, s in ipairs(list) do out[i] = s.id end
    return out
  end

  it("is the plan's order with one job", function()
    assert.are.same({"1/1", "1/2", "2/1", "2/2"}, ids(deploy.start_order(chains(2, 2), 1)))
  end)

  it("puts the longest chain still to come first with several jobs", function()
    assert.are.same({"1/1", "2/1", "1/2", "2/2"}, ids(deploy.start_order(chains(2, 2), 4)))
    local steps = {
      {id = "short", needs = {}}, {id = "a", needs = {}}, {id = "b", needs = {"a"}}, {id = "c", needs = {"b"}},
    }
    assert.are.same({"a", "b", "short", "c"}, ids(deploy.start_order(steps, 2)))
  end)
end)

describe("environment names", function()
  local h = require "helpers"

  it("are top-level folders of the repo, never a path out of it", function()
    local dir = h.tmpdir()
    assert(ops.fs.mkdir_p(dir .. "/repo/dev/terraform"))
    assert(ops.fs.mkdir_p(dir .. "/outside/terraform"))
    assert(ops.fs.mkdir_p(dir .. "/repo/_default/terraform"))
    assert.are.equal(1, #repo.plan_env(dir .. "/repo", "dev"))
    for _, bad in ipairs({"../outside", "dev/terraform", "/etc", ".", "..", "_default", ""}) do
      local ok, err = pcall(repo.plan_env, dir .. "/repo", bad)
      assert.is_false(ok, bad)
      assert.matches("environment '.*' not found in .* %(environments: dev%)", failure.message(err))
    end
    h.rmtree(dir)
  end)
end)

describe("hand-written steps", function()
  it("are refused when their folder or environment leads out of the repo", function()
    local deploy = require "ops.deploy"
    local h = require "helpers"
    local dir = h.tmpdir()
    assert(ops.fs.mkdir_p(dir .. "/dev/terraform"))
    for _, step in ipairs({
      {id = "a", env = "dev", tool = "terraform", folder = "../../etc"},
      {id = "b", env = "dev", tool = "terraform", dir = "/etc"},
      {id = "c", env = "../x", tool = "terraform", folder = "terraform"},
      {id = "d", env = "dev", tool = "terraform"},
    }) do
      local code = deploy.run({repo = dir, steps = {step}, dry_run = true, out = {write = function() end, flush = function() end}})
      assert.are.equal(1, code, step.id)
    end
    h.rmtree(dir)
  end)
end)

describe("skip-deploy", function()
  it("skips the step before its driver runs, in whichever section the tool keeps it", function()
    local deploy = require "ops.deploy"
    local h = require "helpers"
    local dir = h.tmpdir()
    assert(ops.fs.mkdir_p(dir .. "/dev/cloudformation"))
    assert(ops.fs.mkdir_p(dir .. "/dev/helm/web"))
    h.write(dir .. "/dev/cloudformation/bitops.config.yaml",
      "cloudformation:\n  cli:\n    skip-deploy: true\n  options:\n    cfn-stack-name: web\n")
    h.write(dir .. "/dev/helm/bitops.config.yaml", "helm:\n  cli:\n    namespace: ns\n  options:\n    skip-deploy: true\n")
    h.write(dir .. "/dev/helm/web/Chart.yaml", "name: web\n")
    local printed = {}
    local out = {write = function(self, ...) for _, x in ipairs({...}) do printed[#printed + 1] = x end return self end,
                 flush = function(self) return self end}
    local code, run = deploy.run({repo = dir, envs = {"dev"}, dry_run = true, out = out})
    assert.are.equal(0, code)
    assert.are.equal("skipped", run.by_id["dev/cloudformation"].status)
    assert.are.equal("skipped", run.by_id["dev/helm"].status)
    assert.is_nil(table.concat(printed):find("would run", 1, true))
    h.rmtree(dir)
  end)
end)
