-- The plans mapper of opsrun serve (the nuclio GitOps layout): a real git repo, pushes
-- made of commits, the Helm double on PATH, kubeconfigs from an HTTP server in this process.
local helpers = require "helpers"
local plans = require "ops.serve.plans"
local git = require "ops.serve.git"
local log = require "ops.log"
local json = require "ops.json"
local fs = require "ops.fs"
local sys = require "ops.sys"
local crypto = require "ops.crypto"

local DOUBLES = assert(fs.realpath(helpers.source .. "/tests/doubles"))
local TOKEN = "kc-token-5e5ef7a1c0ffee"
local KUBECONFIG = table.concat({
  "apiVersion: v1", "kind: Config",
  "clusters:", "- name: foo", "  cluster: {server: 'https://foo.example.com:6443'}",
  "users:", "- name: deployer", "  user: {token: " .. TOKEN .. "}",
  "contexts:", "- name: foo", "  context: {cluster: foo, user: deployer}",
  "current-context: foo", "",
}, "\n")
local CHART = "apiVersion: v2\nname: web\nversion: 0.1.0\n"
-- A hook script: records its name, the plan's variables and how many helm calls came before.
local HOOK = [[
n=$(cat "$HELM_DOUBLE_STATE/calls.jsonl" 2>/dev/null | wc -l)
echo "$HOOK $RELEASE $NAMESPACE $SETUP $PLAN helm-calls=$n" >> "$EVENTS"
]]

local root, work, origin, mirror, state, srv, logged, saved_env, runs

local function sh(argv, opts)
  local r = assert(ops.proc.run(argv, opts))
  assert(r.ok, table.concat(argv, " ") .. ": " .. r.stderr)
  return r.stdout
end

local function gitw(...)
  return sh({"git", "-C", work, "-c", "user.name=t", "-c", "user.email=t@example.com", ...})
end

--- commit({path = content | false}) -> sha, pushed to origin; false removes the file,
--- {link = target} makes a symlink
local function commit(files, message)
  for path, content in pairs(files) do
    local full = work .. "/" .. path
    if content == false then
      gitw("rm", "-q", path)
    else
      assert(fs.mkdir_p(fs.dirname(full)))
      if type(content) == "table" then
        assert(fs.symlink(content.link, full))
      else
        helpers.write(full, content, path:match("%.sh$") and "755" or nil)
      end
      gitw("add", path)
    end
  end
  gitw("commit", "-q", "-m", message or "change")
  gitw("push", "-q", "origin", "HEAD:main")
  return (gitw("rev-parse", "HEAD"):gsub("%s+$", ""))
end

local function setenv(name, value)
  if saved_env[name] == nil then saved_env[name] = {sys.getenv(name)} end
  sys.setenv(name, value)
end

local function hook(p)
  local settings = {kubeconfig_repo_url = "http://127.0.0.1:" .. srv.port,
                    user_env = "TEST_KC_USER", password_env = "TEST_KC_PASSWORD"}
  for k, v in pairs(p or {}) do settings[k] = v or nil end -- false: leave the key out
  return {name = "ops", repo = origin, plans = settings, deploy = {}}
end

--- deploy(before, after [, hook [, job fields]]) -> status, run id, summary: the mapper on that push
local function deploy(before, after, h, extra)
  runs = runs + 1
  git.mirror(mirror, origin)
  local checkout = root .. "/checkout-" .. runs
  git.checkout(mirror, after, checkout)
  local lines = {}
  local out = {write = function(self, ...) for _, s in ipairs({...}) do lines[#lines + 1] = s end return self end,
               flush = function(self) return self end}
  local job = {
    hook = h or hook(), checkout = checkout, mirror = mirror, changes = git.changes(mirror, before, after),
    deliveries = {"delivery-" .. runs}, before = before, after = after, store = root .. "/opsrun.db", out = out,
  }
  for k, v in pairs(extra or {}) do job[k] = v end
  local status, run_id = plans.run(job)
  return status, run_id, table.concat(lines)
end

--- the helm calls so far, as command lines: the checkout as <repo>, the kubeconfig as <kubeconfig>
local function calls()
  local out = {}
  for line in (helpers.read(state .. "/calls.jsonl") or ""):gmatch("[^\n]+") do
    local c = json.decode(line)
    local words = {}
    for i, a in ipairs(c.argv) do
      a = a:gsub("^" .. root:gsub("%p", "%%%0") .. "/checkout%-%d+", "<repo>")
      a = a:gsub("^/.*/opsrun%-plans%-%w+/kubeconfig%-%d+%.yaml$", "<kubeconfig>")
      words[i] = a
    end
    out[#out + 1] = table.concat(words, " ")
  end
  return out
end

--- a release's history in the double's state (read directly: a helm call would be recorded)
local function releases(release, ns)
  local text = helpers.read(state .. "/releases/" .. ns .. "/" .. release .. ".json")
  if not text then return "not installed" end
  local out = {}
  for _, rev in ipairs(assert(json.decode(text)).revisions) do
    out[#out + 1] = rev.revision .. " " .. rev.status .. " " .. rev.description
  end
  return out
end

local function events()
  local out = {}
  for line in (helpers.read(root .. "/events") or ""):gmatch("[^\n]+") do out[#out + 1] = line end
  return out
end

local function log_text() return table.concat(logged) end

local function plan(t)
  local lines = {"chart: " .. (t.chart or "charts/web")}
  if t.version then lines[#lines + 1] = "version: " .. t.version end
  if t.values then lines[#lines + 1] = "values: " .. t.values end
  if t.release then lines[#lines + 1] = "release: " .. t.release end
  if t.hooks then
    lines[#lines + 1] = "hooks:"
    for _, name in ipairs(plans.HOOKS) do
      if t.hooks[name] then
        lines[#lines + 1] = "  " .. name .. ":"
        for _, s in ipairs(t.hooks[name]) do lines[#lines + 1] = "    - " .. s end
      end
    end
  end
  return table.concat(lines, "\n") .. "\n"
end

local ALL_HOOKS = {["pre-install"] = {"scripts/hook.sh"}, ["post-install"] = {"scripts/hook.sh"},
                   ["pre-upgrade"] = {"scripts/hook.sh"}, ["post-upgrade"] = {"scripts/hook.sh"}}

before_each(function()
  root = assert(fs.realpath(helpers.tmpdir()))
  work, origin, mirror, state = root .. "/work", root .. "/origin.git", root .. "/mirrors/ops.git", root .. "/helm"
  runs, logged, saved_env = 0, {}, {}
  sh({"git", "init", "-q", "--bare", "-b", "main", origin})
  sh({"git", "init", "-q", "-b", "main", work})
  gitw("remote", "add", "origin", origin)
  setenv("PATH", DOUBLES .. ":" .. sys.getenv("PATH"))
  setenv("HELM_DOUBLE_STATE", state)
  setenv("EVENTS", root .. "/events")
  setenv("TEST_KC_USER", "deployer")
  setenv("TEST_KC_PASSWORD", "kc-pass-9f8e7d")
  for _, v in ipairs({"KUBECONFIG_REPO_URL", "GITOPS_SETUP_NAME_SIZE", "GITOPS_SHELL_EXEC",
                      "GITOPS_KUBECONFIG_FILENAME"}) do setenv(v, nil) end
  plans.KUBECONFIG_RETRY = {attempts = 2, backoff = 0.01, max_backoff = 0.01}
  local auth = "Basic " .. crypto.base64_encode("deployer:kc-pass-9f8e7d")
  srv = assert(ops.http.serve({listen = "127.0.0.1:0", handler = function(req)
    if req.headers.authorization ~= auth then return 401, {}, "log in\n" end
    if req.path == "/aws/foo/kubeconfig.yaml" or req.path == "/gcp/bar/kubeconfig.yaml"
        or req.path == "/aws/kubeconfig.yaml" or req.path == "/aws/foo/kube/admin.conf" then
      return 200, {["content-type"] = "application/yaml"}, KUBECONFIG
    end
    if req.path == "/broken/one/kubeconfig.yaml" then return 500, {}, KUBECONFIG end
    return 404, {}, "no such file: " .. req.path .. "\n"
  end}))
  log.set_output({write = function(self, ...)
    for _, s in ipairs({...}) do logged[#logged + 1] = s end
    return self
  end, flush = function(self) return self end})
  commit({["charts/web/Chart.yaml"] = CHART, ["scripts/hook.sh"] = HOOK, ["README.md"] = "ops\n"}, "base")
end)

after_each(function()
  log.set_output(io.stderr)
  srv:close(0)
  for name, v in pairs(saved_env) do sys.setenv(name, v[1]) end
  plans.KUBECONFIG_RETRY = {attempts = 3, backoff = 1, max_backoff = 4}
  helpers.rmtree(root)
end)

describe("plans: which files are plans", function()
  it("takes a .yaml or .yml file exactly <setup>/<namespace>/ deep, the setup being setup_name_size parts", function()
    assert.are.same({path = "aws/foo/default/demo.yaml", setup = "aws/foo", namespace = "default",
                     file = "demo.yaml", name = "demo"}, plans.locate("aws/foo/default/demo.yaml", 2))
    assert.are.equal("demo", plans.locate("aws/foo/default/demo.yml", 2).name)
    assert.are.equal("aws", plans.locate("aws/default/demo.yaml", 1).setup)
    assert.are.equal("eu/aws/foo", plans.locate("eu/aws/foo/apps/web.yaml", 3).setup)
  end)

  it("says why any other file is not a plan", function()
    assert.are.same({nil, "short"}, {plans.locate("aws/default/demo.yaml", 2)})
    assert.are.same({nil, "deep"}, {plans.locate("aws/foo/default/values/demo.yaml", 2)})
    assert.are.same({nil, "not-yaml"}, {plans.locate("aws/foo/default/demo.sh", 2)})
    assert.are.same({nil, "hidden"}, {plans.locate(".github/workflows/ci.yml", 1)})
  end)
end)

describe("plans: the plan file", function()
  it("reads chart, version, values, hooks and release", function()
    local p = assert(plans.parse("chart: stable/nuclio\nversion: 1.2\nvalues: v/x.yaml\nhooks:\n"
      .. "  pre-install: [a.sh]\n  post-upgrade: b.sh\n", "aws/foo/default/demo.yaml"))
    assert.are.same({chart = "stable/nuclio", version = "1.2", values = "v/x.yaml",
                     hooks = {["pre-install"] = {"a.sh"}, ["post-upgrade"] = {"b.sh"}}}, p)
  end)

  it("requires a chart and says that every .yaml at a plan's depth is a plan", function()
    local p, err = plans.parse("replicas: 2\n", "aws/foo/default/values.yaml")
    assert.is_nil(p)
    assert.are.equal("aws/foo/default/values.yaml: unknown key replicas (a plan has chart, version, "
      .. "values, hooks and release)", err)
    p, err = plans.parse("version: 1.0.0\n", "aws/foo/default/demo.yaml")
    assert.is_nil(p)
    assert.truthy(err:find("^aws/foo/default/demo.yaml: chart is required"), err)
    assert.truthy(err:find("every .yaml there is a plan", 1, true), err)
  end)

  it("refuses a hook that is not one of the four", function()
    local _, err = plans.parse("chart: x/y\nhooks:\n  pre_install: [a.sh]\n", "s/e/ns/p.yaml")
    assert.are.equal("s/e/ns/p.yaml: hooks.pre_install is not a hook: use pre-install, post-install, "
      .. "pre-upgrade or post-upgrade", err)
  end)
end)

describe("plans: settings", function()
  it("defaults to the nuclio function's defaults", function()
    local s = assert(plans.settings({name = "ops", plans = {}}))
    assert.are.equal(2, s.setup_name_size)
    assert.are.equal("/bin/bash", s.shell)
    assert.are.equal("kubeconfig.yaml", s.kubeconfig_filename)
    assert.is_nil(s.kubeconfig_repo_url)
  end)

  it("takes the GITOPS_* variables and KUBECONFIG_REPO_URL, and the hook's plans: keys over them", function()
    setenv("GITOPS_SETUP_NAME_SIZE", "3")
    setenv("GITOPS_SHELL_EXEC", "/bin/sh")
    setenv("GITOPS_KUBECONFIG_FILENAME", "admin.conf")
    setenv("KUBECONFIG_REPO_URL", "https://u:pw-from-url@kc.example.com/store/")
    local s = assert(plans.settings({name = "ops", plans = {}}))
    assert.are.same({3, "/bin/sh", "admin.conf", "https://u:pw-from-url@kc.example.com/store"},
      {s.setup_name_size, s.shell, s.kubeconfig_filename, s.kubeconfig_repo_url})
    s = assert(plans.settings({name = "ops", plans = {setup_name_size = 1, shell = "/bin/zsh",
      kubeconfig_filename = "k.yaml", kubeconfig_repo_url = "http://other:8080"}}))
    assert.are.same({1, "/bin/zsh", "k.yaml", "http://other:8080"},
      {s.setup_name_size, s.shell, s.kubeconfig_filename, s.kubeconfig_repo_url})
  end)

  it("reads the store's credentials from the variables the hook names", function()
    assert.are.same({"deployer", "kc-pass-9f8e7d"}, plans.settings({name = "ops",
      plans = {user_env = "TEST_KC_USER", password_env = "TEST_KC_PASSWORD"}}).basic)
    assert.are.equal("kc-pass-9f8e7d", plans.settings({name = "ops", plans = {token_env = "TEST_KC_PASSWORD"}}).bearer)
  end)

  it("refuses settings that cannot work, naming the key and the fix", function()
    local function err(p) return select(2, plans.settings({name = "ops", plans = p})) end
    assert.are.equal("hooks.ops.plans.setup_name_size is 0: it must be a whole number of at least 1 "
      .. "(how many path parts name a setup)", err({setup_name_size = 0}))
    setenv("GITOPS_SETUP_NAME_SIZE", "two")
    assert.truthy(err({}):find("^GITOPS_SETUP_NAME_SIZE is two"))
    setenv("GITOPS_SETUP_NAME_SIZE", nil)
    assert.truthy(err({kubeconfig_repo_url = "https://u:p@kc"}):find("must not carry a user or password", 1, true))
    assert.are.equal("hooks.ops.plans.password_env names NOT_SET_ANYWHERE, which is not set",
      err({user_env = "TEST_KC_USER", password_env = "NOT_SET_ANYWHERE"}))
    assert.truthy(err({token_env = "TEST_KC_USER", user_env = "TEST_KC_USER", password_env = "TEST_KC_PASSWORD"})
      :find("give one way to log in", 1, true))
    assert.truthy(err({kubeconfig_repo_url = "ftp://kc"}):find("must be an http:// or https:// URL", 1, true))
  end)
end)

describe("plans: deploying pushes", function()
  it("installs an added plan: pre-install hooks, helm install, post-install hooks", function()
    local base = gitw("rev-parse", "HEAD"):gsub("%s+$", "")
    local after = commit({
      ["aws/foo/default/demo.yaml"] = plan{version = "0.1.0", values = "values/demo.yaml", hooks = ALL_HOOKS},
      ["values/demo.yaml"] = "replicas: 2\n",
    })
    local status, run_id, summary = deploy(base, after)
    assert.are.equal("succeeded", status)
    assert.are.same({"helm install demo <repo>/charts/web --namespace default --create-namespace "
      .. "--version 0.1.0 -f <repo>/values/demo.yaml --kubeconfig <kubeconfig>"}, calls())
    assert.are.same({"1 deployed Install complete"}, releases("demo", "default"))
    assert.are.same({
      "pre-install demo default aws/foo aws/foo/default/demo.yaml helm-calls=0",
      "post-install demo default aws/foo aws/foo/default/demo.yaml helm-calls=1",
    }, events())
    assert.truthy(summary:find("succeeded  aws/foo/default/demo.yaml  install demo", 1, true), summary)
    assert.truthy(summary:find("run " .. run_id .. " succeeded", 1, true), summary)
  end)

  it("upgrades a modified plan with helm upgrade --install and the upgrade hooks", function()
    local a = commit({["aws/foo/apps/web.yaml"] = plan{hooks = ALL_HOOKS}})
    assert.are.equal("succeeded", (deploy(nil, a)))
    local b = commit({["aws/foo/apps/web.yaml"] = plan{version = "0.1.0", hooks = ALL_HOOKS}})
    assert.are.equal("succeeded", (deploy(a, b)))
    assert.are.same({
      "helm status web --namespace apps --kubeconfig <kubeconfig>",
      "helm install web <repo>/charts/web --namespace apps --create-namespace --kubeconfig <kubeconfig>",
      "helm upgrade web <repo>/charts/web --install --namespace apps --create-namespace --version 0.1.0 "
        .. "--kubeconfig <kubeconfig>",
    }, calls())
    assert.are.same({"1 superseded Install complete", "2 deployed Upgrade complete"}, releases("web", "apps"))
    assert.are.same({
      "pre-install web apps aws/foo aws/foo/apps/web.yaml helm-calls=1",
      "post-install web apps aws/foo aws/foo/apps/web.yaml helm-calls=2",
      "pre-upgrade web apps aws/foo aws/foo/apps/web.yaml helm-calls=2",
      "post-upgrade web apps aws/foo aws/foo/apps/web.yaml helm-calls=3",
    }, events())
  end)

  it("upgrades the plans that name a changed values file, and only them", function()
    local a = commit({
      ["aws/foo/apps/web.yaml"] = plan{values = "values/web.yaml"},
      ["aws/foo/apps/api.yaml"] = plan{values = "values/api.yaml"},
      ["values/web.yaml"] = "replicas: 1\n", ["values/api.yaml"] = "replicas: 1\n",
    })
    deploy(nil, a)
    local b = commit({["values/web.yaml"] = "replicas: 3\n"})
    local status = deploy(a, b)
    assert.are.equal("succeeded", status)
    local c = calls()
    assert.are.equal(5, #c) -- two status + two installs, then the one upgrade
    assert.are.equal("helm upgrade web <repo>/charts/web --install --namespace apps --create-namespace "
      .. "-f <repo>/values/web.yaml --kubeconfig <kubeconfig>", c[5])
    assert.truthy(log_text():find("its values file values/web.yaml changed", 1, true))
    assert.are.same({"1 deployed Install complete"}, releases("api", "apps"))
  end)

  it("uninstalls a removed plan, reading its release from the before commit, before anything else", function()
    local a = commit({["aws/foo/apps/old.yaml"] = plan{release = "legacy-web"}})
    deploy(nil, a)
    assert.are.same({"1 deployed Install complete"}, releases("legacy-web", "apps"))
    local b = commit({["aws/foo/apps/old.yaml"] = false, ["aws/foo/apps/new.yaml"] = plan{}})
    assert.are.equal("succeeded", (deploy(a, b)))
    local c = calls()
    assert.are.same({
      "helm uninstall legacy-web --namespace apps --kubeconfig <kubeconfig>",
      "helm install new <repo>/charts/web --namespace apps --create-namespace --kubeconfig <kubeconfig>",
    }, {c[3], c[4]})
    assert.are.equal("not installed", releases("legacy-web", "apps"))
  end)

  it("finds a removed plan's release without a before commit (several pushes deployed together)", function()
    local a = commit({["aws/foo/apps/old.yaml"] = plan{release = "legacy-web"}})
    deploy(nil, a)
    commit({["aws/foo/apps/old.yaml"] = false})
    local c = commit({["README.md"] = "ops, again\n"})
    -- what the worker passes for the two pushes: their changes merged, and no before
    local status = deploy(nil, c, nil, {changes = {
      {status = "M", path = "README.md"}, {status = "D", path = "aws/foo/apps/old.yaml"}}})
    assert.are.equal("succeeded", status)
    assert.are.equal("helm uninstall legacy-web --namespace apps --kubeconfig <kubeconfig>", calls()[3])
    assert.are.equal("not installed", releases("legacy-web", "apps"))
  end)

  it("treats an uninstall of a release that is not there as done", function()
    local a = commit({["aws/foo/apps/gone.yaml"] = plan{}})
    local b = commit({["aws/foo/apps/gone.yaml"] = false})
    assert.are.equal("succeeded", (deploy(a, b)))
    assert.truthy(log_text():find("release gone is not installed: nothing to uninstall", 1, true))
  end)

  it("upgrades rather than installs a release that exists when the whole tree counts as added", function()
    local a = commit({["aws/foo/apps/web.yaml"] = plan{hooks = ALL_HOOKS}})
    deploy(nil, a)
    assert.are.equal("succeeded", (deploy(nil, a)))
    local c = calls()
    assert.are.equal("helm upgrade web <repo>/charts/web --install --namespace apps --create-namespace "
      .. "--kubeconfig <kubeconfig>", c[4])
    assert.are.equal("pre-upgrade web apps aws/foo aws/foo/apps/web.yaml helm-calls=3", events()[3])
  end)

  it("fails a plan whose pre-hook fails without running helm, and goes on with the others", function()
    local base = gitw("rev-parse", "HEAD"):gsub("%s+$", "")
    local after = commit({
      ["aws/foo/apps/a-bad.yaml"] = plan{hooks = {["pre-install"] = {"scripts/fail.sh"}, ["post-install"] = {"scripts/hook.sh"}}},
      ["aws/foo/apps/b-good.yaml"] = plan{},
      ["scripts/fail.sh"] = "echo 'cannot reach the database' >&2\nexit 3\n",
    })
    local status, run_id = deploy(base, after)
    assert.are.equal("failed", status)
    assert.are.same({"helm install b-good <repo>/charts/web --namespace apps --create-namespace "
      .. "--kubeconfig <kubeconfig>"}, calls())
    assert.are.same({}, events())
    local err = "aws/foo/apps/a-bad.yaml: pre-install hook scripts/fail.sh failed (exit 3: cannot reach "
      .. "the database): helm install was not run"
    assert.truthy(log_text():find(err, 1, true), log_text())
    local db = require("ops.deploy.history").open(root .. "/opsrun.db")
    local run = require("ops.deploy.history").run(db, run_id)
    db:close()
    assert.are.same({"failed", "serve", "delivery-1", after}, {run.status, run.trigger, run.delivery, run.revision})
    assert.are.same({"aws/foo/apps/a-bad.yaml failed " .. err, "aws/foo/apps/b-good.yaml succeeded nil"},
      {run.steps[1].id .. " " .. run.steps[1].status .. " " .. run.steps[1].error,
       run.steps[2].id .. " " .. run.steps[2].status .. " " .. tostring(run.steps[2].error)})
  end)

  it("skips the post- hooks when helm fails, and fails a plan whose post- hook fails", function()
    local base = gitw("rev-parse", "HEAD"):gsub("%s+$", "")
    local after = commit({
      ["charts/broken/Chart.yaml"] = CHART, ["charts/broken/FAIL_UPGRADE"] = "timed out waiting for the condition",
      ["aws/foo/apps/a.yaml"] = plan{chart = "charts/broken", hooks = ALL_HOOKS},
      ["aws/foo/apps/b.yaml"] = plan{hooks = {["post-install"] = {"scripts/fail.sh"}}},
      ["scripts/fail.sh"] = "exit 1\n",
    })
    assert.are.equal("failed", (deploy(base, after)))
    assert.are.same({"pre-install a apps aws/foo aws/foo/apps/a.yaml helm-calls=0"}, events())
    local text = log_text()
    assert.truthy(text:find("aws/foo/apps/a.yaml: helm install a failed (exit 1: Error: INSTALLATION FAILED: "
      .. "timed out waiting for the condition)", 1, true), text)
    assert.truthy(text:find("aws/foo/apps/b.yaml: post-install hook scripts/fail.sh failed (exit 1) "
      .. "(the release is deployed)", 1, true), text)
    assert.are.same({"1 deployed Install complete"}, releases("b", "apps"))
  end)

  it("shows the run in opsrun runs, recorded through the worker's store connection", function()
    local history = require "ops.deploy.history"
    local db = history.open(root .. "/opsrun.db")
    local base = gitw("rev-parse", "HEAD"):gsub("%s+$", "")
    local _, run_id = deploy(base, commit({["aws/foo/apps/web.yaml"] = plan{}}), nil, {db = db, store = false})
    assert.are.equal("succeeded", history.run(db, run_id).status) -- and the connection is still open
    db:close()
    local r = helpers.run_opsrun({"runs", "show", tostring(run_id), "--store", root .. "/opsrun.db"})
    assert(r.ok, r.stderr)
    assert.truthy(r.stdout:find("run " .. run_id .. "  succeeded", 1, true), r.stdout)
    assert.truthy(r.stdout:find("delivery delivery-1", 1, true), r.stdout)
    assert.truthy(r.stdout:find("aws/foo/apps/web.yaml  succeeded  exit 0", 1, true), r.stdout)
  end)

  it("records a run whose task is cancelled (opsrun serve stopping) as interrupted", function()
    local base = gitw("rev-parse", "HEAD"):gsub("%s+$", "")
    local after = commit({["aws/foo/apps/web.yaml"] = plan{hooks = {["pre-install"] = {"scripts/slow.sh"}}},
                          ["scripts/slow.sh"] = "sleep 30\n"})
    local t = ops.spawn(function() return deploy(base, after) end)
    local db = require("ops.deploy.history").open(root .. "/opsrun.db")
    local run
    for _ = 1, 100 do
      ops.sleep(0.05)
      run = db:query("SELECT * FROM runs")[1]
      if run and db:query("SELECT status FROM steps WHERE run_id = ?", run.id)[1].status == "running" then break end
    end
    t:cancel()
    run = require("ops.deploy.history").run(db, run.id)
    db:close()
    assert.are.same({"interrupted", "the run was interrupted"}, {run.status, run.error})
    assert.are.same({}, calls())
  end)

  it("passes a repo chart reference to helm as it is", function()
    local base = gitw("rev-parse", "HEAD"):gsub("%s+$", "")
    local status = deploy(base, commit({["aws/foo/apps/nginx.yaml"] = plan{chart = "bitnami/nginx", version = "15.0.0"}}))
    assert.are.equal("failed", status)
    assert.are.same({"helm install nginx bitnami/nginx --namespace apps --create-namespace --version 15.0.0 "
      .. "--kubeconfig <kubeconfig>"}, calls())
    assert.truthy(log_text():find("helm install nginx failed (exit 1: Error: repo bitnami not found)", 1, true))
  end)

  it("does not deploy files at other depths, warns about plan-like ones that are too short", function()
    local base = gitw("rev-parse", "HEAD"):gsub("%s+$", "")
    local status = deploy(base, commit({
      ["aws/default/demo.yaml"] = plan{}, ["aws/foo/apps/values/web.yaml"] = "a: 1\n",
      ["aws/foo/apps/notes.txt"] = "x\n",
    }))
    assert.are.equal("nothing", status)
    assert.are.same({}, calls())
    local text = log_text()
    assert.truthy(text:find("aws/default/demo.yaml is not deployed: it is 3 path parts deep, and a plan is at "
      .. "<setup: 2 parts>/<namespace>/<plan>.yaml (setup_name_size 2)", 1, true), text)
    assert.truthy(text:find("not plans (2): aws/foo/apps/notes.txt, aws/foo/apps/values/web.yaml", 1, true), text)
  end)

  it("refuses a values file, chart or hook outside the repo, naming the plan file and the key", function()
    local base = gitw("rev-parse", "HEAD"):gsub("%s+$", "")
    local status = deploy(base, commit({
      ["aws/foo/apps/dots.yaml"] = plan{values = "../../etc/passwd"},
      ["aws/foo/apps/abs.yaml"] = plan{values = "/etc/passwd"},
      ["aws/foo/apps/link.yaml"] = plan{values = "values/link.yaml"},
      ["values/link.yaml"] = {link = "/etc/hostname"},
      ["aws/foo/apps/chart.yaml"] = plan{chart = "../charts/web"},
      ["aws/foo/apps/script.yaml"] = plan{hooks = {["pre-install"] = {"../../../bin/true"}}},
    }))
    assert.are.equal("failed", status)
    assert.are.same({}, calls())
    local text = log_text()
    for _, msg in ipairs({
      "aws/foo/apps/dots.yaml: values (../../etc/passwd) leads outside the repo: give a path inside it",
      "aws/foo/apps/abs.yaml: values is /etc/passwd, an absolute path: give a path relative to the repo root",
      "aws/foo/apps/link.yaml: values (values/link.yaml) leads outside the repo: give a path inside it",
      "aws/foo/apps/chart.yaml: chart (../charts/web) leads outside the repo: give a path inside it",
      "aws/foo/apps/script.yaml: hooks.pre-install (../../../bin/true) leads outside the repo",
    }) do
      assert.truthy(text:find(msg, 1, true), msg .. "\n--- in ---\n" .. text)
    end
  end)

  it("fails a plan whose setup has no kubeconfig (404, 500), writing none and running nothing", function()
    local base = gitw("rev-parse", "HEAD"):gsub("%s+$", "")
    local status = deploy(base, commit({
      ["gcp/none/apps/web.yaml"] = plan{}, ["broken/one/apps/web.yaml"] = plan{},
      ["aws/foo/apps/web.yaml"] = plan{},
    }))
    assert.are.equal("failed", status)
    assert.are.same({"helm install web <repo>/charts/web --namespace apps --create-namespace "
      .. "--kubeconfig <kubeconfig>"}, calls())
    local url = "http://127.0.0.1:" .. srv.port
    local text = log_text()
    assert.truthy(text:find("gcp/none/apps/web.yaml: kubeconfig of setup gcp/none (GET " .. url
      .. "/gcp/none/kubeconfig.yaml): the kubeconfig store answered 404, not a kubeconfig", 1, true), text)
    assert.truthy(text:find("broken/one/apps/web.yaml: kubeconfig of setup broken/one (GET " .. url
      .. "/broken/one/kubeconfig.yaml): the kubeconfig store answered 500", 1, true), text)

    local file = root .. "/kc.yaml"
    local ok, err = plans.fetch_kubeconfig(assert(plans.settings(hook())), "broken/one", file)
    assert.is_nil(ok)
    assert.truthy(err:find("answered 500", 1, true))
    assert.is_false(fs.exists(file))
    local s = assert(plans.settings(hook({user_env = false, password_env = false})))
    ok, err = plans.fetch_kubeconfig(s, "aws/foo", file)
    assert.truthy(err:find("answered 401", 1, true), err)
    assert.is_false(fs.exists(file))
  end)

  it("never logs the kubeconfig or the store's password, nor gives the password to hooks", function()
    setenv("OPS_WEBHOOK_SECRET", "whsec-0451")
    local base = gitw("rev-parse", "HEAD"):gsub("%s+$", "")
    local after = commit({
      ["aws/foo/apps/web.yaml"] = plan{hooks = {["pre-install"] = {"scripts/show.sh"}}},
      ["scripts/show.sh"] = "grep token \"$KUBECONFIG\"\necho \"store password: [$TEST_KC_PASSWORD]\"\n"
        .. "echo \"webhook secret: [$OPS_WEBHOOK_SECRET] extra: $EXTRA\"\n",
    })
    -- opsrun serve gives the environment for children: without the webhook secrets
    local env = {OPS_WEBHOOK_SECRET = false, EXTRA = "from-serve"}
    assert.are.equal("succeeded", (deploy(base, after, nil, {env = env})))
    local text = log_text()
    assert.truthy(text:find("webhook secret: [] extra: from-serve", 1, true), text)
    assert.truthy(text:find("user: {token: ***}", 1, true), text)
    assert.truthy(text:find("store password: []", 1, true), text) -- not given to the repo's scripts
    assert.falsy(text:find(TOKEN, 1, true))
    assert.falsy(text:find("kc-pass-9f8e7d", 1, true))
    assert.falsy(text:find("clusters:", 1, true))
  end)

  it("works from the nuclio variables alone: KUBECONFIG_REPO_URL with credentials, the setup size, the shell", function()
    local url = "http://deployer:kc-pass-9f8e7d@127.0.0.1:" .. srv.port
    setenv("KUBECONFIG_REPO_URL", url)
    setenv("GITOPS_SETUP_NAME_SIZE", "1")
    setenv("GITOPS_SHELL_EXEC", "/bin/sh")
    setenv("GITOPS_KUBECONFIG_FILENAME", "kubeconfig.yaml")
    local base = gitw("rev-parse", "HEAD"):gsub("%s+$", "")
    local after = commit({["aws/apps/web.yaml"] = plan{hooks = {["pre-install"] = {"scripts/hook.sh"}}}})
    local h = {name = "ops", repo = origin, plans = {}, deploy = {}}
    assert.are.equal("succeeded", (deploy(base, after, h)))
    assert.are.same({"helm install web <repo>/charts/web --namespace apps --create-namespace "
      .. "--kubeconfig <kubeconfig>"}, calls())
    assert.are.same({"pre-install web apps aws aws/apps/web.yaml helm-calls=0"}, events())
    assert.falsy(log_text():find("kc-pass-9f8e7d", 1, true))
  end)

  it("fails the run, naming the setting, when a setting cannot work", function()
    local base = gitw("rev-parse", "HEAD"):gsub("%s+$", "")
    local status, _, summary = deploy(base, commit({["aws/foo/apps/web.yaml"] = plan{}}),
      hook({setup_name_size = "x"}))
    assert.are.equal("failed", status)
    assert.truthy(summary:find("hooks.ops.plans.setup_name_size is x", 1, true), summary)
    assert.are.same({}, calls())
  end)
end)
