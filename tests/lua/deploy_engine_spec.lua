-- The deploy engine (lua/stdlib/ops/deploy/, `opsrun deploy`, `opsrun runs`), run as a user
-- runs it: opsrun as a child process on operations repos built here with real git, deploying
-- with the real ansible-playbook and terraform (offline: terraform_data only) and the Helm
-- double (tests/doubles/helm). Hooks are the probes: they append what they see to $EVENTS.
local h = require "helpers"
local fs = ops.fs

local SOURCE = assert(fs.realpath(h.source))
local DOUBLES = SOURCE .. "/tests/doubles"
local BASE_PATH = os.getenv("PATH")
local octal_700 = tonumber("700", 8)

-- ---------------------------------------------------------------------------------------
-- building repos

local function git(dir, ...)
  local argv = {"git", "-C", dir, "-c", "user.name=spec", "-c", "user.email=spec@example.com", ...}
  local r = assert(ops.proc.run(argv))
  assert(r.ok, table.concat(argv, " ") .. ": " .. r.stderr)
  return (r.stdout:gsub("%s+$", ""))
end

-- files: {["env/tool/file"] = content | {content, mode = "0755"}}
local function write_files(root, files)
  for path, content in pairs(files) do
    local mode
    if type(content) == "table" then content, mode = content[1], content.mode end
    assert(fs.mkdir_p(fs.dirname(fs.join(root, path))))
    h.write(fs.join(root, path), content, mode)
  end
end

local function commit(root, message)
  git(root, "add", "-A")
  git(root, "commit", "-q", "-m", message)
  return git(root, "rev-parse", "HEAD")
end

local function make_repo(root, files)
  assert(fs.mkdir_p(root))
  write_files(root, files)
  git(root, "init", "-q")
  commit(root, "initial")
  return assert(fs.realpath(root))
end

local function concat(...)
  local out = {}
  for _, t in ipairs({...}) do for _, v in ipairs(t) do out[#out + 1] = v end end
  return out
end

local function merge(...)
  local out = {}
  for _, t in ipairs({...}) do for k, v in pairs(t) do out[k] = v end end
  return out
end

-- The probe hooks: "start STEP" before the tool, "end STEP" after it. Variables steer them:
-- FAIL_STEP (that step's before hook exits 3), RENDEZVOUS (wait until these steps started),
-- HOLD (seconds to stay), WAIT_FOR (a file to wait for), SLEEP_PIDS (sleep in a child, its
-- and the hook's pid written there), SAY (echoed to the log).
local PROBE_BEFORE = [[
echo "start $OPSRUN_STEP" >> "$EVENTS"
if [ -n "${SAY:-}" ]; then echo "the token is $SAY"; fi
if [ "$OPSRUN_STEP" = "${FAIL_STEP:-}" ]; then echo "probe: failing $OPSRUN_STEP on purpose" >&2; exit 3; fi
for s in ${RENDEZVOUS:-}; do
  for i in $(seq 200); do grep -qx "start $s" "$EVENTS" && break; sleep 0.05; done
done
if [ -n "${WAIT_FOR:-}" ]; then
  for i in $(seq 600); do [ -e "$WAIT_FOR" ] && break; sleep 0.05; done
fi
if [ -n "${SLEEP_PIDS:-}" ]; then
  sleep 60 &
  echo "$$ $!" > "$SLEEP_PIDS"
  wait
fi
sleep "${HOLD:-0}"
]]
local PROBE_AFTER = 'echo "end $OPSRUN_STEP" >> "$EVENTS"\n'

local TF_PLAN = 'resource "terraform_data" "probe" {\n  input = "probe"\n}\n'
local HELM_CONFIG = "helm:\n  cli:\n    namespace: apps\n"
local CHART = "apiVersion: v2\nname: web\nversion: 0.1.0\n"

-- An environment with a terraform step and a helm step, both probed.
local function graph_env(env, files)
  files[env .. "/terraform/main.tf"] = TF_PLAN
  -- a namespace per environment: two installs of one release at once collide, as in Helm
  files[env .. "/helm/bitops.config.yaml"] = "helm:\n  cli:\n    namespace: " .. env .. "\n"
  files[env .. "/helm/web/Chart.yaml"] = CHART
  for _, folder in ipairs({"terraform", "helm"}) do
    files[env .. "/" .. folder .. "/bitops.before-deploy.d/probe.sh"] = PROBE_BEFORE
    files[env .. "/" .. folder .. "/bitops.after-deploy.d/probe.sh"] = PROBE_AFTER
  end
  return files
end

-- ---------------------------------------------------------------------------------------
-- running opsrun

local base        -- this spec's temp dir
local store       -- the state store every run shares

local function opsrun(args, env, opts)
  local e = merge({
    OPSRUN_STORE = store, NO_COLOR = "1", PATH = DOUBLES .. ":" .. BASE_PATH,
    HELM_DOUBLE_STATE = base .. "/helm-state", EVENTS = base .. "/events",
    BITOPS_ENVIRONMENT = false, ENVIRONMENT = false,
    TMPDIR = base .. "/tmp", -- working copies, and the copies kept between runs, in here
  }, env or {})
  local r = h.run_opsrun(args, merge({env = e}, opts or {}))
  r.out = r.stdout .. r.stderr
  return r
end

local function deploy(repo, args, env)
  local argv = {"deploy", "--repo", repo}
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  return opsrun(argv, env)
end

-- The summary's rows: {{id, status}, ...} in order, and status by id.
local function summary(out)
  local rows, by_id = {}, {}
  for id, status in out:gmatch("\n(%S+)  +(%S+) +%d+%.%ds") do
    rows[#rows + 1] = id
    by_id[id] = status
  end
  return rows, by_id
end

local function events()
  local text = h.read(base .. "/events") or ""
  local out = {}
  for line in text:gmatch("[^\n]+") do out[#out + 1] = line end
  return out
end

local function reset_events() os.remove(base .. "/events") end

local function index_of(list, value)
  for i, v in ipairs(list) do if v == value then return i end end
  return nil
end

local function assert_before(list, a, b)
  local ia, ib = index_of(list, a), index_of(list, b)
  assert(ia, a .. " not in " .. table.concat(list, " | "))
  assert(ib, b .. " not in " .. table.concat(list, " | "))
  assert(ia < ib, a .. " should come before " .. b .. ": " .. table.concat(list, " | "))
end

local function sqlite(sql)
  local r = assert(ops.proc.run({"sqlite3", store, sql}))
  assert(r.ok, r.stderr)
  return (r.stdout:gsub("%s+$", ""))
end

local function last_run_id(out)
  return assert(tonumber(out:match("\nrun (%d+) ")), "no run id in: " .. out)
end

setup(function()
  base = h.tmpdir()
  store = base .. "/store/opsrun.db"
  assert(fs.mkdir_p(base .. "/tmp"))
end)

teardown(function() h.rmtree(base) end)

-- ---------------------------------------------------------------------------------------
-- The graph repo: environments a, b (plain) and c (bitops.fail_fast: false; masks tok-N),
-- each terraform then helm.

local graph_repo
local function graph()
  if graph_repo then return graph_repo end
  local files = {}
  for _, env in ipairs({"a", "b", "c"}) do graph_env(env, files) end
  files["c/bitops.config.yaml"] = "bitops:\n  fail_fast: false\n"
  files["b/bitops.config.yaml"] = "bitops:\n  logging:\n    masks:\n      - search: \"tok-[0-9]+\"\n        replace: \"[masked]\"\n"
  graph_repo = make_repo(base .. "/graph", files)
  return graph_repo
end

describe("choosing environments", function()
  local function planned(args, env)
    local r = deploy(graph(), concat({"--dry-run"}, args), env)
    return r, (summary(r.stdout))
  end

  it("deploys the environments --env names (repeated or comma-separated)", function()
    local r, rows = planned({"--env", "a"})
    assert.are.equal(0, r.code, r.out)
    assert.are.same({"a/terraform", "a/helm"}, rows)
    local _, both = planned({"--env", "b,a"})
    assert.are.same({"b/terraform", "b/helm", "a/terraform", "a/helm"}, both)
  end)

  it("takes BITOPS_ENVIRONMENT, then ENVIRONMENT, when --env is not given; --env wins", function()
    local _, rows = planned({}, {BITOPS_ENVIRONMENT = "b", ENVIRONMENT = "c"})
    assert.are.same({"b/terraform", "b/helm"}, rows)
    _, rows = planned({}, {ENVIRONMENT = "c"})
    assert.are.same({"c/terraform", "c/helm"}, rows)
    _, rows = planned({"--env", "a"}, {BITOPS_ENVIRONMENT = "b"})
    assert.are.same({"a/terraform", "a/helm"}, rows)
  end)

  it("deploys every environment with --all (not _default, not dot-folders)", function()
    local r, rows = planned({"--all"})
    assert.are.equal(0, r.code, r.out)
    assert.are.same({"a/terraform", "a/helm", "b/terraform", "b/helm", "c/terraform", "c/helm"}, rows)
  end)

  it("fails with exit 1 and lists the environments when one does not exist", function()
    local r = deploy(graph(), {"--env", "prod", "--dry-run"})
    assert.are.equal(1, r.code)
    assert.matches("environment 'prod' not found in " .. graph():gsub("%p", "%%%0") .. " %(environments: a, b, c%)", r.stderr)
  end)

  it("says how to choose when no environment is given", function()
    local r = deploy(graph(), {"--dry-run"})
    assert.are.equal(1, r.code)
    assert.matches("no environment given: use --env NAME or BITOPS_ENVIRONMENT", r.stderr, 1, true)
    assert.matches("(environments in " .. graph() .. ": a, b, c)", r.stderr, 1, true)
  end)
end)

-- ---------------------------------------------------------------------------------------
-- The plan repo: bitops.deployments and the default order.

local PLAYBOOK_NOOP = "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks: []\n"

local plan_repo
local function plan()
  if plan_repo then return plan_repo end
  plan_repo = make_repo(base .. "/plan", {
    ["ordered/bitops.config.yaml"] = "bitops:\n  deployments:\n    ansible: {}\n"
      .. "    infra-two:\n      plugin: terraform\n    infra-one:\n      plugin: terraform\n",
    ["ordered/ansible/playbook.yaml"] = PLAYBOOK_NOOP,
    ["ordered/infra-one/main.tf"] = TF_PLAN,
    ["ordered/infra-two/main.tf"] = TF_PLAN,
    ["ordered/terraform/main.tf"] = TF_PLAN,   -- not a deployment: not deployed
    ["plain/cloudformation/bitops.config.yaml"] = "cloudformation:\n  cli:\n    skip-deploy: true\n"
      .. "  options:\n    cfn-stack-name: plain\n",
    ["plain/helm/bitops.config.yaml"] = HELM_CONFIG,
    ["plain/helm/web/Chart.yaml"] = CHART,
    ["plain/ansible/playbook.yaml"] = PLAYBOOK_NOOP,
    ["plain/terraform/main.tf"] = TF_PLAN,
    ["plain/notes/README"] = "not a tool folder\n",
    ["unknown/bitops.config.yaml"] = "bitops:\n  deployments:\n    stack:\n      plugin: pulumi\n",
    ["unknown/stack/main.tf"] = TF_PLAN,
    ["missing/bitops.config.yaml"] = "bitops:\n  deployments:\n    network:\n      plugin: terraform\n",
    ["missing/terraform/main.tf"] = TF_PLAN,
    ["command/bitops.config.yaml"] = "bitops:\n  deployments:\n    runs: {}\n",
    ["command/runs/main.tf"] = TF_PLAN,
  })
  return plan_repo
end

describe("the plan of an environment", function()
  it("follows bitops.deployments in document order, a plugin: naming the tool of a folder", function()
    local r = deploy(plan(), {"--env", "ordered", "--dry-run"})
    assert.are.equal(0, r.code, r.out)
    local rows = summary(r.stdout)
    assert.are.same({"ordered/ansible", "ordered/infra-two", "ordered/infra-one"}, rows)
    -- one tool (terraform) serves two folders, each in its own folder of the working copy
    local playbook = r.stdout:find("would run: ansible-playbook playbook.yaml", 1, true)
    local two = r.stdout:find("would run: terraform init[^\n]*\n    in: [^\n]*/ordered/infra%-two\n")
    local one = r.stdout:find("would run: terraform init[^\n]*\n    in: [^\n]*/ordered/infra%-one\n")
    assert.is_truthy(playbook and two and one, r.stdout)
    assert.is_true(playbook < two and two < one)
    assert.matches("env: BITOPS_PLUGIN_NAME=terraform", r.stdout, 1, true)
  end)

  it("without bitops.deployments, deploys terraform, ansible, helm, cloudformation in that order", function()
    local r = deploy(plan(), {"--env", "plain", "--dry-run"})
    assert.are.equal(0, r.code, r.out)
    local rows, status = summary(r.stdout)
    assert.are.same({"plain/terraform", "plain/ansible", "plain/helm", "plain/cloudformation"}, rows)
    assert.are.equal("skipped", status["plain/cloudformation"])
  end)

  it("refuses an unknown plugin, naming the file and the known plugins", function()
    local r = deploy(plan(), {"--env", "unknown", "--dry-run"})
    assert.are.equal(1, r.code)
    assert.matches("unknown/bitops.config.yaml: bitops.deployments.stack.plugin: unknown plugin 'pulumi' "
      .. "(known: ansible, cloudformation, helm, terraform)", r.stderr, 1, true)
  end)

  it("asks for the plugin of a folder that is not named after a tool (opsrun's commands are not tools)", function()
    local r = deploy(plan(), {"--env", "command", "--dry-run"})
    assert.are.equal(1, r.code)
    assert.matches("command/bitops.config.yaml: bitops.deployments.runs needs a plugin: "
      .. "(one of ansible, cloudformation, helm, terraform)", r.stderr, 1, true)
  end)

  it("refuses a deployment whose folder does not exist", function()
    local r = deploy(plan(), {"--env", "missing", "--dry-run"})
    assert.are.equal(1, r.code)
    assert.matches("missing/bitops.config.yaml: bitops.deployments.network: there is no folder missing/network",
      r.stderr, 1, true)
  end)
end)

describe("an environment's bitops settings", function()
  local made
  local function settings_repo()
    made = made or make_repo(base .. "/settings", {
      ["maybe/bitops.config.yaml"] = "bitops:\n  fail_fast: maybe\n",
      ["logfive/bitops.config.yaml"] = "bitops:\n  logging: 5\n",
      ["listed/bitops.config.yaml"] = "bitops: [1]\n",
      -- BitOps' settings opsrun has no use for, and keys left empty (their children commented out)
      ["empty/bitops.config.yaml"] = "bitops:\n  logging:\n  fail_fast:\n  run_mode: default\n  timeout: 600\n",
      ["bare/bitops.config.yaml"] = "bitops:\n",
      ["typo/bitops.config.yaml"] = "bitops:\n  fail-fast: false\n  deployment: {}\n",
      ["maybe/terraform/main.tf"] = TF_PLAN, ["logfive/terraform/main.tf"] = TF_PLAN,
      ["listed/terraform/main.tf"] = TF_PLAN, ["empty/terraform/main.tf"] = TF_PLAN,
      ["bare/terraform/main.tf"] = TF_PLAN, ["typo/terraform/main.tf"] = TF_PLAN,
    })
    return made
  end

  it("refuses a value of the wrong kind, naming the file and the key", function()
    local repo = settings_repo()
    for env, msg in pairs({
      maybe = 'maybe/bitops.config.yaml: bitops.fail_fast must be true or false, not the string "maybe"',
      logfive = "logfive/bitops.config.yaml: bitops.logging must be a mapping (masks: ...), not the number 5",
      listed = "listed/bitops.config.yaml: bitops must be a mapping, not a list",
    }) do
      local r = deploy(repo, {"--env", env, "--dry-run"})
      assert.are.equal(1, r.code, r.out)
      assert.matches(msg, r.stderr, 1, true)
      assert.not_matches("traceback", r.out)
    end
    -- a wrong value from _default/bitops.config.yaml names that file
    local d = make_repo(base .. "/settings-default", {
      ["_default/bitops.config.yaml"] = "bitops:\n  fail_fast: sometimes\n",
      ["x/bitops.config.yaml"] = "bitops: {}\n", ["x/terraform/main.tf"] = TF_PLAN,
    })
    local r = deploy(d, {"--env", "x", "--dry-run"})
    assert.are.equal(1, r.code, r.out)
    assert.matches('_default/bitops.config.yaml: bitops.fail_fast must be true or false, not the string "sometimes"',
      r.stderr, 1, true)
  end)

  it("takes empty keys as absent, passes over BitOps' own settings and warns of any other key", function()
    local repo = settings_repo()
    for _, env in ipairs({"empty", "bare"}) do
      local r = deploy(repo, {"--env", env, "--dry-run"})
      assert.are.equal(0, r.code, r.out)
      assert.are.same({env .. "/terraform"}, (summary(r.stdout)))
      assert.not_matches("WARN", r.stderr)
    end
    local r = deploy(repo, {"--env", "typo", "--dry-run"})
    assert.are.equal(0, r.code, r.out)
    local notice = " is not a setting opsrun knows (deployments, fail_fast, logging); ignored\n"
    local a = r.stderr:find("typo/bitops.config.yaml: bitops.deployment" .. notice, 1, true)
    local b = r.stderr:find("typo/bitops.config.yaml: bitops.fail-fast" .. notice, 1, true)
    assert.is_truthy(a and b and a < b, r.stderr)
  end)
end)

describe("--only and --skip", function()
  local function rows_of(args)
    local r = deploy(plan(), concat({"--env", "ordered", "--dry-run"}, args))
    assert.are.equal(0, r.code, r.out)
    return (summary(r.stdout))
  end

  it("take --opt=VALUE as --opt VALUE, before the command too, and lose no argument after it", function()
    assert.are.same({"ordered/ansible"}, rows_of({"--only=ansible", "--skip=terraform"}))
    -- a global --log-level=... before `deploy` once shifted the arguments and dropped the last
    -- one: here --dry-run, which would have deployed for real
    local r = opsrun({"--log-level=warn", "deploy", "--repo=" .. plan(), "--env=ordered", "--only=ansible", "--dry-run"})
    assert.are.equal(0, r.code, r.out)
    assert.matches("\ndry run: nothing was run\n", r.stdout, 1, true)
    assert.are.same({"ordered/ansible"}, (summary(r.stdout)))
  end)

  it("select steps by step id, folder or tool", function()
    assert.are.same({"ordered/infra-one"}, rows_of({"--only", "ordered/infra-one"}))
    assert.are.same({"ordered/infra-two"}, rows_of({"--only", "infra-two"}))
    assert.are.same({"ordered/infra-two", "ordered/infra-one"}, rows_of({"--only", "terraform"}))
    assert.are.same({"ordered/ansible"}, rows_of({"--skip", "terraform"}))
    assert.are.same({"ordered/ansible", "ordered/infra-one"}, rows_of({"--skip", "infra-two"}))
    assert.are.same({"ordered/infra-two"}, rows_of({"--only", "terraform", "--skip", "ordered/infra-one"}))
  end)

  it("refuse a name that is no step, folder, tool or environment, and run nothing", function()
    for _, args in ipairs({{"--skip", "infra-tow"}, {"--only", "ordered/terraform"}, {"--only", "ansible,halm"},
        {"--only", "ordered/infra-one/x"}}) do
      local r = deploy(plan(), concat({"--env", "ordered"}, args))
      assert.are.equal(1, r.code, r.out)
      local name = args[2]:match("halm") or args[2]
      assert.matches(args[1] .. " " .. name .. ": no step, folder, tool or environment of that name "
        .. "(steps: ordered/ansible, ordered/infra-one, ordered/infra-two; tools: ansible, cloudformation, helm, terraform)",
        r.stderr, 1, true)
      assert.not_matches("ordered/ansible  ", r.stdout)   -- no summary: nothing ran
    end
  end)

  it("say so when a known name leaves no step", function()
    -- a tool the environment does not use, another environment: nothing to do, not an error
    for _, args in ipairs({{"--only", "helm"}, {"--only", "plain"}, {"--only", "plain/helm"}}) do
      local r = deploy(plan(), concat({"--env", "ordered", "--dry-run"}, args))
      assert.are.equal(0, r.code, r.out)
      assert.are.equal("nothing to deploy: --only/--skip left no step\n", r.stdout)
    end
  end)
end)

-- ---------------------------------------------------------------------------------------
-- The site repo: dev deploys terraform (apply: a terraform_data whose local-exec writes
-- $OUT/terraform-ran) then ansible (a playbook writing $OUT/dev.txt), with hooks and a
-- _default; more environments hold broken configs.

local PLAYBOOK = [[
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - ansible.builtin.copy:
        dest: "{{ lookup('env', 'OUT') }}/{{ lookup('env', 'BITOPS_ENVIRONMENT') }}.txt"
        content: "greeting={{ greeting }}\nsize={{ size | default('unset') }}\nforks={{ ansible_forks }}\n"
]]

local site_repo
local function site()
  if site_repo then return site_repo end
  local before = "dev/ansible/bitops.before-deploy.d/"
  site_repo = make_repo(base .. "/site", {
    ["_default/ansible/bitops.config.yaml"] = "ansible:\n  cli:\n    extra-vars:\n"
      .. "      - greeting=from-default\n      - size=from-default\n    forks: 3\n  options:\n    dryrun: true\n",
    ["_default/ansible/only-in-default.txt"] = "from _default\n",
    ["_default/ansible/notes.txt"] = "the _default notes\n",
    ["dev/bitops.config.yaml"] = "bitops:\n  logging:\n    masks:\n      - search: \"hunter\\\\d+\"\n",
    ["dev/terraform/main.tf"] = 'resource "terraform_data" "ran" {\n  input = "x"\n'
      .. '  provisioner "local-exec" {\n    command = "echo ran > $OUT/terraform-ran"\n  }\n}\n',
    ["dev/terraform/bitops.config.yaml"] = "terraform:\n  options:\n    stack-action: apply\n",
    ["dev/ansible/bitops.config.yaml"] = "ansible:\n  cli:\n    extra-vars:\n      - greeting=from-file\n"
      .. "      - password=hunter22\n  options:\n    dryrun: false\n",
    ["dev/ansible/playbook.yaml"] = PLAYBOOK,
    ["dev/ansible/notes.txt"] = "the environment's notes\n",
    [before .. "01-env.sh"] = 'echo "hook 01-env" >> "$EVENTS"\nenv > "$OUT/hook-env"\npwd > "$OUT/hook-pwd"\n',
    [before .. "02-rewrite.sh"] = 'echo "hook 02-rewrite" >> "$EVENTS"\n'
      .. "sed -i 's/greeting=from-file/greeting=from-hook/' bitops.config.yaml\n"
      .. 'echo "written by a hook" > hook-wrote.txt\n',
    [before .. "03-in-process.lua"] = [[
local step = ...
assert(ops.fs.append(os.getenv("EVENTS"), "hook 03-in-process\n"))
assert(ops.fs.write(os.getenv("OUT") .. "/lua-hook", string.format("pid=%d\nid=%s\ntool=%s\ndir=%s\n",
  ops.sys.pid(), step.id, step.tool, step.dir)))
]],
    [before .. "04-maybe-fail.sh"] = 'if [ -n "${FAIL_HOOK:-}" ]; then exit 3; fi\n',
    ["dev/ansible/bitops.after-deploy.d/01-after.sh"] = 'if [ -f "$OUT/dev.txt" ]; then saw=saw-playbook-output; fi\n'
      .. 'echo "after ${saw:-saw-nothing}" >> "$EVENTS"\n'
      .. 'cp notes.txt only-in-default.txt bitops.config.yaml "$OUT/"\n',
    ["badyaml/ansible/bitops.config.yaml"] = "ansible:\n  cli:\n    extra-vars: [greeting=x\n  options: {}\n",
    ["badyaml/ansible/playbook.yaml"] = PLAYBOOK_NOOP,
    ["badtype/ansible/bitops.config.yaml"] = "ansible:\n  options:\n    skip-deploy: maybe\n",
    ["badtype/ansible/playbook.yaml"] = PLAYBOOK_NOOP,
    ["noexec/ansible/playbook.yaml"] = PLAYBOOK_NOOP,
    ["bare/ansible/bitops.config.yaml"] = "cli:\n  extra-vars: greeting=bare\n",
    ["bare/ansible/playbook.yaml"] = PLAYBOOK_NOOP,
    ["noexec/ansible/bitops.before-deploy.d/check"] = {"#!/bin/sh\nexit 0\n", mode = "0644"},
    ["luabad/ansible/playbook.yaml"] = PLAYBOOK_NOOP,
    ["luabad/ansible/bitops.before-deploy.d/01-syntax.lua"] = "if FAIL_SYNTAX then x = = 1 end\n",
    ["outside/ansible/playbook.yaml"] = PLAYBOOK_NOOP,
    ["outside/ansible/bitops.config.yaml"] = "ansible:\n  cli:\n    main-playbook: ../../dev/ansible/playbook.yaml\n",
    ["cfnmissing/cloudformation/bitops.config.yaml"] = "cloudformation:\n  options:\n    cfn-stack-name: s\n"
      .. "    cfn-files:\n      template-file: nope.yaml\n",
    ["extradir/ansible/playbook.yaml"] = PLAYBOOK_NOOP,
    ["extradir/ansible/extra_env/not-a-file"] = "",
    ["luaraise/ansible/playbook.yaml"] = PLAYBOOK_NOOP,
    ["luaraise/ansible/bitops.before-deploy.d/01-raise.lua"] = "local step = ...\nif step then error({}) end\n",
  })
  return site_repo
end

-- Deploys site's environment env, which must fail with msg in the summary; the result.
local function site_fails(env, msg)
  local r = deploy(site(), {"--env", env})
  assert.are.equal(1, r.code, r.out)
  assert.matches(msg, r.stdout, 1, true)
  return r
end

local function fresh_out(name)
  local out = base .. "/out-" .. name
  assert(fs.mkdir_p(out))
  return out
end

-- The one real deploy of site/dev that the hook and _default rules are read from.
local dev_run
local function deployed_dev()
  if dev_run then return dev_run end
  reset_events()
  local out = fresh_out("dev")
  local r = deploy(site(), {"--env", "dev"}, {OUT = out})
  dev_run = {r = r, out = out, events = events()}
  return dev_run
end

local function env_file(path)
  local vars = {}
  for line in (h.read(path) or ""):gmatch("[^\n]+") do
    local k, v = line:match("^([%w_]+)=(.*)$")
    if k then vars[k] = v end
  end
  return vars
end

describe("hooks", function()
  it("run before the tool in name order (.sh with bash, .lua in-process), after hooks after it", function()
    local d = deployed_dev()
    assert.are.equal(0, d.r.code, d.r.out)
    assert.are.same({"hook 01-env", "hook 02-rewrite", "hook 03-in-process", "after saw-playbook-output"}, d.events)
    -- the Lua hook ran inside the opsrun that deployed, with the step
    local lua = env_file(d.out .. "/lua-hook")
    assert.are.equal(tostring(d.r.pid), lua.pid)
    assert.are.equal("dev/ansible", lua.id)
    assert.are.equal("ansible", lua.tool)
  end)

  it("run before the config is read: a hook that rewrites bitops.config.yaml changes what runs", function()
    local d = deployed_dev()
    assert.matches("greeting=from-hook\n", h.read(d.out .. "/dev.txt"), 1, true)
  end)

  it("run .sh hooks in the tool folder of the working copy with the BitOps and OPSRUN variables", function()
    local d = deployed_dev()
    local v = env_file(d.out .. "/hook-env")
    local tmp = v.BITOPS_TEMPDIR
    assert.is_truthy(tmp and tmp ~= "" and tmp ~= site())
    assert.are.equal("dev", v.BITOPS_ENVIRONMENT)
    assert.are.equal("dev", v.OPSRUN_ENVIRONMENT)
    assert.are.equal(tmp .. "/dev", v.BITOPS_ENVROOT)
    assert.are.equal(tmp .. "/dev", v.BITOPS_OPSREPO_ENVIRONMENT_DIR)
    assert.are.equal(tmp .. "/dev", v.OPSRUN_ENV_DIR)
    assert.are.equal(tmp, v.OPSRUN_WORKDIR)
    assert.are.equal("ansible", v.BITOPS_PLUGIN_NAME)
    assert.are.equal("ansible", v.OPSRUN_TOOL)
    assert.are.equal("dev/ansible", v.OPSRUN_STEP)
    assert.are.equal(tmp .. "/dev/ansible", v.OPSRUN_STEP_DIR)
    assert.are.equal(site(), v.OPSRUN_REPO)
    assert.are.equal("false", v.BITOPS_DRY_RUN)
    assert.are.equal(tmp .. "/dev/ansible\n", h.read(d.out .. "/hook-pwd"))
    assert.are.equal(tmp .. "/dev/ansible", env_file(d.out .. "/lua-hook").dir)
    -- the working copy is removed with the run
    assert.is_false(fs.exists(tmp))
  end)

  it("never modify the operations repo: hooks write into the working copy", function()
    deployed_dev()
    assert.are.equal("", git(site(), "status", "--porcelain", "--untracked-files=all"))
    assert.is_false(fs.exists(site() .. "/dev/ansible/hook-wrote.txt"))
  end)

  it("fail the step when one fails, naming the hook and its exit code; the tool does not run", function()
    local out = fresh_out("failing-hook")
    local r = deploy(site(), {"--env", "dev", "--only", "ansible"}, {OUT = out, FAIL_HOOK = "1"})
    assert.are.equal(1, r.code)
    local _, status = summary(r.stdout)
    assert.are.equal("failed", status["dev/ansible"])
    assert.matches("dev/ansible failed: hook bitops.before-deploy.d/04-maybe-fail.sh exited with 3", r.stdout, 1, true)
    assert.is_false(fs.exists(out .. "/dev.txt"))
  end)

  it("name a Lua hook that cannot load or fails by its path in the repo", function()
    site_fails("luabad", "luabad/ansible failed: hook bitops.before-deploy.d/01-syntax.lua cannot be loaded: "
      .. "luabad/ansible/bitops.before-deploy.d/01-syntax.lua:1: unexpected symbol near '='")
    -- an error with no message says so (not a table's address)
    site_fails("luaraise", "luaraise/ansible failed: hook bitops.before-deploy.d/01-raise.lua failed: "
      .. "it raised a table with no message\n")
  end)

  it("say why the step waits when a hook leaves a process holding its output, and wait for it", function()
    local root = make_repo(base .. "/lingering", {
      ["bg/ansible/playbook.yaml"] = PLAYBOOK_NOOP,
      ["bg/ansible/bitops.before-deploy.d/01-bg.sh"] = 'sleep 3 &\necho "started in the background"\n',
    })
    local r = deploy(root, {"--env", "bg"})
    assert.are.equal(0, r.code, r.out)
    assert.matches("[bg/ansible] bash bg/ansible/bitops.before-deploy.d/01-bg.sh has exited, but a process it started "
      .. "still holds its output open: the step waits for that process to end (give it its own output: "
      .. "`cmd >/dev/null 2>&1 &`)", r.stderr, 1, true)
    assert.is_true(r.duration >= 3, tostring(r.duration)) -- it waited for the background process
  end)

  it("refuse a hook that is neither executable nor a .sh, saying how to fix it", function()
    local r = deploy(site(), {"--env", "noexec"})
    assert.are.equal(1, r.code)
    assert.matches("hook bitops.before-deploy.d/check is not executable (chmod +x it, or name it .sh to run it with bash)",
      r.stdout, 1, true)
  end)
end)

describe("a path in a tool's settings", function()
  it("is named as the repo has it, with its key and file, never by the run's working copy", function()
    for env, msg in pairs({
      outside = "outside/ansible failed: cli.main-playbook: ../../dev/ansible/playbook.yaml leads outside "
        .. "outside/ansible (outside/ansible/bitops.config.yaml)",
      cfnmissing = "cfnmissing/cloudformation failed: options.cfn-files.template-file names nope.yaml, which does "
        .. "not exist in cfnmissing/cloudformation (stack 's') (cfnmissing/cloudformation/bitops.config.yaml)",
      -- any failure's message: what the system said about a file of the copy names it as the repo has it
      extradir = "extradir/ansible failed: cannot read extradir/ansible/extra_env: EISDIR: is a directory: "
        .. "extradir/ansible/extra_env\n",
    }) do
      assert.not_matches("opsrun%-run%-", site_fails(env, msg).out)
    end
  end)
end)

describe("_default", function()
  it("deep-merges _default/<tool>/bitops.config.yaml under the environment's: env wins, lists replaced", function()
    local d = deployed_dev()
    local dev = h.read(d.out .. "/dev.txt")
    assert.matches("size=unset\n", dev, 1, true)        -- the env's extra-vars list replaced _default's
    assert.matches("forks=3\n", dev, 1, true)           -- a key only _default has is kept
    local merged = assert(ops.yaml.load(h.read(d.out .. "/bitops.config.yaml")))
    assert.are.same({"greeting=from-hook", "password=hunter22"}, merged.ansible.cli["extra-vars"])
    assert.are.equal(3, merged.ansible.cli.forks)
    -- the env's `false` wins over _default's `true`: the playbook ran without --check and wrote
    assert.is_false(merged.ansible.options.dryrun)
  end)

  it("merges whether or not each file nests the settings under the tool's name", function()
    local r = deploy(site(), {"--env", "bare", "--dry-run"})
    assert.are.equal(0, r.code, r.out)
    assert.matches("would run: ansible-playbook playbook.yaml --extra-vars greeting=bare --forks 3 --check\n", r.stdout, 1, true)
  end)

  it("copies a file only _default has, and keeps the environment's own file over _default's", function()
    local d = deployed_dev()
    assert.are.equal("from _default\n", h.read(d.out .. "/only-in-default.txt"))
    assert.are.equal("the environment's notes\n", h.read(d.out .. "/notes.txt"))
  end)
end)

describe("working copies kept between runs", function()
  -- The hook reports the inode of a file of its working copy and whether what the last run
  -- changed is still there, then changes the copy: edits a file, adds one.
  local HOOK = [[
echo "ino $(stat -c %i web/Chart.yaml) values=$(cat web/values.yaml) leftover=$([ -e leftover.txt ] && echo yes || echo no) marker=$([ -e marker ] && echo yes || echo no)" >> "$EVENTS"
echo "replicas: 9" > web/values.yaml
echo "left by a run" > leftover.txt
]]
  local repo, tmpdir
  local function kept()
    return tmpdir .. "/opsrun-copies-" .. ops.sys.uid() .. "/"
      .. fs.basename(repo) .. "-" -- then the hash of the repo's path
  end
  local function kept_env()
    for _, name in ipairs(assert(fs.list(tmpdir .. "/opsrun-copies-" .. ops.sys.uid()))) do
      if (tmpdir .. "/opsrun-copies-" .. ops.sys.uid() .. "/" .. name):sub(1, #kept()) == kept() then
        return tmpdir .. "/opsrun-copies-" .. ops.sys.uid() .. "/" .. name .. "/dev"
      end
    end
  end
  local function run(env)
    reset_events()
    local r = deploy(repo, {"--env", "dev"}, merge({TMPDIR = tmpdir}, env or {}))
    assert.are.equal(0, r.code, r.out)
    local ev = events()
    assert.are.equal(1, #ev, table.concat(ev, "\n"))
    local ino, values, leftover, marker = ev[1]:match("^ino (%d+) values=(.-) leftover=(%a+) marker=(%a+)$")
    assert.is_truthy(ino, ev[1])
    return {ino = ino, values = values, leftover = leftover, marker = marker}
  end

  setup(function()
    tmpdir = base .. "/kept-tmp"
    assert(fs.mkdir_p(tmpdir))
    repo = make_repo(base .. "/kept", {
      ["dev/helm/bitops.config.yaml"] = HELM_CONFIG,
      ["dev/helm/web/Chart.yaml"] = CHART,
      ["dev/helm/web/values.yaml"] = "replicas: 1\n",
      ["dev/helm/bitops.before-deploy.d/probe.sh"] = HOOK,
    })
  end)

  it("reuses the copy (same files), keeping nothing the last run changed or added", function()
    local first = run()
    assert.are.same({"replicas: 1", "no", "no"}, {first.values, first.leftover, first.marker})
    local dir = assert(kept_env(), "no kept copy of dev")
    -- given back as the repo has it: what the run added is gone, what it edited restored
    assert.is_false(fs.exists(dir .. "/helm/leftover.txt"))
    assert.are.equal("replicas: 1\n", h.read(dir .. "/helm/web/values.yaml"))
    assert.are.equal(octal_700, fs.stat(tmpdir .. "/opsrun-copies-" .. ops.sys.uid()).mode)
    local second = run()
    assert.are.equal(first.ino, second.ino) -- the same file: nothing was copied again
    assert.are.same({"replicas: 1", "no", "no"}, {second.values, second.leftover, second.marker})
    -- the operations repo itself never changes
    assert.are.equal("", git(repo, "status", "--porcelain", "--untracked-files=all"))
  end)

  it("brings the copy in line with the repo: a new commit's files, a file planted in the copy", function()
    run()
    h.write(repo .. "/dev/helm/web/values.yaml", "replicas: 3\n")
    commit(repo, "three replicas")
    h.write(assert(kept_env()) .. "/helm/marker", "planted\n")
    local r = run()
    assert.are.same({"replicas: 3", "no", "no"}, {r.values, r.leftover, r.marker})
    assert.is_false(fs.exists(kept_env() .. "/helm/marker"))
  end)

  it("copies afresh with OPSRUN_KEEP_COPIES=0, leaving the kept copy alone", function()
    run()
    h.write(assert(kept_env()) .. "/helm/marker", "planted\n")
    for _, off in ipairs({"0", "Off"}) do
      local r = run({OPSRUN_KEEP_COPIES = off})
      assert.are.equal("no", r.marker, off)
      assert.is_true(fs.exists(kept_env() .. "/helm/marker"), off)
    end
  end)

  it("does not use a folder of kept copies that others can read or that is not ours", function()
    local other = base .. "/open-tmp"
    local top = other .. "/opsrun-copies-" .. ops.sys.uid()
    assert(fs.mkdir_p(top))
    assert(fs.chmod(top, "0755"))
    reset_events()
    local r = deploy(repo, {"--env", "dev"}, {TMPDIR = other})
    assert.are.equal(0, r.code, r.out)
    assert.are.same({}, fs.list(top))
  end)
end)

describe("configuration", function()
  local function dry(env)
    local r = deploy(site(), {"--env", "dev", "--only", "ansible", "--dry-run"}, env)
    assert.are.equal(0, r.code, r.out)
    return r
  end
  local function playbook_line(r)
    return assert(r.stdout:match("would run: (ansible%-playbook[^\n]*)"), r.stdout)
  end

  it("takes BITOPS_<TOOL>_<KEY> over the export_env variable over the file over the default", function()
    assert.are.equal("ansible-playbook playbook.yaml --extra-vars greeting=from-file --extra-vars password=*** --forks 3",
      playbook_line(dry()))
    assert.are.equal("ansible-playbook playbook.yaml --extra-vars greeting=exported --forks 3",
      playbook_line(dry({ANSIBLE_EXTRA_VARS = "greeting=exported"})))
    assert.are.equal("ansible-playbook playbook.yaml --extra-vars greeting=bitops --forks 3",
      playbook_line(dry({ANSIBLE_EXTRA_VARS = "greeting=exported", BITOPS_ANSIBLE_EXTRA_VARS = "greeting=bitops"})))
    -- the file's `false` (over _default's true) is kept; the environment overrides it
    assert.not_matches("--check", playbook_line(dry()), 1, true)
    assert.matches("--check", playbook_line(dry({ANSIBLE_DRYRUN = "true"})), 1, true)
  end)

  it("skips a step whose skip-deploy is set, from the file or the environment, and says so", function()
    local _, status = summary(dry({ANSIBLE_SKIP_DEPLOY = "true"}).stdout)
    assert.are.equal("skipped", status["dev/ansible"])
    _, status = summary(dry({ANSIBLE_SKIP_DEPLOY = "true", BITOPS_ANSIBLE_SKIP_DEPLOY = "false"}).stdout)
    assert.are.equal("succeeded", status["dev/ansible"])
    -- a real run: the terraform step is skipped (nothing applied), ansible still deploys
    local out = fresh_out("skip")
    local r = deploy(site(), {"--env", "dev"}, {OUT = out, TERRAFORM_SKIP_DEPLOY = "true"})
    assert.are.equal(0, r.code, r.out)
    _, status = summary(r.stdout)
    assert.are.equal("skipped", status["dev/terraform"])
    assert.are.equal("succeeded", status["dev/ansible"])
    assert.is_false(fs.exists(out .. "/terraform-ran"))
    assert.is_true(fs.exists(out .. "/dev.txt"))
  end)

  it("fails with exit 1 on malformed YAML, naming file:line", function()
    local r = deploy(site(), {"--env", "badyaml", "--dry-run"})
    assert.are.equal(1, r.code)
    -- named as in the repo (never by the run's working copy), though _default merges into it;
    -- the merge happens as the environment's copy is made, so the step it serves fails
    assert.matches("ERROR [badyaml/ansible] badyaml/ansible/bitops.config.yaml:4:10: ", r.stderr, 1, true)
    assert.is_nil(r.stderr:find("/tmp/opsrun-run-", 1, true))
  end)

  it("fails on a value of the wrong type, naming the key and the file", function()
    local r = deploy(site(), {"--env", "badtype", "--dry-run"})
    assert.are.equal(1, r.code)
    assert.matches("environment 'badtype': ansible step: options.skip-deploy must be true or false, "
      .. 'not the string "maybe" (badtype/ansible/bitops.config.yaml)', r.out, 1, true)
  end)
end)

describe("--dry-run", function()
  it("prints every command with its folder and environment, secrets masked, and runs nothing", function()
    local out = fresh_out("dry")
    reset_events()
    local r = deploy(site(), {"--env", "dev", "--dry-run"}, {OUT = out, OPSRUN_STORE = base .. "/dry-store/opsrun.db"})
    assert.are.equal(0, r.code, r.out)
    local dir = r.stdout:match("would run: terraform init %-input=false\n    in: (%S+)/dev/terraform\n")
    assert.is_truthy(dir, r.stdout)
    assert.matches("would run: terraform apply -input=false -auto-approve", r.stdout, 1, true)
    assert.matches("would run: bash " .. dir .. "/dev/ansible/bitops.before-deploy.d/01-env.sh\n    in: "
      .. dir .. "/dev/ansible\n", r.stdout, 1, true)
    assert.matches("would run the Lua hook bitops.before-deploy.d/03-in-process.lua", r.stdout, 1, true)
    assert.matches("    env: BITOPS_ENVIRONMENT=dev\n", r.stdout, 1, true)
    assert.matches("    env: ANSIBLE_EXTRA_VARS=greeting=from-file,password=***\n", r.stdout, 1, true)
    assert.not_matches("hunter22", r.out)
    assert.matches("dry run: nothing was run", r.stdout, 1, true)
    -- nothing ran: no playbook output, no terraform provisioner, no hook
    assert.are.same({}, fs.list(out))
    assert.are.same({}, events())
    -- and nothing was recorded
    assert.is_false(fs.exists(base .. "/dry-store/opsrun.db"))
  end)
end)

describe("a tool that is not installed", function()
  it("fails its step with '<tool>: command not found (is <tool> installed and on PATH?)'", function()
    local r = deploy(site(), {"--env", "dev"}, {OUT = fresh_out("nopath"), PATH = "/usr/bin:/bin"})
    assert.are.equal(1, r.code)
    local _, status = summary(r.stdout)
    assert.are.equal("failed", status["dev/terraform"])
    assert.are.equal("not-run", status["dev/ansible"])
    assert.matches("dev/terraform failed: terraform: command not found (is terraform installed and on PATH?)",
      r.stdout, 1, true)
  end)
end)

-- ---------------------------------------------------------------------------------------

describe("the graph of steps", function()
  local function starts_and_ends()
    local ev = events()
    return ev, function(step) return index_of(ev, "start " .. step), index_of(ev, "end " .. step) end
  end

  it("deploys two environments at once with --jobs 2; each environment's steps in order, never overlapping", function()
    reset_events()
    local r = deploy(graph(), {"--env", "a,b", "--jobs", "2"}, {RENDEZVOUS = "a/terraform b/terraform"})
    assert.are.equal(0, r.code, r.out)
    local ev, at = starts_and_ends()
    -- both environments' first steps had started before either ended
    local sa, ea = at("a/terraform")
    local sb, eb = at("b/terraform")
    assert.is_truthy(sa and sb and ea and eb, table.concat(ev, " | "))
    assert.is_true(sb < ea and sa < eb, table.concat(ev, " | "))
    for _, env in ipairs({"a", "b"}) do
      assert_before(ev, "end " .. env .. "/terraform", "start " .. env .. "/helm")
      assert_before(ev, "start " .. env .. "/helm", "end " .. env .. "/helm")
    end
  end)

  it("deploys one step at a time with --jobs 1", function()
    reset_events()
    local r = deploy(graph(), {"--env", "a,b", "--jobs", "1"}, {HOLD = "0.2"})
    assert.are.equal(0, r.code, r.out)
    assert.are.same({"start a/terraform", "end a/terraform", "start a/helm", "end a/helm",
      "start b/terraform", "end b/terraform", "start b/helm", "end b/helm"}, events())
  end)

  it("fails fast by default: after a failure nothing new starts, the rest is not-run, exit 1", function()
    reset_events()
    local r = deploy(graph(), {"--env", "a,b", "--jobs", "1"}, {FAIL_STEP = "a/terraform"})
    assert.are.equal(1, r.code)
    local _, status = summary(r.stdout)
    assert.are.same({["a/terraform"] = "failed", ["a/helm"] = "not-run", ["b/terraform"] = "not-run",
      ["b/helm"] = "not-run"}, status)
    assert.are.same({"start a/terraform"}, events())
    assert.matches("a/terraform failed: hook bitops.before-deploy.d/probe.sh exited with 3", r.stdout, 1, true)
  end)

  it("with --keep-going, goes on with other environments; the failed one's later steps are not-run", function()
    reset_events()
    local r = deploy(graph(), {"--env", "a,b", "--jobs", "1", "--keep-going"}, {FAIL_STEP = "a/terraform"})
    assert.are.equal(1, r.code)
    local _, status = summary(r.stdout)
    assert.are.same({["a/terraform"] = "failed", ["a/helm"] = "not-run", ["b/terraform"] = "succeeded",
      ["b/helm"] = "succeeded"}, status)
    assert.is_nil(index_of(events(), "start a/helm"))
  end)

  it("treats bitops.fail_fast: false in an environment's config as --keep-going", function()
    local r = deploy(graph(), {"--env", "c,b", "--jobs", "1"}, {FAIL_STEP = "c/terraform"})
    assert.are.equal(1, r.code)
    local _, status = summary(r.stdout)
    assert.are.same({["c/terraform"] = "failed", ["c/helm"] = "not-run", ["b/terraform"] = "succeeded",
      ["b/helm"] = "succeeded"}, status)
  end)
end)

describe("--changed-since", function()
  local repo, first
  setup(function()
    repo = make_repo(base .. "/changes", {
      ["a/terraform/main.tf"] = TF_PLAN, ["b/terraform/main.tf"] = TF_PLAN,
      ["_default/terraform/defaults.tf"] = "# nothing yet\n",
    })
    first = git(repo, "rev-parse", "HEAD")
    write_files(repo, {["a/terraform/main.tf"] = TF_PLAN .. "# changed\n"})
    commit(repo, "change a")
  end)

  local function rows_of(args)
    local r = deploy(repo, concat({"--dry-run"}, args))
    assert.are.equal(0, r.code, r.out)
    return (summary(r.stdout)), r
  end

  it("deploys only the environments whose files changed since REV (with or without --all)", function()
    assert.are.same({"a/terraform"}, rows_of({"--changed-since", first}))
    assert.are.same({"a/terraform"}, rows_of({"--changed-since", first, "--all"}))
    assert.are.same({}, rows_of({"--changed-since", first, "--env", "b"}))
  end)

  it("says there is nothing to deploy when nothing changed", function()
    local rows, r = rows_of({"--changed-since", "HEAD"})
    assert.are.same({}, rows)
    assert.matches("nothing to deploy: no environment changed since HEAD", r.stdout, 1, true)
  end)

  it("counts uncommitted and untracked files, and _default's changes for every environment", function()
    write_files(repo, {["b/terraform/new.tf"] = "# untracked\n"})
    assert.are.same({"b/terraform"}, rows_of({"--changed-since", "HEAD"}))
    write_files(repo, {["_default/terraform/defaults.tf"] = "# changed\n"})
    assert.are.same({"a/terraform", "b/terraform"}, rows_of({"--changed-since", "HEAD"}))
    git(repo, "checkout", "-q", "--", "_default")
    os.remove(repo .. "/b/terraform/new.tf")
  end)

  it("works for an operations repo in a folder of a larger git repository", function()
    local mono = make_repo(base .. "/mono", {["README"] = "the app\n",
      ["ops/a/terraform/main.tf"] = TF_PLAN, ["ops/b/terraform/main.tf"] = TF_PLAN})
    local rev = git(mono, "rev-parse", "HEAD")
    write_files(mono, {["ops/b/terraform/main.tf"] = TF_PLAN .. "# changed\n", ["README"] = "changed\n"})
    commit(mono, "change b")
    local r = deploy(mono .. "/ops", {"--dry-run", "--changed-since", rev})
    assert.are.equal(0, r.code, r.out)
    assert.are.same({"b/terraform"}, (summary(r.stdout)))
  end)

  it("fails clearly on a revision git does not know", function()
    local r = deploy(repo, {"--dry-run", "--changed-since", "no-such-rev"})
    assert.are.equal(1, r.code)
    assert.matches("--changed-since no-such-rev: ", r.stderr, 1, true)
    assert.matches("no%-such%-rev", r.stderr:match("%-%-changed%-since no%-such%-rev: ([^\n]*)"))
  end)
end)

-- ---------------------------------------------------------------------------------------

describe("locks", function()
  -- A deploy of a/terraform from repo, started in the background and held in its step
  -- (its before hook) until the file `release` exists; returns once the step has started.
  local function held_deploy(repo, release)
    reset_events()
    local first = assert(ops.proc.spawn({h.opsrun, "deploy", "--repo", repo, "--env", "a", "--only", "a/terraform"}, {
      env = {OPSRUN_STORE = store, EVENTS = base .. "/events", WAIT_FOR = release, NO_COLOR = "1",
        BITOPS_ENVIRONMENT = false, ENVIRONMENT = false},
      stdout = "capture", stderr = "capture",
    }))
    for _ = 1, 300 do
      if index_of(events(), "start a/terraform") then break end
      ops.sleep(0.05)
    end
    assert.is_truthy(index_of(events(), "start a/terraform"), "the first deploy did not start")
    return first
  end

  it("refuses a second deploy of an environment while the first runs, naming the holder's pid", function()
    local release = base .. "/release-lock"
    local first = held_deploy(graph(), release)
    local second = deploy(graph(), {"--env", "a", "--only", "a/terraform"})
    h.write(release, "")
    local r1 = first:wait()
    assert.are.equal(1, second.code)
    assert.matches("environment 'a' is being deployed by process " .. first.pid .. " on ", second.stderr, 1, true)
    assert.are.equal(0, r1.code, r1.stdout .. r1.stderr)
    assert.are.equal("0", sqlite("SELECT count(*) FROM locks"))
  end)

  it("locks by where the repo comes from: two clones of one origin exclude each other", function()
    local release = base .. "/release-lock-2"
    local clones = h.tmpdir()
    for _, c in ipairs({"one", "two"}) do
      assert(ops.proc.run({"git", "clone", "-q", graph(), clones .. "/" .. c}).ok)
    end
    local first = held_deploy(clones .. "/one", release)
    local second = deploy(clones .. "/two", {"--env", "a", "--only", "a/terraform"})
    h.write(release, "")
    local r1 = first:wait()
    assert.are.equal(1, second.code)
    assert.matches("environment 'a' is being deployed by process " .. first.pid, second.stderr, 1, true)
    assert.are.equal(0, r1.code, r1.stdout .. r1.stderr)
    h.rmtree(clones)
  end)

  it("takes the environments' locks in one transaction, up to the first another run holds", function()
    local path = base .. "/lock_all.lua"
    h.write(path, [[
local history = require "ops.deploy.history"
local db = history.open(...)
local function names() local out = {} for _, r in ipairs(db:query("SELECT name, run_id FROM locks ORDER BY name")) do out[#out + 1] = r.name .. "=" .. r.run_id end return table.concat(out, " ") end
print("first", history.lock_all(db, {"t:x", "t:y"}, 1))
local got, holder, at = history.lock_all(db, {"t:z", "t:y", "t:w"}, 2)
print("second", got, holder.run_id, at, names())
history.unlock_all(db, {"t:x", "t:y", "t:z"}, 3) -- not run 3's: nothing goes
print("others'", names())
history.unlock_all(db, {"t:x", "t:y"}, 1)
history.unlock_all(db, {"t:z", "t:w"}, 2)
print("released", names())
]])
    local r = opsrun({path, base .. "/lock_all.db"})
    assert.are.equal(0, r.code, r.out)
    assert.are.equal("first\ttrue\nsecond\tfalse\t1\t2\tt:x=1 t:y=1 t:z=2\n"
      .. "others'\tt:x=1 t:y=1 t:z=2\nreleased\t\n", r.stdout)
  end)

  it("refuses a run of several environments when one is locked, and leaves no lock behind", function()
    local release = base .. "/release-lock-3"
    local first = held_deploy(graph(), release)
    local second = deploy(graph(), {"--env", "b,a"})
    h.write(release, "")
    local r1 = first:wait()
    assert.are.equal(1, second.code)
    assert.matches("environment 'a' is being deployed by process " .. first.pid, second.stderr, 1, true)
    assert.are.equal(0, r1.code, r1.stdout .. r1.stderr)
    assert.are.equal("0", sqlite("SELECT count(*) FROM locks"))
    assert.are.equal("failed locked", sqlite("SELECT status || ' ' || error FROM runs ORDER BY id DESC LIMIT 1"))
  end)

  it("takes over a lock left by a process that is gone", function()
    assert.are.equal(0, opsrun({"runs"}).code)   -- the store exists
    local dead = assert(ops.proc.run({"true"})).pid
    assert.is_false(h.alive(dead))
    sqlite(string.format("INSERT INTO locks (name, pid, host, run_id, started) VALUES ('env:%s:b', %d, '%s', 999, 0)",
      graph(), dead, ops.sys.hostname()))
    local r = deploy(graph(), {"--env", "b", "--only", "b/helm"})
    assert.are.equal(0, r.code, r.out)
    assert.are.equal("0", sqlite("SELECT count(*) FROM locks"))
  end)
end)

-- `opsrun deploy --env a` of the graph repo, started and left in a/terraform's before-hook,
-- which sleeps in a child: returns the deploy's handle and the hook's and the sleeper's pids.
local function sleeping_deploy(pids, env)
  local e = {OPSRUN_STORE = store, EVENTS = base .. "/events", SLEEP_PIDS = pids, NO_COLOR = "1",
    BITOPS_ENVIRONMENT = false, ENVIRONMENT = false}
  for k, v in pairs(env or {}) do e[k] = v end
  local child = assert(ops.proc.spawn({h.opsrun, "deploy", "--repo", graph(), "--env", "a"},
    {env = e, stdout = "capture", stderr = "capture"}))
  for _ = 1, 300 do
    if h.read(pids) and h.read(pids):match("%d+ %d+") then break end
    ops.sleep(0.05)
  end
  local hook, sleeper = (h.read(pids) or ""):match("(%d+) (%d+)")
  assert.is_truthy(hook, "the hook did not start")
  return child, hook, sleeper
end

describe("SIGTERM during a deploy", function()
  it("stops the children, releases the lock, records the run as interrupted and exits 143", function()
    local child, hook, sleeper = sleeping_deploy(base .. "/sleep-pids")
    assert.is_true(h.alive(tonumber(sleeper)))
    assert(ops.sys.kill(child.pid, "SIGTERM"))
    local r = child:wait()
    assert.are.equal(143, r.code, r.stdout .. r.stderr)
    assert.is_false(h.alive(tonumber(hook)))
    assert.is_false(h.alive(tonumber(sleeper)))
    local id = last_run_id(r.stdout)
    assert.matches("run " .. id .. " interrupted", r.stdout, 1, true)
    local list = opsrun({"runs"})
    assert.matches("\n%s*" .. id .. "  interrupted ", list.stdout)
    local show = opsrun({"runs", "show", tostring(id)})
    assert.matches("run " .. id .. "  interrupted", show.stdout, 1, true)
    assert.matches("a/terraform  interrupted", show.stdout, 1, true)
    assert.matches("a/helm  not-run", show.stdout, 1, true)
    assert.are.equal("interrupted|1", sqlite("SELECT status, duration IS NOT NULL FROM steps WHERE run_id = "
      .. id .. " AND id = 'a/terraform'"))
    assert.are.equal("0", sqlite("SELECT count(*) FROM locks"))
    -- the environment can be deployed again at once
    local again = deploy(graph(), {"--env", "a"})
    assert.are.equal(0, again.code, again.out)
  end)
end)

describe("a step's log tail", function()
  it("keeps the start of a very long line, masked, cut between whole characters", function()
    local repo = make_repo(base .. "/long-line", {
      ["big/bitops.config.yaml"] = "bitops:\n  logging:\n    masks:\n      - search: \"tok-[0-9]+\"\n",
      ["big/ansible/playbook.yaml"] = PLAYBOOK_NOOP,
      -- "tok-1234 " masked to "*** ", 2043 x, then a 2-byte character across byte 2048
      ["big/ansible/bitops.before-deploy.d/01-long.sh"] = [[
printf 'tok-1234 '; printf '%2043s' '' | tr ' ' x; printf '\303\251'
head -c 100000 /dev/zero | tr '\0' y; echo; echo "tok-99 last"; exit 3
]],
    })
    local r = deploy(repo, {"--env", "big"})
    assert.are.equal(1, r.code)
    local id = last_run_id(r.stdout)
    local tail = sqlite("SELECT log_tail FROM steps WHERE run_id = " .. id .. " AND id = 'big/ansible'")
    local first = "*** " .. string.rep("x", 2043) .. " … (100002 more bytes)"
    assert.are.equal(first .. "\n*** last", tail:match("(%*%*%* x.-\n%*%*%* last)"))
    assert.not_matches("tok%-", tail)
    assert.is_true(#tail < 3000, #tail .. " bytes")
  end)
end)

describe("a deploy killed with SIGKILL", function()
  it("is recorded as interrupted by the next command, and its working folder is removed", function()
    local child, hook, sleeper = sleeping_deploy(base .. "/sleep-pids-kill", {TMPDIR = base .. "/tmp"})
    local id, workdir = sqlite("SELECT id, workdir FROM runs ORDER BY id DESC LIMIT 1"):match("^(%d+)|(.+)$")
    assert.matches("/opsrun%-run%-", workdir)
    assert.is_true(fs.exists(workdir .. "/a/terraform"))
    -- the step's row (written RECORD_DELAY after it starts: what a kill may lose)
    for _ = 1, 100 do
      if sqlite("SELECT count(*) FROM steps WHERE run_id = " .. id .. " AND status = 'running'") == "1" then break end
      ops.sleep(0.05)
    end
    assert(ops.sys.kill(child.pid, "SIGKILL"))
    child:wait()
    ops.sys.kill(tonumber(sleeper), "SIGKILL") -- its own process group: SIGKILL stopped no child
    ops.sys.kill(tonumber(hook), "SIGKILL")
    assert.are.equal("running", sqlite("SELECT status FROM runs WHERE id = " .. id))
    local list = opsrun({"runs"})
    assert.are.equal(0, list.code, list.out)
    assert.matches("\n%s*" .. id .. "  interrupted ", list.stdout)
    assert.is_false(fs.exists(workdir))   -- the copies (and any decoded secret) with it
    local show = opsrun({"runs", "show", id})
    assert.matches("\nerror its process (" .. child.pid .. ") ended without finishing the run: killed, or the machine stopped\n",
      show.stdout, 1, true)
    assert.matches("a/terraform  interrupted", show.stdout, 1, true)
    -- a deploy looks too, and says so
    sqlite("UPDATE runs SET status = 'running' WHERE id = " .. id)
    local again = deploy(graph(), {"--env", "a"})
    assert.are.equal(0, again.code, again.out)
    assert.matches("run " .. id .. " was left running by process " .. child.pid .. ", which is gone: recorded as interrupted",
      again.stderr, 1, true)
    assert.are.equal("0", sqlite("SELECT count(*) FROM runs WHERE status = 'running'"))
  end)
end)

describe("history", function()
  it("lists runs and shows each step's status, exit code, duration and log tail, secrets masked", function()
    local r = deploy(graph(), {"--env", "b", "--keep-going"}, {SAY = "tok-424242", FAIL_STEP = "b/terraform"})
    assert.are.equal(1, r.code)
    assert.not_matches("tok-424242", r.out)
    local id = last_run_id(r.stdout)
    local list = opsrun({"runs"})
    assert.are.equal(0, list.code)
    assert.matches("\n%s*" .. id .. "  failed  ", list.stdout)
    local show = opsrun({"runs", "show", tostring(id)})
    assert.are.equal(0, show.code, show.out)
    assert.matches("\nb/terraform  failed  exit 3  %d+%.%ds\n", show.stdout)
    assert.matches("  error: hook bitops.before-deploy.d/probe.sh exited with 3", show.stdout, 1, true)
    assert.matches("  | the token is [masked]\n", show.stdout, 1, true)
    assert.matches("  | probe: failing b/terraform on purpose\n", show.stdout, 1, true)
    assert.matches("\nb/helm  not-run  exit -  ", show.stdout, 1, true)
    assert.not_matches("tok-424242", show.stdout)
    -- the store's bytes never hold the secret
    for _, name in ipairs(fs.list(fs.dirname(store))) do
      local bytes = h.read(fs.join(fs.dirname(store), name)) or ""
      assert.is_nil(bytes:find("tok-424242", 1, true), name .. " holds the secret")
    end
  end)
end)

describe("a TMPDIR that cannot be used", function()
  it("fails the deploy before anything runs, naming it and the fix", function()
    local r = deploy(graph(), {"--env", "a"}, {TMPDIR = base .. "/no-such-folder"})
    assert.are.equal(1, r.code, r.out)
    assert.matches("cannot make the run's working folder: ENOENT: no such file or directory: " .. base
      .. "/no-such-folder/opsrun-run-XXXXXX (set TMPDIR to a writable folder)", r.stderr, 1, true)
    assert.not_matches("traceback", r.out)
  end)
end)

describe("no HOME, no OPSRUN_STORE, no XDG_STATE_HOME", function()
  it("fails where the store is needed, rather than put it in a folder every user shares", function()
    local none = {OPSRUN_STORE = false, HOME = false, XDG_STATE_HOME = false}
    local msg = "no place for the state store: HOME is not set (set OPSRUN_STORE, --store or XDG_STATE_HOME)"
    for _, argv in ipairs({{"runs"}, {"deploy", "--repo", graph(), "--env", "a"}}) do
      local r = opsrun(argv, none)
      assert.are.equal(1, r.code, r.out)
      assert.matches(msg, r.stderr, 1, true)
    end
    -- a dry run records nothing and needs none
    assert.are.equal(0, opsrun({"deploy", "--repo", graph(), "--env", "a", "--dry-run"}, none).code)
  end)
end)

describe("opsrun runs, given bad arguments", function()
  it("answers with usage errors that name the argument", function()
    for _, c in ipairs({
      {{"runs", "--limit", "x"}, "--limit needs a whole number of at least 1, not x"},
      {{"runs", "--limit", "0"}, "--limit needs a whole number of at least 1, not 0"},
      {{"runs", "--limit"}, "--limit needs a value"},
      {{"runs", "--limit="}, "--limit needs a value"},
      {{"runs", "--limit=-2"}, "--limit needs a whole number of at least 1, not -2"},
      {{"runs", "--store"}, "--store needs a value"},
      {{"runs", "show"}, "show needs a run ID (opsrun runs lists them)"},
      {{"runs", "show", "-1"}, "show: ID must be a run number, not -1"},
      {{"runs", "show", "1e3"}, "show: ID must be a run number, not 1e3"},
      {{"runs", "show", string.rep("9", 30)}, "show: ID must be a run number, not " .. string.rep("9", 30)},
      {{"runs", "--bogus"}, "unknown argument --bogus"},
    }) do
      local r = opsrun(c[1])
      assert.are.equal(2, r.code, table.concat(c[1], " "))
      assert.matches("^opsrun runs: " .. c[2]:gsub("%p", "%%%0") .. "\nusage: opsrun runs", r.stderr)
      assert.are.equal("", r.stdout)
    end
    -- a store a newer opsrun wrote (its history's schema past what this one knows)
    local newer = base .. "/newer.db"
    assert.are.equal(0, opsrun({"runs", "--store", newer}).code)
    assert(ops.proc.run({"sqlite3", newer, "UPDATE ops_schema_versions SET version = 99 WHERE component = 'ops.deploy'"}))
    for _, argv in ipairs({{"runs", "--store", newer}, {"deploy", "--repo", graph(), "--env", "a", "--store", newer}}) do
      local r = opsrun(argv)
      assert.are.equal(1, r.code, r.out)
      assert.matches("the state store " .. newer .. " cannot be used: ESCHEMA: database 'ops.deploy' schema is at "
        .. "version 99 but only 2 migrations are known; this database was written by a newer opsrun", r.stderr, 1, true)
    end
    local none = opsrun({"runs", "show", "987654"})
    assert.are.equal(1, none.code)
    assert.are.equal("opsrun runs: no run 987654\n", none.stderr)
  end)
end)

describe("a deploy.lua script", function()
  local function script(name, body)
    local path = base .. "/" .. name
    h.write(path, body)
    return path
  end

  it("runs its steps with needs across environments, with their masks, and returns the exit code", function()
    reset_events()
    local path = script("deploy.lua", [[
local repo = ...
return (require("ops.deploy").run{repo = repo, jobs = 2, steps = {
  {id = "b-helm", env = "b", tool = "helm", folder = "helm"},
  {id = "a-terraform", env = "a", tool = "terraform", folder = "terraform", needs = {"b-helm"}},
  {id = "a-helm", env = "a", tool = "helm", folder = "helm", needs = {"a-terraform", "b-helm"}},
}})
]])
    local r = opsrun({path, graph()}, {SAY = "tok-777"})
    assert.are.equal(0, r.code, r.out)
    assert.matches("the token is [masked]", r.out, 1, true)   -- b's bitops.logging.masks
    assert.not_matches("tok%-777", r.out)
    local ev = events()
    assert_before(ev, "end b-helm", "start a-terraform")
    assert_before(ev, "end a-terraform", "start a-helm")
    local _, status = summary(r.stdout)
    assert.are.same({["b-helm"] = "succeeded", ["a-terraform"] = "succeeded", ["a-helm"] = "succeeded"}, status)

    local failing = opsrun({path, graph()}, {FAIL_STEP = "b-helm"})
    assert.are.equal(1, failing.code)
    _, status = summary(failing.stdout)
    assert.are.same({["b-helm"] = "failed", ["a-terraform"] = "not-run", ["a-helm"] = "not-run"}, status)
  end)

  it("holds an environment's lock against another run in the same process", function()
    local release = base .. "/release-same-process"
    local path = script("twice.lua", [[
local repo, release = ...
local deploy = require "ops.deploy"
local function one() return deploy.run{repo = repo, steps = {{id = "a/terraform", env = "a", tool = "terraform", folder = "terraform"}}} end
local first = ops.spawn(one)
while not (io.open(os.getenv("EVENTS")) or io.open("/dev/null")):read("a"):find("start a/terraform", 1, true) do ops.sleep(0.05) end
local second = one()
assert(io.open(release, "w")):close()
local _, code = first:wait()
print("codes " .. code .. " " .. second)
]])
    reset_events()
    h.write(base .. "/events", "")
    local r = opsrun({path, graph(), release}, {WAIT_FOR = release})
    assert.are.equal(0, r.code, r.out)
    assert.matches("codes 0 1\n", r.stdout, 1, true)
    assert.matches("environment 'a' is being deployed by process " .. r.pid, r.stderr, 1, true)
  end)
end)
