-- The Helm driver (lua/tools/helm.lua) against docs/drivers.md: exact command sequences with
-- the fake step, then upgrade/rollback through the Helm double (tests/doubles/helm).
local helpers = require "helpers"
local fake_step = require "fake_step"
local helm = require "tools.helm"

local CHART = "apiVersion: v2\nname: %s\nversion: 0.1.0\n"
local DEPS = "apiVersion: v2\nname: %s\nversion: 0.1.0\ndependencies:\n"
  .. "  - name: redis\n    version: 17.0.0\n    repository: https://charts.example.com\n"

local root

local function mkdir(path) assert(ops.fs.mkdir_p(path)) end

-- A working copy with the helm folder of environment "test" at root/test/helm.
local function helm_dir() return root .. "/test/helm" end

local function chart(name, chart_yaml)
  mkdir(helm_dir() .. "/" .. name)
  helpers.write(helm_dir() .. "/" .. name .. "/Chart.yaml", chart_yaml or CHART:format(name))
  return helm_dir() .. "/" .. name
end

local function step_with(o)
  o = o or {}
  return fake_step.new{
    tool = "helm", dir = helm_dir(), env_dir = root .. "/test", workdir = root,
    config = {cli = o.cli or {namespace = "apps", timeout = "500s"}, options = o.options or {}},
    vars = o.vars, results = o.results, dry_run = o.dry_run,
  }
end

-- The failure the driver raised through step:fail, as the user sees it.
local function failure(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, "expected the step to fail")
  assert.is_true(type(err) == "table" and err.step_failure, "not a step failure: " .. tostring(err))
  return err.message
end

local function upgrade_of(release, dir, extra)
  return "helm upgrade " .. release .. " " .. dir
    .. " --install --namespace apps --create-namespace --timeout 500s" .. (extra or "")
end

before_each(function()
  root = helpers.tmpdir()
  mkdir(helm_dir())
end)

after_each(function() helpers.rmtree(root) end)

describe("helm driver: chart folders", function()
  it("deploys every subfolder with a Chart.yaml, alphabetically, one release per folder", function()
    local web = chart("web")
    local api = chart("api")
    mkdir(helm_dir() .. "/docs")                     -- no Chart.yaml: not a chart
    chart("_default")                                -- the defaults folder is never deployed
    helpers.write(helm_dir() .. "/bitops.config.yaml", "helm: {}\n")
    local step = step_with()
    helm:deploy(step)
    assert.are.same({upgrade_of("api", api), upgrade_of("web", web)}, step.commands)
  end)

  it("deploys only the folder BITOPS_ENVIRONMENT_HELM_SUBDIRECTORY names", function()
    chart("api")
    local web = chart("web")
    local step = step_with{vars = {BITOPS_ENVIRONMENT_HELM_SUBDIRECTORY = "web"}}
    helm:deploy(step)
    assert.are.same({upgrade_of("web", web)}, step.commands)
  end)

  it("fails when BITOPS_ENVIRONMENT_HELM_SUBDIRECTORY names a folder without a Chart.yaml", function()
    chart("web")
    local step = step_with{vars = {BITOPS_ENVIRONMENT_HELM_SUBDIRECTORY = "wbe"}}
    assert.are.equal("BITOPS_ENVIRONMENT_HELM_SUBDIRECTORY is wbe, but test/helm/wbe has no "
      .. "Chart.yaml: name one chart folder of test/helm", failure(helm.deploy, helm, step))
    assert.are.same({}, step.commands)
  end)

  it("deploys the step folder itself when it is a chart, as a release named after it", function()
    helpers.write(helm_dir() .. "/Chart.yaml", CHART:format("helm"))
    chart("charts/redis") -- a vendored subchart is part of the chart, not a chart to deploy
    local step = step_with()
    helm:deploy(step)
    assert.are.same({upgrade_of("helm", helm_dir())}, step.commands)
  end)

  it("warns and runs nothing when there is no chart folder", function()
    local step = step_with()
    helm:deploy(step)
    assert.are.same({}, step.commands)
    assert.are.same({"warn: no chart folder in test/helm (a chart folder is a subfolder with a "
      .. "Chart.yaml): nothing to deploy"}, step.log.lines)
  end)

  it("fails naming the file when a Chart.yaml is not YAML", function()
    chart("web", "name: [web\n")
    local msg = failure(helm.deploy, helm, step_with())
    assert.truthy(msg:find("cannot read the chart: " .. helm_dir() .. "/web/Chart.yaml:", 1, true), msg)
  end)
end)

describe("helm driver: cli options", function()
  it("requires cli.namespace, naming the key and the config file", function()
    chart("web")
    local step = step_with{cli = {timeout = "500s"}}
    assert.are.equal("cli.namespace is required (test/helm/bitops.config.yaml): the Kubernetes "
      .. "namespace the releases go to", failure(helm.deploy, helm, step))
    assert.are.same({}, step.commands)
  end)

  it("treats an empty namespace (YAML null) as missing", function()
    chart("web")
    local step = step_with{cli = {namespace = ops.yaml.null}}
    assert.truthy(failure(helm.deploy, helm, step):find("cli.namespace is required", 1, true))
  end)

  it("passes the namespace and creates it", function()
    local web = chart("web")
    local step = step_with{cli = {namespace = "shop"}}
    helm:deploy(step)
    assert.are.same({"helm upgrade web " .. web
      .. " --install --namespace shop --create-namespace --timeout 500s"}, step.commands)
  end)

  it("uses a timeout of 500s unless cli.timeout says otherwise", function()
    local web = chart("web")
    local step = step_with{cli = {namespace = "apps"}}
    helm:deploy(step)
    step = step_with{cli = {namespace = "apps", timeout = "10m0s"}}
    helm:deploy(step)
    assert.are.same({"helm upgrade web " .. web
      .. " --install --namespace apps --create-namespace --timeout 10m0s"}, step.commands)
  end)

  it("turns the cli.set list into one --set per item, in order", function()
    local web = chart("web")
    local step = step_with{cli = {namespace = "apps", set = {"image.tag=1.2", "replicas=3"}}}
    helm:deploy(step)
    assert.are.same({upgrade_of("web", web, " --set image.tag=1.2 --set replicas=3")}, step.commands)
  end)

  it("rejects a cli.set item that is not key=value", function()
    chart("web")
    local step = step_with{cli = {namespace = "apps", set = {"a=1", "replicas"}}}
    assert.are.equal("cli.set[2] is replicas, not key=value (test/helm/bitops.config.yaml)",
      failure(helm.deploy, helm, step))
  end)

  it("adds --atomic, --debug, --force and --dry-run when set, in that order", function()
    local web = chart("web")
    for _, case in ipairs({
      {{atomic = true}, " --atomic"},
      {{debug = true}, " --debug"},
      {{force = true}, " --force"},
      {{["dry-run"] = true}, " --dry-run"},
      {{["dry-run"] = true, force = true, debug = true, atomic = true}, " --atomic --debug --force --dry-run"},
      {{atomic = false, debug = false}, ""},
    }) do
      local c = case[1]
      c.namespace, c.timeout = "apps", "500s"
      local step = step_with{cli = c}
      helm:deploy(step)
      assert.are.same({upgrade_of("web", web, case[2])}, step.commands)
    end
  end)
end)

describe("helm driver: release names", function()
  it("uses options.release-name for the one chart", function()
    local web = chart("web")
    local step = step_with{options = {["release-name"] = "shop-web"}}
    helm:deploy(step)
    assert.are.same({upgrade_of("shop-web", web)}, step.commands)
  end)

  it("refuses one release-name for several charts", function()
    chart("api")
    chart("web")
    local step = step_with{options = {["release-name"] = "shop"}}
    assert.are.equal("options.release-name (shop) names one release, but test/helm has 2 charts "
      .. "(api, web) (test/helm/bitops.config.yaml): remove it to name each release after its "
      .. "chart folder, or deploy one chart with BITOPS_ENVIRONMENT_HELM_SUBDIRECTORY",
      failure(helm.deploy, helm, step))
  end)

  it("refuses a chart folder name Helm would refuse as a release name", function()
    chart("My_Web")
    local msg = failure(helm.deploy, helm, step_with())
    assert.truthy(msg:find('release name "My_Web" (the chart folder\'s name) is not a valid Helm '
      .. "release name", 1, true), msg)
  end)
end)

describe("helm driver: values files", function()
  it("passes them lowest precedence first: _default, values, versions, secrets, values-files/*", function()
    local web = chart("web")
    mkdir(root .. "/_default/helm/web")
    helpers.write(root .. "/_default/helm/web/values.yaml", "a: 0\n")
    mkdir(web .. "/values-files")
    for _, f in ipairs({"values.yaml", "values-versions.yaml", "values-secrets.yaml",
                        "values-files/b.yaml", "values-files/a.yaml", "values-files/.hidden.yaml"}) do
      helpers.write(web .. "/" .. f, "a: 1\n")
    end
    local step = step_with()
    helm:deploy(step)
    assert.are.same({upgrade_of("web", web, " -f " .. root .. "/_default/helm/web/values.yaml"
      .. " -f " .. web .. "/values.yaml -f " .. web .. "/values-versions.yaml"
      .. " -f " .. web .. "/values-secrets.yaml -f " .. web .. "/values-files/a.yaml"
      .. " -f " .. web .. "/values-files/b.yaml")}, step.commands)
  end)

  it("passes only the files that exist", function()
    local web = chart("web")
    helpers.write(web .. "/values-versions.yaml", "tag: 1\n")
    local step = step_with()
    helm:deploy(step)
    assert.are.same({upgrade_of("web", web, " -f " .. web .. "/values-versions.yaml")}, step.commands)
  end)

  it("finds the _default values under options.default-root-dir and default-sub-dir", function()
    local web = chart("web")
    mkdir(root .. "/defaults/charts/web")
    helpers.write(root .. "/defaults/charts/web/values.yaml", "a: 0\n")
    local step = step_with{options = {["default-root-dir"] = "defaults",
                                      ["default-sub-dir"] = "charts/web"}}
    helm:deploy(step)
    assert.are.same({upgrade_of("web", web, " -f " .. root .. "/defaults/charts/web/values.yaml")},
      step.commands)
  end)

  it("writes HELM_SECRETS_BASE64 to a private values-secrets file in the secrets' place", function()
    local web = chart("web")
    helpers.write(web .. "/values.yaml", "a: 1\n")
    helpers.write(web .. "/values-secrets.yaml", "committed: true\n") -- replaced by the variable
    mkdir(web .. "/values-files")
    helpers.write(web .. "/values-files/x.yaml", "x: 1\n")
    local secret = "db:\n  password: hunter22\n"
    local step = step_with{vars = {HELM_SECRETS_BASE64 = ops.crypto.base64_encode(secret)}}
    helm:deploy(step)
    assert.are.same({upgrade_of("web", web, " -f " .. web .. "/values.yaml"
      .. " -f /private/helm-web-values-secrets.yaml -f " .. web .. "/values-files/x.yaml")},
      step.commands)
    assert.are.equal(secret, step.files["/private/helm-web-values-secrets.yaml"])
    for _, line in ipairs(step.log.lines) do assert.falsy(line:find("hunter22", 1, true)) end
  end)

  it("fails clearly when HELM_SECRETS_BASE64 is not base64", function()
    chart("web")
    local step = step_with{vars = {HELM_SECRETS_BASE64 = "not*base64"}}
    local msg = failure(helm.deploy, helm, step)
    assert.truthy(msg:find("^HELM_SECRETS_BASE64 is not valid base64"), msg)
  end)
end)

describe("helm driver: kubeconfig", function()
  it("gives helm no --kubeconfig when none is configured", function()
    local web = chart("web")
    local step = step_with()
    helm:deploy(step)
    assert.are.same({upgrade_of("web", web)}, step.commands)
  end)

  it("uses options.k8s.kubeconfigpath, relative to the step folder", function()
    local web = chart("web")
    helpers.write(helm_dir() .. "/kube.yaml", "apiVersion: v1\n")
    local step = step_with{options = {k8s = {kubeconfigpath = "kube.yaml"}}}
    helm:deploy(step)
    assert.are.same({upgrade_of("web", web, " --kubeconfig " .. helm_dir() .. "/kube.yaml")},
      step.commands)
  end)

  it("uses KUBE_CONFIG_PATH when the config names none", function()
    local web = chart("web")
    helpers.write(root .. "/kube.yaml", "apiVersion: v1\n")
    local step = step_with{vars = {KUBE_CONFIG_PATH = root .. "/kube.yaml"}}
    helm:deploy(step)
    assert.are.same({upgrade_of("web", web, " --kubeconfig " .. root .. "/kube.yaml")}, step.commands)
  end)

  it("fails before running helm when the kubeconfig file does not exist", function()
    chart("web")
    local step = step_with{options = {k8s = {kubeconfigpath = "missing.yaml"}}}
    assert.are.equal("options.k8s.kubeconfigpath (or KUBE_CONFIG_PATH) is missing.yaml, but there "
      .. "is no such file (test/helm/bitops.config.yaml): give the path of a kubeconfig file, "
      .. "relative to test/helm or absolute", failure(helm.deploy, helm, step))
    assert.are.same({}, step.commands)
  end)

  it("decodes BITOPS_KUBECONFIG_BASE64 into a private file and never logs it", function()
    local web = chart("web")
    local kubeconfig = "apiVersion: v1\nusers:\n- name: admin\n  user: {token: s3cr3t-token}\n"
    local step = step_with{vars = {BITOPS_KUBECONFIG_BASE64 = ops.crypto.base64_encode(kubeconfig)}}
    helm:deploy(step)
    assert.are.same({upgrade_of("web", web, " --kubeconfig /private/kubeconfig")}, step.commands)
    assert.are.equal(kubeconfig, step.files["/private/kubeconfig"])
    for _, line in ipairs(step.log.lines) do
      assert.falsy(line:find("s3cr3t", 1, true))
      assert.falsy(line:find(step.vars.BITOPS_KUBECONFIG_BASE64, 1, true))
    end
  end)

  it("fetches the kubeconfig with aws eks update-kubeconfig for the cluster name", function()
    local web = chart("web")
    local step = step_with{options = {k8s = {fetch = {kubeconfig = true, ["cluster-name"] = "prod-eks"}}}}
    helm:deploy(step)
    assert.are.same({
      "aws eks update-kubeconfig --name prod-eks --kubeconfig /private/kubeconfig",
      upgrade_of("web", web, " --kubeconfig /private/kubeconfig"),
    }, step.commands)
  end)

  it("fetches when only the cluster name is set (BitOps' default fetch: true)", function()
    chart("web")
    local step = step_with{options = {k8s = {fetch = {["cluster-name"] = "prod-eks"}}}}
    helm:deploy(step)
    assert.are.equal("aws eks update-kubeconfig --name prod-eks --kubeconfig /private/kubeconfig",
      step.commands[1])
  end)

  it("requires the cluster name when fetching, naming the key", function()
    chart("web")
    local step = step_with{options = {k8s = {fetch = {kubeconfig = true}}}}
    assert.are.equal("options.k8s.fetch.cluster-name is required when options.k8s.fetch.kubeconfig "
      .. "is true (test/helm/bitops.config.yaml): name the EKS cluster to fetch the kubeconfig of",
      failure(helm.deploy, helm, step))
  end)

  it("stops when aws eks update-kubeconfig fails", function()
    chart("web")
    local step = step_with{
      options = {k8s = {fetch = {["cluster-name"] = "prod-eks"}}},
      results = {["aws eks"] = {ok = false, code = 254, stdout = "", stderr = "No cluster found"}},
    }
    assert.truthy(failure(helm.deploy, helm, step):find("No cluster found", 1, true))
    assert.are.equal(1, #step.commands)
  end)
end)

describe("helm driver: dependencies", function()
  it("runs helm dependency update before the upgrade when Chart.yaml declares dependencies", function()
    local web = chart("web", DEPS:format("web"))
    local step = step_with()
    helm:deploy(step)
    assert.are.same({"helm dependency update " .. web, upgrade_of("web", web)}, step.commands)
  end)

  it("runs it for a Helm 2 style requirements.yaml", function()
    local web = chart("web")
    helpers.write(web .. "/requirements.yaml", "dependencies:\n  - name: redis\n")
    local step = step_with()
    helm:deploy(step)
    assert.are.same({"helm dependency update " .. web, upgrade_of("web", web)}, step.commands)
  end)

  it("does not run it for a chart without dependencies", function()
    local web = chart("web", CHART:format("web") .. "dependencies: []\n")
    local step = step_with()
    helm:deploy(step)
    assert.are.same({upgrade_of("web", web)}, step.commands)
  end)

  it("stops before the upgrade when it fails", function()
    chart("web", DEPS:format("web"))
    local step = step_with{results = {["helm dependency"] = {ok = false, code = 1, stdout = "",
      stderr = "Error: no repository definition for https://charts.example.com"}}}
    assert.truthy(failure(helm.deploy, helm, step):find("no repository definition", 1, true))
    assert.are.equal(1, #step.commands)
  end)
end)

describe("helm driver: uninstall", function()
  it("uninstalls instead of upgrading when options.uninstall is true", function()
    chart("web", DEPS:format("web"))
    local step = step_with{options = {uninstall = true}}
    helm:deploy(step)
    assert.are.same({"helm uninstall web --namespace apps"}, step.commands)
  end)

  it("uninstalls when HELM_UNINSTALL is true, with the kubeconfig", function()
    chart("web")
    helpers.write(root .. "/kube.yaml", "apiVersion: v1\n")
    local step = step_with{vars = {HELM_UNINSTALL = "true", KUBE_CONFIG_PATH = root .. "/kube.yaml"}}
    helm:deploy(step)
    assert.are.same({"helm uninstall web --namespace apps --kubeconfig " .. root .. "/kube.yaml"},
      step.commands)
  end)

  it("uninstalls only the releases HELM_UNINSTALL_CHARTS lists", function()
    local api = chart("api")
    chart("web")
    local step = step_with{vars = {HELM_UNINSTALL_CHARTS = "web,other"}}
    helm:deploy(step)
    assert.are.same({upgrade_of("api", api), "helm uninstall web --namespace apps"}, step.commands)
  end)

  it("counts a release that is not installed as uninstalled", function()
    chart("web")
    local step = step_with{options = {uninstall = true}, results = {["helm uninstall"] = {ok = false,
      code = 1, stdout = "", stderr = "Error: uninstall: Release not loaded: web: release: not found"}}}
    helm:deploy(step)
    assert.are.same({"info: uninstalling release web",
                     "info: release web is not installed: nothing to uninstall"}, step.log.lines)
  end)

  it("fails when the uninstall fails otherwise", function()
    chart("web")
    local step = step_with{options = {uninstall = true}, results = {["helm uninstall"] = {ok = false,
      code = 1, stdout = "", stderr = "Error: Kubernetes cluster unreachable"}}}
    assert.are.equal("helm uninstall failed (exit 1): Error: Kubernetes cluster unreachable",
      failure(helm.deploy, helm, step))
  end)
end)

describe("helm driver: recover after a failed upgrade", function()
  local failed_upgrade = {ok = false, code = 1, stdout = "",
                          stderr = "Error: UPGRADE FAILED: context deadline exceeded"}

  local function history(revisions)
    return {ok = true, code = 0, stderr = "", stdout = ops.json.encode(revisions)}
  end

  -- What the engine does: deploy, and on failure recover before the on-failure hooks.
  local function deploy_and_recover(step)
    local ok, err = pcall(helm.deploy, helm, step)
    assert.is_false(ok)
    helm:recover(step, err)
    return err
  end

  it("rolls back to the newest deployed or superseded revision before the failed one", function()
    local web = chart("web")
    local step = step_with{results = {["helm upgrade"] = failed_upgrade, ["helm history"] = history{
      {revision = 3, status = "superseded"}, {revision = 4, status = "failed"},
      {revision = 1, status = "superseded"}, {revision = 2, status = "failed"}}}}
    deploy_and_recover(step)
    assert.are.same({
      upgrade_of("web", web),
      "helm history web -o json --namespace apps",
      "helm rollback web 3 --timeout 500s --namespace apps",
    }, step.commands)
    assert.is_true(step.runs[2].opts.quiet)
  end)

  it("rolls back to the revision still deployed when the failed upgrade left it so", function()
    chart("web")
    local step = step_with{results = {["helm upgrade"] = failed_upgrade, ["helm history"] = history{
      {revision = 1, status = "superseded"}, {revision = 2, status = "deployed"},
      {revision = 3, status = "failed"}}}}
    deploy_and_recover(step)
    assert.are.equal("helm rollback web 2 --timeout 500s --namespace apps", step.commands[3])
  end)

  it("uninstalls when the first install failed", function()
    chart("web")
    helpers.write(root .. "/kube.yaml", "apiVersion: v1\n")
    local step = step_with{vars = {KUBE_CONFIG_PATH = root .. "/kube.yaml"},
      results = {["helm upgrade"] = failed_upgrade,
                 ["helm history"] = history{{revision = 1, status = "failed"}}}}
    deploy_and_recover(step)
    assert.are.same({
      "helm history web -o json --namespace apps --kubeconfig " .. root .. "/kube.yaml",
      "helm uninstall web --namespace apps --kubeconfig " .. root .. "/kube.yaml",
    }, {step.commands[2], step.commands[3]})
  end)

  it("does nothing when --atomic already rolled back (the newest revision is deployed)", function()
    chart("web")
    local step = step_with{results = {["helm upgrade"] = failed_upgrade, ["helm history"] = history{
      {revision = 1, status = "superseded"}, {revision = 2, status = "failed"},
      {revision = 3, status = "deployed"}}}}
    deploy_and_recover(step)
    assert.are.equal(2, #step.commands)
  end)

  it("does nothing when the release does not exist (an atomic first install removed it)", function()
    chart("web")
    local step = step_with{results = {["helm upgrade"] = failed_upgrade, ["helm history"] = {
      ok = false, code = 1, stdout = "", stderr = "Error: release: not found"}}}
    deploy_and_recover(step)
    assert.are.equal(2, #step.commands)
  end)

  it("does nothing when the step failed before any upgrade", function()
    chart("web", DEPS:format("web"))
    local step = step_with{results = {["helm dependency"] = {ok = false, code = 1, stdout = "",
      stderr = "Error: boom"}}}
    deploy_and_recover(step)
    assert.are.same({"helm dependency update " .. helm_dir() .. "/web"}, step.commands)
  end)

  it("does nothing when a later chart failed before its upgrade", function()
    local api = chart("api")
    local web = chart("web", DEPS:format("web"))
    local step = step_with{results = {["helm dependency"] = {ok = false, code = 1, stdout = "",
      stderr = "Error: boom"}}}
    deploy_and_recover(step)
    assert.are.same({upgrade_of("api", api), "helm dependency update " .. web}, step.commands)
  end)

  it("recovers the chart that failed, not the ones deployed before it", function()
    chart("api")
    chart("web")
    local step = step_with{results = {
      ["helm upgrade web"] = failed_upgrade,
      ["helm history web"] = history{{revision = 1, status = "deployed"}, {revision = 2, status = "failed"}},
    }}
    deploy_and_recover(step)
    assert.are.equal("helm rollback web 1 --timeout 500s --namespace apps", step.commands[4])
  end)

  it("logs a failed rollback instead of raising over the upgrade's error", function()
    chart("web")
    local step = step_with{results = {["helm upgrade"] = failed_upgrade,
      ["helm history"] = history{{revision = 1, status = "deployed"}, {revision = 2, status = "failed"}},
      ["helm rollback"] = {ok = false, code = 1, stdout = "", stderr = "Error: cluster unreachable"}}}
    deploy_and_recover(step)
    assert.truthy(step.log.lines[#step.log.lines]:find(
      "^error: recovery of release web failed: helm rollback failed %(exit 1%): Error: cluster unreachable"),
      step.log.lines[#step.log.lines])
  end)

  it("does not roll back after a cli.dry-run upgrade, which changed nothing", function()
    chart("web")
    local step = step_with{cli = {namespace = "apps", ["dry-run"] = true},
                           results = {["helm upgrade"] = failed_upgrade}}
    deploy_and_recover(step)
    assert.are.equal(1, #step.commands)
  end)
end)

describe("helm driver with the Helm double", function()
  local doubles = assert(ops.fs.realpath(helpers.source .. "/tests/doubles"))
  local state

  -- A step that really runs its commands (in step.dir, with step.vars), tests/doubles first on PATH.
  local function real_step(o)
    local step = step_with(o)
    step.vars.PATH = doubles .. ":" .. os.getenv("PATH")
    step.vars.HELM_DOUBLE_STATE = state
    local record = step.run
    function step.run(self, argv, opts)
      record(self, argv, opts)
      return assert(ops.proc.run(argv, {cwd = self.dir, env = self.vars}))
    end
    function step.private_file(_, name, content)
      local path = root .. "/private-" .. name
      assert(ops.fs.write(path, content, "0600"))
      return path
    end
    return step
  end

  local function releases(release)
    local r = assert(ops.proc.run({doubles .. "/helm", "history", release, "-n", "apps", "-o", "json"},
      {env = {HELM_DOUBLE_STATE = state}}))
    assert(r.ok, r.stderr)
    local out = {}
    for _, rev in ipairs(assert(ops.json.decode(r.stdout))) do
      out[#out + 1] = rev.revision .. " " .. rev.status .. " " .. rev.description
    end
    return out
  end

  before_each(function() state = root .. "/helm-state" end)

  it("installs, upgrades, and rolls a failed upgrade back to the last good revision", function()
    local web = chart("web", DEPS:format("web"))
    helpers.write(web .. "/values.yaml", "replicas: 1\n")
    helm:deploy(real_step())
    helm:deploy(real_step())
    helpers.write(web .. "/FAIL_UPGRADE", "timed out waiting for the condition")
    local step = real_step()
    local ok, err = pcall(helm.deploy, helm, step)
    assert.is_false(ok)
    assert.truthy(err.message:find("UPGRADE FAILED: timed out waiting for the condition", 1, true),
      err.message)
    helm:recover(step, err)
    assert.are.same({
      "1 superseded Install complete",
      "2 superseded Upgrade complete",
      '3 failed Upgrade "web" failed: timed out waiting for the condition',
      "4 deployed Rollback to 2",
    }, releases("web"))
  end)

  it("uninstalls a release whose first install failed", function()
    local web = chart("web")
    helpers.write(web .. "/FAIL_UPGRADE", "")
    local step = real_step()
    local ok, err = pcall(helm.deploy, helm, step)
    assert.is_false(ok)
    helm:recover(step, err)
    local r = assert(ops.proc.run({doubles .. "/helm", "history", "web", "-n", "apps"},
      {env = {HELM_DOUBLE_STATE = state}}))
    assert.are.equal("Error: release: not found\n", r.stderr)
    assert.are.equal("helm uninstall web --namespace apps", step.commands[#step.commands])
  end)

  it("leaves the rollback to helm with cli.atomic", function()
    local web = chart("web")
    helm:deploy(real_step{cli = {namespace = "apps", atomic = true}})
    helpers.write(web .. "/FAIL_UPGRADE", "")
    local step = real_step{cli = {namespace = "apps", atomic = true}}
    local ok, err = pcall(helm.deploy, helm, step)
    assert.is_false(ok)
    helm:recover(step, err)
    assert.are.same({
      "1 superseded Install complete",
      '2 failed Upgrade "web" failed: context deadline exceeded',
      "3 deployed Rollback to 1",
    }, releases("web"))
  end)

  it("passes every argument helm accepts, with the kubeconfig and values files", function()
    local web = chart("web")
    helpers.write(web .. "/values.yaml", "a: 1\n")
    local step = real_step{
      cli = {namespace = "apps", timeout = "5m0s", set = {"a=2"}, debug = true, force = true},
      vars = {BITOPS_KUBECONFIG_BASE64 = ops.crypto.base64_encode("apiVersion: v1\n"),
              HELM_SECRETS_BASE64 = ops.crypto.base64_encode("password: x\n")},
    }
    helm:deploy(step)
    local calls = assert(helpers.read(state .. "/calls.jsonl"))
    local call = assert(ops.json.decode(calls:match("[^\n]+")))
    assert.are.equal(root .. "/private-kubeconfig", call.kubeconfig)
    assert.are.equal(0, call.exit)
    assert.are.same({"1 deployed Install complete"}, releases("web"))
  end)
end)
