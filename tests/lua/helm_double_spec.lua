-- The Helm double (tests/doubles/helm) behaves as Helm 3's CLI does for the commands the
-- helm driver uses: it rejects what helm rejects, and keeps helm's release history.
local helpers = require "helpers"

local DOUBLE = assert(ops.fs.realpath(helpers.source .. "/tests/doubles/helm"))
local root, state, chart_dir

local function helm(args, env)
  local argv = {DOUBLE}
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local vars = {HELM_DOUBLE_STATE = state, KUBECONFIG = false, HELM_DOUBLE_FAIL = false,
                HELM_DOUBLE_DELAY = false}
  for k, v in pairs(env or {}) do vars[k] = v end
  return assert(ops.proc.run(argv, {env = vars, cwd = root}))
end

-- Runs helm and expects it to fail as helm does: exit 1, one "Error: ..." on stderr.
local function rejected(args, env)
  local r = helm(args, env)
  assert.are.equal(1, r.code, "expected exit 1 for helm " .. table.concat(args, " "))
  assert.falsy(r.stdout:find("Error:", 1, true), "the error belongs on stderr")
  return r.stderr
end

local function ok(args, env)
  local r = helm(args, env)
  assert(r.ok, "helm " .. table.concat(args, " ") .. ": " .. r.stderr)
  return r.stdout
end

local function history(release, ns)
  local out = {}
  for _, rev in ipairs(assert(ops.json.decode(ok({"history", release, "-n", ns or "apps", "-o", "json"})))) do
    out[#out + 1] = rev.revision .. " " .. rev.status .. " " .. rev.description
  end
  return out
end

local function install(release, extra)
  local args = {"upgrade", release, chart_dir, "--install", "-n", "apps", "--create-namespace"}
  for _, a in ipairs(extra or {}) do args[#args + 1] = a end
  return ok(args)
end

before_each(function()
  root = helpers.tmpdir()
  state = root .. "/state"
  chart_dir = root .. "/web"
  assert(ops.fs.mkdir_p(chart_dir))
  helpers.write(chart_dir .. "/Chart.yaml", "apiVersion: v2\nname: web\nversion: 0.1.0\nappVersion: \"1.16\"\n")
  helpers.write(root .. "/values.yaml", "replicas: 2\n")
end)

after_each(function() helpers.rmtree(root) end)

describe("helm double: the command line", function()
  it("answers version --short as Helm 3.14", function()
    assert.are.equal("v3.14.0+gdouble\n", ok({"version", "--short"}))
  end)

  it("rejects unknown flags, long and short, as cobra does", function()
    assert.are.equal("Error: unknown flag: --foo\n", rejected({"upgrade", "web", chart_dir, "--foo"}))
    assert.are.equal("Error: unknown flag: --install\n", rejected({"history", "web", "--install"}))
    assert.are.equal("Error: unknown shorthand flag: 'z' in -z\n", rejected({"list", "-z"}))
    assert.are.equal("Error: unknown flag: --keep-history\n", rejected({"rollback", "web", "--keep-history"}))
  end)

  it("rejects a flag without its value", function()
    assert.are.equal("Error: flag needs an argument: --timeout\n",
      rejected({"upgrade", "web", chart_dir, "--timeout"}))
    assert.are.equal("Error: flag needs an argument: 'n' in -n\n", rejected({"history", "web", "-n"}))
  end)

  it("checks argument counts with helm's messages", function()
    assert.are.equal('Error: "helm upgrade" requires 2 arguments\n\nUsage:  helm upgrade [RELEASE] '
      .. "[CHART] [flags]\n", rejected({"upgrade", "web", "--install"}))
    assert.are.equal('Error: "helm history" requires 1 argument\n\nUsage:  helm history '
      .. "RELEASE_NAME [flags]\n", rejected({"history", "a", "b"}))
    assert.are.equal('Error: "helm rollback" requires at least 1 argument\n\nUsage:  helm rollback '
      .. "<RELEASE> [REVISION] [flags]\n", rejected({"rollback"}))
    assert.are.equal('Error: "helm uninstall" requires at least 1 argument\n\nUsage:  helm uninstall '
      .. "RELEASE_NAME [...] [flags]\n", rejected({"uninstall", "--keep-history"}))
    assert.are.equal('Error: "helm list" accepts no arguments\n\nUsage:  helm list [flags]\n',
      rejected({"list", "web"}))
    assert.are.equal('Error: "helm dependency update" accepts at most 1 argument\n\nUsage:  helm '
      .. "dependency update CHART [flags]\n", rejected({"dep", "up", "a", "b"}))
  end)

  it("rejects an unknown command", function()
    assert.are.equal("Error: unknown command \"deploy\" for \"helm\"\nRun 'helm --help' for usage.\n",
      rejected({"deploy", "web"}))
  end)

  it("accepts Go durations for --timeout and rejects others", function()
    for _, t in ipairs({"500s", "5m0s", "1h30m", "1.5h", "0"}) do
      install("web", {"--timeout", t})
    end
    assert.are.equal('Error: invalid argument "500" for "--timeout" flag: time: missing unit in '
      .. 'duration "500"\n', rejected({"upgrade", "web", chart_dir, "--timeout", "500"}))
    assert.are.equal('Error: invalid argument "5 m" for "--timeout" flag: time: invalid duration '
      .. '"5 m"\n', rejected({"upgrade", "web", chart_dir, "--timeout=5 m"}))
  end)

  it("rejects --set and --set-string items without a value", function()
    assert.are.equal('Error: failed parsing --set data: key "replicas" has no value\n',
      rejected({"upgrade", "web", chart_dir, "-i", "--set", "replicas"}))
    assert.are.equal('Error: failed parsing --set data: key "b" has no value\n',
      rejected({"upgrade", "web", chart_dir, "-i", "--set", "a=1,b"}))
    assert.are.equal('Error: failed parsing --set-string data: key "x" has no value\n',
      rejected({"upgrade", "web", chart_dir, "-i", "--set-string", "x"}))
    install("web", {"--set", "a=1,b={x,y}", "--set-string", "tag=01"})
  end)

  it("requires values files and a given kubeconfig to exist", function()
    assert.are.equal("Error: open nope.yaml: no such file or directory\n",
      rejected({"upgrade", "web", chart_dir, "-i", "-f", "nope.yaml"}))
    assert.are.equal("Error: Kubernetes cluster unreachable: stat /nope/kubeconfig: no such file "
      .. "or directory\n", rejected({"history", "web", "--kubeconfig", "/nope/kubeconfig"}))
    install("web", {"-f", root .. "/values.yaml", "--values=" .. root .. "/values.yaml"})
  end)

  it("rejects an output format helm does not know", function()
    assert.are.equal('Error: invalid argument "xml" for "-o, --output" flag: invalid format type\n',
      rejected({"history", "web", "-o", "xml"}))
  end)

  it("rejects a release name helm would", function()
    assert.truthy(rejected({"upgrade", "My_Web", chart_dir, "-i"})
      :find('^Error: release name "My_Web": invalid release name'))
  end)

  it("records every call with its argv, cwd and kubeconfig", function()
    helpers.write(root .. "/kube", "apiVersion: v1\n")
    ok({"version", "--short"})
    rejected({"history", "--bogus"})
    ok({"list", "--kubeconfig", root .. "/kube"})
    local calls = {}
    for line in helpers.read(state .. "/calls.jsonl"):gmatch("[^\n]+") do
      calls[#calls + 1] = assert(ops.json.decode(line))
    end
    assert.are.same({"helm", "version", "--short"}, calls[1].argv)
    assert.are.equal(root, calls[1].cwd)
    assert.are.equal(1, calls[2].exit)
    assert.are.equal(root .. "/kube", calls[3].kubeconfig)
  end)
end)

describe("helm double: release history", function()
  it("fails an upgrade of a missing release without --install", function()
    assert.are.equal('Error: UPGRADE FAILED: "web" has no deployed releases\n',
      rejected({"upgrade", "web", chart_dir, "-n", "apps"}))
  end)

  it("needs --create-namespace to install into a new namespace", function()
    assert.are.equal('Error: create: failed to create: namespaces "apps" not found\n',
      rejected({"upgrade", "web", chart_dir, "--install", "-n", "apps"}))
  end)

  it("installs revision 1, and each upgrade supersedes the one before", function()
    assert.truthy(install("web"):find('Release "web" does not exist. Installing it now.', 1, true))
    install("web")
    install("web", {"--description", "bump"})
    assert.are.same({"1 superseded Install complete", "2 superseded Upgrade complete",
                     "3 deployed bump"}, history("web"))
  end)

  it("keeps releases apart per namespace", function()
    install("web")
    ok({"upgrade", "web", chart_dir, "-i", "-n", "other", "--create-namespace"})
    ok({"upgrade", "web", chart_dir, "-n", "other"})
    assert.are.same({"1 deployed Install complete"}, history("web"))
    assert.are.equal(2, #history("web", "other"))
  end)

  it("records a failed upgrade as a failed revision and keeps the last one deployed", function()
    install("web")
    helpers.write(chart_dir .. "/FAIL_UPGRADE", "timed out waiting for the condition")
    assert.are.equal("Error: UPGRADE FAILED: timed out waiting for the condition\n",
      rejected({"upgrade", "web", chart_dir, "-i", "-n", "apps"}))
    assert.are.same({"1 deployed Install complete",
                     '2 failed Upgrade "web" failed: timed out waiting for the condition'}, history("web"))
    assert.are.equal("failed", ops.json.decode(ok({"status", "web", "-n", "apps", "-o", "json"})).info.status)
  end)

  it("fails upgrades on HELM_DOUBLE_FAIL=upgrade too", function()
    install("web")
    rejected({"upgrade", "web", chart_dir, "-n", "apps"}, {HELM_DOUBLE_FAIL = "upgrade"})
    assert.are.equal("2 failed", history("web")[2]:match("^%d+ %a+"))
  end)

  it("rolls back itself with --atomic: the failed revision, then a rollback revision", function()
    install("web")
    install("web")
    helpers.write(chart_dir .. "/FAIL_UPGRADE", "")
    assert.are.equal("Error: UPGRADE FAILED: release web failed, and has been rolled back due to "
      .. "atomic being set: context deadline exceeded\n",
      rejected({"upgrade", "web", chart_dir, "-i", "-n", "apps", "--atomic"}))
    assert.are.same({"1 superseded Install complete", "2 superseded Upgrade complete",
                     '3 failed Upgrade "web" failed: context deadline exceeded',
                     "4 deployed Rollback to 2"}, history("web"))
  end)

  it("removes a release whose atomic first install failed", function()
    helpers.write(chart_dir .. "/FAIL_UPGRADE", "")
    assert.are.equal("Error: release web failed, and has been uninstalled due to atomic being "
      .. "set: context deadline exceeded\n",
      rejected({"upgrade", "web", chart_dir, "-i", "-n", "apps", "--create-namespace", "--atomic"}))
    assert.are.equal("Error: release: not found\n", rejected({"history", "web", "-n", "apps"}))
  end)

  it("rolls back by creating a new revision, to the previous one by default", function()
    install("web")
    install("web")
    install("web")
    assert.are.equal("Rollback was a success! Happy Helming!\n", ok({"rollback", "web", "1", "-n", "apps"}))
    ok({"rollback", "web", "-n", "apps"})
    ok({"rollback", "web", "0", "-n", "apps"})
    assert.are.same({"1 superseded Install complete", "2 superseded Upgrade complete",
                     "3 superseded Upgrade complete", "4 superseded Rollback to 1",
                     "5 superseded Rollback to 3", "6 deployed Rollback to 4"}, history("web"))
  end)

  it("refuses a rollback to a revision that does not exist", function()
    install("web")
    assert.are.equal("Error: release has no 7 version\n", rejected({"rollback", "web", "7", "-n", "apps"}))
    assert.are.equal('Error: could not convert revision to a number: strconv.Atoi: parsing "x": '
      .. "invalid syntax\n", rejected({"rollback", "web", "x", "-n", "apps"}))
    assert.are.equal("Error: release: not found\n", rejected({"rollback", "api", "-n", "apps"}))
  end)

  it("limits history with --max and prints yaml", function()
    for _ = 1, 4 do install("web") end
    local rows = ops.json.decode(ok({"history", "web", "-n", "apps", "-o", "json", "--max", "2"}))
    assert.are.same({3, 4}, {rows[1].revision, rows[2].revision})
    local y = assert(ops.yaml.load(ok({"history", "web", "-n", "apps", "-o", "yaml", "--max=1"})))
    assert.are.same({app_version = "1.16", chart = "web-0.1.0", description = "Upgrade complete",
                     revision = 4, status = "deployed", updated = y[1].updated}, y[1])
  end)

  it("forgets an uninstalled release: history then fails with release: not found", function()
    install("web")
    assert.are.equal('release "web" uninstalled\n', ok({"uninstall", "web", "-n", "apps"}))
    assert.are.equal("Error: release: not found\n", rejected({"history", "web", "-n", "apps"}))
    assert.are.equal("Error: uninstall: Release not loaded: web: release: not found\n",
      rejected({"uninstall", "web", "-n", "apps"}))
  end)

  it("keeps the history of an uninstall with --keep-history, and reinstalls after it", function()
    install("web")
    ok({"uninstall", "web", "-n", "apps", "--keep-history", "--wait", "--timeout", "2m"})
    assert.are.same({"1 uninstalled Uninstallation complete"}, history("web"))
    install("web")
    assert.are.same({"1 uninstalled Uninstallation complete", "2 deployed Install complete"},
      history("web"))
  end)

  it("lists deployed and failed releases as JSON", function()
    install("web")
    rejected({"upgrade", "api", chart_dir, "-i", "-n", "apps"}, {HELM_DOUBLE_FAIL = "upgrade"})
    local rows = ops.json.decode(ok({"list", "-n", "apps", "-o", "json"}))
    assert.are.same({{"api", "failed", "1"}, {"web", "deployed", "1"}},
      {{rows[1].name, rows[1].status, rows[1].revision}, {rows[2].name, rows[2].status, rows[2].revision}})
  end)

  it("refuses an upgrade while another operation on the release is in progress", function()
    install("web")
    local slow = ops.spawn(function()
      return helm({"upgrade", "web", chart_dir, "-n", "apps"}, {HELM_DOUBLE_DELAY = "1"})
    end)
    ops.sleep(0.5)
    assert.are.equal("Error: UPGRADE FAILED: another operation (install/upgrade/rollback) is in "
      .. "progress\n", rejected({"upgrade", "web", chart_dir, "-n", "apps"}))
    local _, r = slow:wait()
    assert.is_true(r.ok)
    assert.are.same({"1 superseded Install complete", "2 deployed Upgrade complete"}, history("web"))
  end)
end)

describe("helm double: dependencies", function()
  local deps = "apiVersion: v2\nname: web\nversion: 0.1.0\ndependencies:\n"
    .. "  - name: redis\n    version: 17.0.0\n    repository: https://charts.example.com\n"

  it("refuses to install a chart whose dependencies are not in charts/", function()
    helpers.write(chart_dir .. "/Chart.yaml", deps)
    assert.truthy(rejected({"upgrade", "web", chart_dir, "-i", "-n", "apps", "--create-namespace"})
      :find("found in Chart.yaml, but missing in charts/ directory: redis", 1, true))
  end)

  it("fetches them with dependency update (alias dep up) and records that it ran", function()
    helpers.write(chart_dir .. "/Chart.yaml", deps)
    ok({"dep", "up", chart_dir})
    install("web")
    local rec = assert(ops.json.decode(helpers.read(state .. "/dependency-updates.jsonl")))
    assert.are.same({chart_dir, {"redis"}}, {rec.chart, rec.dependencies})
    assert.is_true(ops.fs.exists(chart_dir .. "/charts/redis-17.0.0.tgz"))
  end)

  it("requires a Chart.yaml in the chart folder", function()
    assert(ops.fs.mkdir_p(root .. "/empty"))
    assert.are.equal("Error: Chart.yaml file is missing\n", rejected({"dependency", "update", root .. "/empty"}))
    assert.are.equal('Error: path "' .. root .. '/none" not found\n',
      rejected({"upgrade", "web", root .. "/none", "-i"}))
  end)
end)
