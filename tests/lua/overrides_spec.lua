-- A repo's own Lua (.opsrun/ overrides, Lua hooks) and the ready-made pieces of
-- hooks-examples/, run by `opsrun deploy` as a user runs them: the real terraform (offline:
-- outputs only), the Helm double (tests/doubles/helm), and loopback HTTP served by this spec.
local h = require "helpers"
local json = require "ops.json"
local fs = require "ops.fs"

local DOUBLES = h.source .. "/tests/doubles"
local EXAMPLES = h.source .. "/hooks-examples"

local function found(program)
  local r = ops.proc.run({"sh", "-c", 'command -v "$1"', "sh", program})
  return r ~= nil and r.ok
end

local base
setup(function() base = h.tmpdir() end)
teardown(function() h.rmtree(base) end)

local function write(path, text)
  assert(fs.mkdir_p(fs.dirname(path)))
  h.write(path, text)
end

local function example(name) return assert(h.read(EXAMPLES .. "/" .. name), name) end

-- A repo made from files (path -> text) under base/name.
local function repo(name, files)
  local root = base .. "/" .. name
  for path, text in pairs(files) do write(root .. "/" .. path, text) end
  return root
end

-- `opsrun deploy --repo ROOT ARGS...` from base (not from the repo), as a user runs it.
local function deploy(root, args, env)
  local argv = {"deploy", "--repo", root}
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local e = {
    PATH = DOUBLES .. ":" .. os.getenv("PATH"), HELM_DOUBLE_STATE = base .. "/helm-state",
    OPSRUN_STORE = base .. "/store.db", TMPDIR = base, NO_COLOR = "1", CHECKPOINT_DISABLE = "1",
    BITOPS_ENVIRONMENT = false, ENVIRONMENT = false,
  }
  for k, v in pairs(env or {}) do e[k] = v end
  local r = h.run_opsrun(argv, {env = e, cwd = base, timeout = 180})
  r.out = r.stdout .. r.stderr
  return r
end

local CHART = "apiVersion: v2\nname: web\nversion: 0.1.0\n"
local HELM_CONFIG = "helm:\n  cli:\n    namespace: prod\n"

-- A server on a free loopback port answering with answer(req, n) (n counts the requests);
-- returns it and the requests it saw.
local function server(answer)
  local seen = {}
  local srv = assert(ops.http.serve({listen = "127.0.0.1:0", handler = function(req)
    seen[#seen + 1] = req
    return answer(req, #seen)
  end}))
  return srv, seen
end

describe("overrides in the deployed repo's .opsrun/", function()
  it("apply with `opsrun deploy --repo DIR` alone: a driver's stage, and an engine module too", function()
    local root = repo("ovr", {
      ["prod/terraform/main.tf"] = 'output "x" {\n  value = 1\n}\n',
      [".opsrun/tools/terraform.lua"] = [[
local base = ops.builtin("tools.terraform")
local M = setmetatable({}, {__index = base})
function M:plan(step, destroy)
  step.log.info("the repo's plan stage")
  return base.plan(self, step, destroy)
end
return M
]],
      [".opsrun/ops/deploy/hooks.lua"] = [[
local base = ops.builtin("ops.deploy.hooks")
local M = setmetatable({}, {__index = base})
function M.run(step, phase)
  step.log.info("the repo's hooks, " .. phase)
  return base.run(step, phase)
end
return M
]],
    })
    local r = deploy(root, {"--env", "prod", "--dry-run"})
    assert.are.equal(0, r.code, r.out)
    assert.matches("module 'tools.terraform' comes from " .. root .. "/.opsrun/tools/terraform.lua", r.stderr, 1, true)
    assert.matches("[prod/terraform] the repo's plan stage", r.stderr, 1, true)
    assert.matches("[prod/terraform] the repo's hooks, before", r.stderr, 1, true)
    assert.matches("[prod/terraform] the repo's hooks, after", r.stderr, 1, true)
  end)
end)

describe("hooks-examples/helm-set-from-terraform.lua", function()
  if not found("terraform") then pending("skipped: terraform not found") return end

  it("passes each scalar terraform output of the environment to helm upgrade as --set terraform.<name>", function()
    local root = repo("set-from-tf", {
      ["prod/terraform/main.tf"] = 'output "greeting" {\n  value = "hello, world"\n}\n'
        .. 'output "port" {\n  value = 8080\n}\noutput "zones" {\n  value = ["a", "b"]\n}\n',
      ["prod/terraform/bitops.config.yaml"] = "terraform:\n  options:\n    stack-action: apply\n",
      ["prod/helm/bitops.config.yaml"] = "helm:\n  cli:\n    namespace: prod\n    set:\n      - replicas=2\n",
      ["prod/helm/web/Chart.yaml"] = CHART,
      [".opsrun/tools/helm.lua"] = example("helm-set-from-terraform.lua"),
    })
    local r = deploy(root, {"--env", "prod"})
    assert.are.equal(0, r.code, r.out)
    assert.matches("[prod/helm] helm: 2 terraform output(s) as --set terraform.*", r.stderr, 1, true)
    local status = assert(ops.proc.run({"helm", "status", "web", "--namespace", "prod", "--output", "json"},
      {env = {PATH = DOUBLES .. ":" .. os.getenv("PATH"), HELM_DOUBLE_STATE = base .. "/helm-state"}}))
    assert.are.equal(0, status.code, status.stderr)
    -- cli.set first, then the outputs by name; the list output left out; helm's comma escaped
    assert.are.same({"replicas=2", "terraform.greeting=hello\\, world", "terraform.port=8080"},
      json.decode(status.stdout).config.set)
  end)
end)

describe("hooks-examples/smoke-test.lua and notify-webhook.lua", function()
  local function smoke_repo(name)
    return repo(name, {
      ["prod/helm/bitops.config.yaml"] = HELM_CONFIG,
      ["prod/helm/web/Chart.yaml"] = CHART,
      ["prod/helm/bitops.after-deploy.d/50-smoke-test.lua"] = example("smoke-test.lua"),
      ["prod/helm/bitops.after-deploy.d/90-notify.lua"] = example("notify-webhook.lua"),
      ["prod/helm/bitops.on-failure.d/90-notify.lua"] = example("notify-webhook.lua"),
    })
  end

  it("check the service until it answers, then post the news; the webhook's URL never shown", function()
    local app = server(function(_, n)
      if n == 1 then return 503, {}, "starting\n" end -- retried
      return 200, {["Content-Type"] = "text/plain"}, "status: healthy\n"
    end)
    local hook, posts = server(function() return 200, {}, "ok" end)
    local secret_path = "/services/T000/B000/sEcReT-tOkEn"
    local root = smoke_repo("smoke-ok")
    local r = deploy(root, {"--env", "prod"}, {
      SMOKE_TEST_URL = "http://127.0.0.1:" .. app.port .. "/health", SMOKE_TEST_BODY = "healthy",
      NOTIFY_WEBHOOK_URL = "http://127.0.0.1:" .. hook.port .. secret_path,
    })
    assert.are.equal(0, r.code, r.out)
    assert.matches("smoke test: http://127.0.0.1:" .. app.port .. "/health answered 200", r.stderr, 1, true)
    assert.are.equal(1, #posts)
    assert.are.equal(secret_path, posts[1].path)
    local text = json.decode(posts[1].body).text
    assert.matches("^:white_check_mark: prod/helm deployed %(run %d+ of " .. root:gsub("%p", "%%%0") .. "%)$", text)
    assert.not_matches("sEcReT", r.out)
    app:close()
    hook:close()
  end)

  it("fail the step when the service keeps failing, and post that it failed", function()
    local app, asked = server(function() return 500, {}, "boom\n" end)
    local hook, posts = server(function() return 200, {}, "ok" end)
    local root = smoke_repo("smoke-bad")
    local r = deploy(root, {"--env", "prod"}, {
      SMOKE_TEST_URL = "http://127.0.0.1:" .. app.port .. "/", SMOKE_TEST_ATTEMPTS = "2",
      NOTIFY_WEBHOOK_URL = "http://127.0.0.1:" .. hook.port .. "/notify",
    })
    assert.are.equal(1, r.code, r.out)
    assert.are.equal(2, #asked)
    assert.matches("prod/helm failed: hook bitops.after-deploy.d/50-smoke-test.lua failed: smoke test: "
      .. "http://127.0.0.1:" .. app.port .. "/ answered 500, expected 200: boom", r.stdout, 1, true)
    assert.are.equal(1, #posts)
    assert.matches("^:x: prod/helm failed ", json.decode(posts[1].body).text)
    app:close()
    hook:close()
  end)
end)
