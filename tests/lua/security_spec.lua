-- Security review: each test is a finding (path confinement, argument injection, secrets).
local helpers = require "helpers"
local fake_step = require "fake_step"
local plans = require "ops.serve.plans"
local git = require "ops.serve.git"
local helm = require "tools.helm"
local fs = require "ops.fs"

local root

before_each(function() root = helpers.tmpdir() end)
after_each(function() helpers.rmtree(root) end)

describe("plans mapper: a plan file that is a symlink", function()
  it("is not read when it leads outside the checkout", function()
    local checkout = root .. "/checkout"
    assert(fs.mkdir_p(checkout .. "/aws/foo/default"))
    helpers.write(root .. "/outside.yaml", "chart: leaked/from-outside\n")
    assert(fs.symlink(root .. "/outside.yaml", checkout .. "/aws/foo/default/demo.yaml"))
    local job = {hook = {name = "t"}, checkout = checkout, before = string.rep("a", 40),
      after = string.rep("b", 40), changes = {{status = "A", path = "aws/foo/default/demo.yaml"}}}
    local actions = plans.actions(job, {setup_name_size = 2})
    assert.are.equal(1, #actions)
    assert.is_nil(actions[1].plan)
    assert.truthy(actions[1].err and actions[1].err:find("outside", 1, true), tostring(actions[1].err))
  end)
end)

describe("plans mapper: values that helm would take as options", function()
  it("refuses a chart or version starting with '-'", function()
    local p, err = plans.parse("chart: --post-renderer=./x.sh\n", "aws/foo/ns/p.yaml")
    assert.is_nil(p)
    assert.truthy(err:find("chart", 1, true), err)
    p, err = plans.parse("chart: bitnami/nginx\nversion: --devel\n", "aws/foo/ns/p.yaml")
    assert.is_nil(p)
    assert.truthy(err:find("version", 1, true), err)
  end)
end)

describe("serve git: credentials in the repo URL", function()
  it("never reach the error message (logged and stored as the delivery's last error)", function()
    local ok, err = pcall(git.mirror, root .. "/m.git", "http://deployer:tok3nS3cretXYZ@127.0.0.1:9/ops.git")
    assert.is_false(ok)
    local msg = require("ops.deploy.failure").message(err)
    assert.falsy(msg:find("tok3nS3cretXYZ", 1, true), msg)
    assert.truthy(msg:find("127.0.0.1:9", 1, true), msg)
  end)
end)

describe("helm driver: confinement and secrets", function()
  local function mkdir(p) assert(fs.mkdir_p(p)) end
  local function step_with(o)
    return fake_step.new{tool = "helm", dir = root .. "/wc/test/helm", env_dir = root .. "/wc/test",
      workdir = root .. "/wc", config = {cli = {namespace = "apps"}, options = o.options or {}}, vars = o.vars}
  end

  it("refuses options.default-root-dir leading outside the working copy", function()
    mkdir(root .. "/wc/test/helm/web")
    helpers.write(root .. "/wc/test/helm/web/Chart.yaml", "apiVersion: v2\nname: web\nversion: 0.1.0\n")
    mkdir(root .. "/outside/web")
    helpers.write(root .. "/outside/web/values.yaml", "stolen: 1\n")
    local step = step_with{options = {["default-root-dir"] = "../outside", ["default-sub-dir"] = "web"}}
    local ok = pcall(helm.deploy, helm, step)
    for _, c in ipairs(step.commands) do
      assert.falsy(c:find(root .. "/outside", 1, true), c)
    end
    assert.is_false(ok)
  end)

  it("refuses a values file that is a symlink out of the working copy", function()
    mkdir(root .. "/wc/test/helm/web")
    helpers.write(root .. "/wc/test/helm/web/Chart.yaml", "apiVersion: v2\nname: web\nversion: 0.1.0\n")
    helpers.write(root .. "/host-values.yaml", "stolen: 1\n")
    assert(fs.symlink(root .. "/host-values.yaml", root .. "/wc/test/helm/web/values.yaml"))
    local step = step_with{}
    local ok = pcall(helm.deploy, helm, step)
    assert.is_false(ok)
  end)

  it("registers the values of HELM_SECRETS_BASE64 and BITOPS_KUBECONFIG_BASE64 as secrets", function()
    mkdir(root .. "/wc/test/helm/web")
    helpers.write(root .. "/wc/test/helm/web/Chart.yaml", "apiVersion: v2\nname: web\nversion: 0.1.0\n")
    local kc = "apiVersion: v1\nusers:\n- name: d\n  user: {token: kubeTok3nValue}\n"
    local step = step_with{vars = {
      HELM_SECRETS_BASE64 = ops.crypto.base64_encode("db:\n  password: hunter22pw\n"),
      BITOPS_KUBECONFIG_BASE64 = ops.crypto.base64_encode(kc),
    }}
    helm:deploy(step)
    local set = {}
    for _, s in ipairs(step.secrets) do set[s] = true end
    assert.is_true(set["hunter22pw"] == true, "the password inside HELM_SECRETS_BASE64 is not a secret")
    assert.is_true(set["kubeTok3nValue"] == true, "the kubeconfig token is not a secret")
    assert.is_true(set[kc] == true, "the kubeconfig text is not a secret")
  end)
end)
