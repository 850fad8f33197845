-- Specification of `opsrun serve`, the push-to-deploy receiver, tested from the outside:
-- the server is a child process, deliveries are real payloads (tests/lua/fixtures/webhooks)
-- or payloads built from a git repo made here, signed here and sent with the curl CLI.
local h = require "helpers"
local H = require "serve_harness"
local json = require "ops.json"
local crypto = require "ops.crypto"

local SECRET = "It's a Secret to Everybody"
local ZERO = H.ZERO

local function fixture(path) return assert(h.read(H.FIXTURES .. "/" .. path), path) end

-- A mapper standing in for ops.serve.environments through OPSRUN_PATH (an override, as a
-- repo's .opsrun/ would give one): it records each call, per delivery, in its own SQLite
-- file, and takes SERVE_SLEEP seconds (per hook: SERVE_SLEEP_<HOOK>).
local RECORDING_MAPPER = [[
local store = require "ops.store"
local sys = require "ops.sys"
local time = require "ops.time"
local M = {}
local db
local function record(job, phase)
  db = db or assert(store.open(sys.getenv("SERVE_RECORD")))
  assert(db:exec("CREATE TABLE IF NOT EXISTS calls (hook TEXT, delivery TEXT, commit_id TEXT, phase TEXT, at REAL, batch TEXT)"))
  db:transaction(function()
    for _, d in ipairs(job.deliveries) do
      assert(db:exec("INSERT INTO calls VALUES (?, ?, ?, ?, ?, ?)", job.hook.name, d, job.after, phase, time.now(),
        table.concat(job.deliveries, ",")))
    end
  end)
end
function M.run(job)
  record(job, "start")
  local delay = tonumber(sys.getenv("SERVE_SLEEP_" .. job.hook.name:upper()) or sys.getenv("SERVE_SLEEP") or "0")
  if delay > 0 then require("ops").sleep(delay) end
  record(job, "end")
  return "succeeded"
end
return M
]]

local function recording_env(dir, extra)
  assert(ops.fs.mkdir_p(dir .. "/override/ops/serve"))
  h.write(dir .. "/override/ops/serve/environments.lua", RECORDING_MAPPER)
  local env = {OPSRUN_PATH = dir .. "/override", SERVE_RECORD = dir .. "/record.db", HOOK_SECRET = SECRET}
  for k, v in pairs(extra or {}) do env[k] = v end
  return env
end

local function calls(dir, where, ...)
  if not h.read(dir .. "/record.db") then return {} end
  local ok, rows = pcall(H.query, dir .. "/record.db", "SELECT * FROM calls " .. (where or "") .. " ORDER BY rowid", ...)
  return ok and rows or {}
end

-- the groups a hook deployed, in order: each its deliveries joined by ","
local function groups(dir, hook)
  local out = {}
  for _, r in ipairs(calls(dir, "WHERE hook = ? AND phase = 'start'", hook)) do
    if out[#out] ~= r.batch then out[#out + 1] = r.batch end
  end
  return out
end

-- a repo whose pushes always change something (so the mapper is called): c0 -> c1
local function small_repo(dir)
  local repo = H.repo(dir .. "/repo")
  local c0 = H.commit(repo, {["dev/app.txt"] = "0\n"}, "c0")
  local c1 = H.commit(repo, {["dev/app.txt"] = "1\n"}, "c1")
  return repo, c0, c1
end

describe("opsrun serve", function()
  teardown(H.reap) -- servers a failed test left running
  describe("receiving deliveries", function()
    local dir, srv
    setup(function()
      dir = h.tmpdir()
      h.write(dir .. "/gitlab-token", "gl-token-0123456789\n")
      srv = H.server(dir, string.format([[
max_body: 65536
hooks:
  gh: {provider: github, repo: %s/nothing.git, branch: master, secret_env: HOOK_SECRET}
  gl: {provider: gitlab, repo: %s/nothing.git, branch: master, secret_file: %s/gitlab-token}
  gt: {provider: gitea, repo: %s/nothing.git, branch: master, secret_env: HOOK_SECRET}
  fj: {provider: forgejo, repo: %s/nothing.git, branch: master, secret_env: HOOK_SECRET}
]], dir, dir, dir, dir, dir), {HOOK_SECRET = SECRET})
    end)
    teardown(function()
      if srv then srv.stop() end
      h.rmtree(dir)
    end)

    local function still_fine()
      local status, ans = H.github(srv.hook("gh"), SECRET, fixture("github/octokit-ping-payload.json"), "ping-after", "ping")
      assert.equal(200, status)
      assert.equal("ok", ans.status)
    end

    it("signs as GitHub documents it (openssl and ops.crypto agree on the test vector)", function()
      local r = assert(ops.proc.run({"openssl", "dgst", "-sha256", "-hmac", SECRET, "-r"}, {stdin = "Hello, World!"}))
      local hex = r.stdout:match("^(%x+)")
      assert.equal("757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17", hex)
      assert.equal("sha256=" .. hex, H.sign(SECRET, "Hello, World!"))
    end)

    it("answers a GitHub ping with 200, for each recorded ping payload", function()
      for _, f in ipairs({"github/octokit-ping-payload.json", "github/octokit-ping-with-organization.payload.json",
                          "github/goplayground-ping.json"}) do
        local status, ans = H.github(srv.hook("gh"), SECRET, fixture(f), "ping-" .. f, "ping")
        assert.equal(200, status, f)
        assert.equal("pong", ans.reason)
      end
    end)

    it("queues a signed GitHub push to the hook's branch, durably, before answering 202 with the delivery id", function()
      for i, f in ipairs({"github/octokit-push-with-new-branch.payload.json", "github/goplayground-push.json",
                          "github/octokit-push-with-no-username-committer.payload.json"}) do
        local id = "gh-delivery-" .. i
        local status, ans = H.github(srv.hook("gh"), SECRET, fixture(f), id)
        assert.equal(202, status, f)
        assert.equal("queued", ans.status)
        assert.equal(id, ans.delivery)
        -- on disk at the moment the answer is read
        local row = H.query(srv.store, "SELECT kind, payload FROM ops_queue WHERE key = ?", "gh:" .. id)[1]
        assert.is_table(row)
        assert.equal("push:gh", row.kind)
        local p = json.decode(row.payload)
        assert.equal(json.decode(fixture(f)).after, p.after)
      end
    end)

    it("logs one line per stored batch at info, none per delivery (that one is at debug)", function()
      local f = "github/goplayground-push.json"
      assert.equal(202, (H.github(srv.hook("gh"), SECRET, fixture(f), "log-line-1")))
      local id = H.query(srv.store, "SELECT id FROM ops_queue WHERE key = 'gh:log-line-1'")[1].id
      -- the batch line names the hooks and the queue ids; it is written after the flush
      H.wait("the batch line", function()
        for l in srv.log():gmatch("[^\n]+") do
          if l:find("INFO", 1, true) and l:find("deliver[%a]* queued") and l:find("hooks=gh", 1, true)
            and (l:find("ids=" .. id .. "$") or l:find("%-" .. id .. "$")) then return true end
        end
      end)
      assert.is_nil(srv.log():find("INFO  delivery queued", 1, true), "a per-delivery line at info")
      assert.is_nil(srv.log():find("log-line-1", 1, true), "the delivery id in an info line")
    end)

    it("stores the payload flat_json would write, built without a table per delivery", function()
      local serve = require "ops.serve"
      local keys = {"hook", "delivery", "ref", "before", "after", "created", "deleted", "forced", "received"}
      local a = string.rep("a", 40)
      for _, push in ipairs({
        {delivery = "d-1", ref = "refs/heads/main", before = ZERO, after = a, created = true, deleted = false, forced = false},
        {delivery = 'q"uo\\te', ref = 'refs/heads/we"ird', before = a, after = ZERO, created = false, deleted = true, forced = true},
        {delivery = "x", ref = "refs/heads/m", before = a, after = a}, -- no flags at all
      }) do
        for _, t in ipairs({1763948000.1234567, 12}) do
          local want = {hook = "h-1", received = t}
          for k, v in pairs(push) do want[k] = v end
          local got = serve.push_payload("h-1", push, t)
          assert.equal(serve.flat_json(want, keys), got)
          assert.same(want, json.decode(got))
        end
      end
    end)

    it("ignores, with 202 and a reason, a tag push, a push to another branch and an event it does not handle", function()
      local status, ans = H.github(srv.hook("gh"), SECRET, fixture("github/octokit-push-payload.json"), "tag-1")
      assert.equal(202, status)
      assert.equal("ignored", ans.status)
      assert.matches("refs/tags/simple%-tag", ans.reason)
      local body = H.push_body("refs/heads/feature", ZERO, string.rep("a", 40))
      status, ans = H.github(srv.hook("gh"), SECRET, body, "other-branch")
      assert.equal(202, status)
      assert.equal("ignored", ans.status)
      assert.matches("not refs/heads/master", ans.reason)
      status, ans = H.github(srv.hook("gh"), SECRET, '{"action":"opened"}', "issue-1", "issues")
      assert.equal(202, status)
      assert.matches("event 'issues' is not handled", ans.reason)
      assert.is_nil(H.query(srv.store, "SELECT id FROM ops_queue WHERE key IN ('gh:tag-1', 'gh:other-branch', 'gh:issue-1')")[1])
    end)

    it("acknowledges a redelivery (same delivery id) as a duplicate and does not queue it again", function()
      local body = fixture("github/goplayground-push.json")
      local s1, a1 = H.github(srv.hook("gh"), SECRET, body, "redelivered-1")
      local s2, a2 = H.github(srv.hook("gh"), SECRET, body, "redelivered-1")
      assert.equal(202, s1); assert.equal("queued", a1.status)
      assert.equal(202, s2); assert.equal("duplicate", a2.status)
      assert.equal(a1.id, a2.id)
      local n = H.query(srv.store, "SELECT count(*) AS n FROM ops_queue WHERE key = 'gh:redelivered-1'")[1].n
      assert.equal(1, n)
    end)

    it("verifies GitLab's X-Gitlab-Token and takes X-Gitlab-Event-UUID as the delivery id", function()
      local body = fixture("gitlab/push-event.json")
      local status, ans = H.post(srv.hook("gl"), body, {["X-Gitlab-Token"] = "gl-token-0123456789",
        ["X-Gitlab-Event"] = "Push Hook", ["X-Gitlab-Event-UUID"] = "gl-uuid-1"})
      assert.equal(202, status)
      assert.equal("queued", ans.status)
      assert.equal("gl-uuid-1", ans.delivery)
      status = H.post(srv.hook("gl"), body, {["X-Gitlab-Token"] = "gl-token-wrong", ["X-Gitlab-Event"] = "Push Hook"})
      assert.equal(401, status)
      status, ans = H.post(srv.hook("gl"), body, {["X-Gitlab-Token"] = "gl-token-0123456789", ["X-Gitlab-Event"] = "Tag Push Hook"})
      assert.equal(202, status)
      assert.equal("ignored", ans.status)
    end)

    it("verifies Gitea's X-Gitea-Signature and Forgejo's X-Forgejo-Signature (bare hex)", function()
      local body = fixture("gitea/push-event.json")
      local mac = crypto.hmac_sha256(SECRET, body)
      local status, ans = H.post(srv.hook("gt"), body, {["X-Gitea-Signature"] = mac, ["X-Gitea-Event"] = "push",
        ["X-Gitea-Delivery"] = "gitea-1"})
      assert.equal(202, status)
      assert.equal("gitea-1", ans.delivery)
      status, ans = H.post(srv.hook("fj"), body, {["X-Forgejo-Signature"] = mac, ["X-Forgejo-Event"] = "push",
        ["X-Forgejo-Delivery"] = "forgejo-1"})
      assert.equal(202, status)
      assert.equal("forgejo-1", ans.delivery)
      status = H.post(srv.hook("gt"), body, {["X-Gitea-Signature"] = "sha256=" .. mac, ["X-Gitea-Event"] = "push"})
      assert.equal(401, status)
    end)

    describe("hostile input", function()
      local body = H.push_body("refs/heads/master", ZERO, string.rep("b", 40))

      it("answers an unsigned delivery 401, logs it without the body, and goes on", function()
        local marker = "hostile-body-marker-" .. crypto.random_hex(4)
        local status = H.post(srv.hook("gh"), '{"note":"' .. marker .. '"}', {["X-GitHub-Event"] = "push",
          ["X-GitHub-Delivery"] = "unsigned"})
        assert.equal(401, status)
        H.wait("the rejection in the log", function() return srv.log():find("rejected a delivery", 1, true) end)
        assert.is_nil(srv.log():find(marker, 1, true))
        still_fine()
      end)

      it("answers a wrongly signed delivery 401 (another secret, or the body changed after signing)", function()
        local status = H.post(srv.hook("gh"), body, {["X-GitHub-Event"] = "push", ["X-GitHub-Delivery"] = "w1",
          ["X-Hub-Signature-256"] = H.sign("another secret", body)})
        assert.equal(401, status)
        status = H.post(srv.hook("gh"), body .. " ", {["X-GitHub-Event"] = "push", ["X-GitHub-Delivery"] = "w2",
          ["X-Hub-Signature-256"] = H.sign(SECRET, body)})
        assert.equal(401, status)
        status = H.post(srv.hook("gh"), body, {["X-GitHub-Event"] = "push", ["X-GitHub-Delivery"] = "w3",
          ["X-Hub-Signature-256"] = "sha256=zz"})
        assert.equal(401, status)
        still_fine()
      end)

      it("answers a body over max_body 413 and goes on", function()
        local big = '{"pad":"' .. string.rep("x", 70000) .. '"}'
        local status = H.github(srv.hook("gh"), SECRET, big, "too-big")
        assert.equal(413, status)
        still_fine()
      end)

      it("answers signed bodies that are not push payloads 400", function()
        for i, bad in ipairs({"{not json", "[1,2]", '{"ref":"refs/heads/master"}',
            H.push_body("refs/heads/master", "xyz", string.rep("b", 40))}) do
          local status, ans = H.github(srv.hook("gh"), SECRET, bad, "malformed-" .. i)
          assert.equal(400, status, bad)
          assert.equal("error", ans.status)
        end
        still_fine()
      end)

      it("answers a ref or payload paths with .. 400", function()
        local status = H.github(srv.hook("gh"), SECRET, H.push_body("refs/heads/../../etc", ZERO, string.rep("b", 40)), "dots-1")
        assert.equal(400, status)
        local evil = H.push_body("refs/heads/master", ZERO, string.rep("b", 40), {commits = {
          {id = string.rep("b", 40), added = {"dev/../../../etc/passwd"}, modified = {}, removed = {}}}})
        status = H.github(srv.hook("gh"), SECRET, evil, "dots-2")
        assert.equal(400, status)
        evil = H.push_body("refs/heads/master", ZERO, string.rep("b", 40), {commits = {
          {id = string.rep("b", 40), added = {}, modified = {"/etc/passwd"}, removed = {}}}})
        status = H.github(srv.hook("gh"), SECRET, evil, "dots-3")
        assert.equal(400, status)
        assert.is_nil(H.query(srv.store, "SELECT id FROM ops_queue WHERE key LIKE 'gh:dots-%'")[1])
        still_fine()
      end)

      it("answers an unknown hook 404, a GET on a hook 405, a push without a delivery id 400", function()
        assert.equal(404, (H.github(srv.url .. "/hooks/nope", SECRET, body, "x")))
        assert.equal(404, (H.github(srv.url .. "/hooks/..", SECRET, body, "x")))
        assert.equal(404, (H.curl({srv.url .. "/"})))
        assert.equal(405, (H.curl({srv.hook("gh")})))
        local status = H.post(srv.hook("gh"), body, {["X-GitHub-Event"] = "push", ["X-Hub-Signature-256"] = H.sign(SECRET, body)})
        assert.equal(400, status)
        still_fine()
      end)

      it("never writes a secret to its log", function()
        local log = srv.log()
        assert.is_nil(log:find(SECRET, 1, true))
        assert.is_nil(log:find("gl-token-0123456789", 1, true))
      end)
    end)
  end)

  describe("deploying what a push changed (environments mapper, real git, real opsrun deploy)", function()
    local dir, srv, repo, c = nil, nil, nil, {}
    local n = 0
    local HOOK = [[
#!/bin/sh
echo "$BITOPS_ENVIRONMENT $(git -C "$OPSRUN_REPO" rev-parse HEAD) $OPSRUN_DELIVERY" >> "$MARK_DIR/marks"
]]
    local function env_files(env)
      return {
        [env .. "/ansible/bitops.config.yaml"] = "ansible:\n  options:\n    skip-deploy: true\n",
        [env .. "/ansible/bitops.before-deploy.d/01-mark.sh"] = HOOK,
        [env .. "/ansible/app.txt"] = env .. " v1\n",
      }
    end
    local PLAYBOOK = [[
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - ansible.builtin.copy:
        dest: "{{ lookup('env', 'MARK_DIR') }}/lab-{{ lookup('env', 'OPSRUN_DELIVERY') }}"
        content: "deployed by ansible\n"
]]

    -- sends a push, waits for its outcome; returns outcome, {env = commit} deployed by it
    local function push(body_or_args, expect_answer)
      n = n + 1
      local id = "push-" .. n
      local body = type(body_or_args) == "string" and body_or_args or H.push_body(table.unpack(body_or_args))
      local status, ans = H.github(srv.hook("ops"), SECRET, body, id)
      assert.equal(202, status)
      assert.equal(expect_answer or "queued", ans.status)
      if (expect_answer or "queued") ~= "queued" then return nil, {} end
      local outcome = H.outcome(srv.store, id, 60)
      local envs = {}
      for line in (h.read(dir .. "/marks") or ""):gmatch("[^\n]+") do
        local env, commit, delivery = line:match("^(%S+) (%S+) (%S+)$")
        if delivery and (delivery == id or delivery:find(id .. ",", 1, true) or delivery:find("," .. id, 1, true)) then
          envs[env] = commit
        end
      end
      return outcome, envs, id
    end
    local function names(envs)
      local out = {}
      for e in pairs(envs) do out[#out + 1] = e end
      table.sort(out)
      return table.concat(out, ",")
    end

    setup(function()
      dir = h.tmpdir()
      repo = H.repo(dir .. "/repo")
      local files = {["README.md"] = "ops\n", ["_default/ansible/vars.yml"] = "x: 1\n",
        ["lab/ansible/bitops.config.yaml"] = "ansible:\n  cli:\n    extra-vars: \"a=1\"\n",
        ["lab/ansible/playbook.yaml"] = PLAYBOOK}
      for _, e in ipairs({"dev", "staging", "prod"}) do
        for k, v in pairs(env_files(e)) do files[k] = v end
      end
      c[1] = H.commit(repo, files, "c1: three environments and a lab")
      srv = H.server(dir, string.format([[
hooks:
  ops: {provider: github, repo: %s, branch: main, secret_env: HOOK_SECRET}
]], repo), {HOOK_SECRET = SECRET, MARK_DIR = dir})
    end)
    teardown(function()
      if srv then srv.stop() end
      h.rmtree(dir)
    end)

    it("deploys every environment on a new branch (before all zeros), at the pushed commit", function()
      local out, envs, id = push({"refs/heads/main", ZERO, c[1], {created = true}})
      assert.equal("succeeded", out.status)
      assert.equal("dev,prod,staging", names(envs))
      for _, commit in pairs(envs) do assert.equal(c[1], commit) end
      assert.equal("deployed by ansible\n", h.read(dir .. "/lab-" .. id)) -- a real ansible-playbook run
      -- the run is in the history, linked to the delivery and the commit
      local run = H.query(srv.store, "SELECT * FROM runs WHERE id = ?", out.run_id)[1]
      assert.equal("serve", run.trigger)
      assert.equal(id, run.delivery)
      assert.equal(c[1], run.revision)
      assert.equal("dev,lab,prod,staging", run.envs)
      assert.equal("succeeded", run.status)
    end)

    it("finds the changed files with git diff, not from the payload's (capped) commit list", function()
      c[2] = H.commit(repo, {["dev/ansible/app.txt"] = "dev v2\n"}, "c2: modify dev")
      c[3] = H.commit(repo, {["staging/ansible/new.txt"] = "new\n"}, "c3: add to staging")
      c[4] = H.commit(repo, {["prod/ansible/app.txt"] = false}, "c4: remove from prod")
      -- the payload names only the last commit, as a capped list would
      local out, envs = push({"refs/heads/main", c[1], c[4], {commits = {
        {id = c[4], added = {}, modified = {}, removed = {"prod/ansible/app.txt"}}}}})
      assert.equal("succeeded", out.status)
      assert.equal("dev,prod,staging", names(envs))
      assert.equal(c[4], envs.dev)
    end)

    it("deploys nothing for a change outside the environments", function()
      c[5] = H.commit(repo, {["README.md"] = "ops, documented\n"}, "c5: readme")
      local out, envs = push({"refs/heads/main", c[4], c[5]})
      assert.equal("nothing", out.status)
      assert.is_nil(out.run_id)
      assert.equal("", names(envs))
    end)

    it("deploys every environment for a change under _default", function()
      c[6] = H.commit(repo, {["_default/ansible/vars.yml"] = "x: 2\n"}, "c6: default")
      local out, envs = push({"refs/heads/main", c[5], c[6]})
      assert.equal("succeeded", out.status)
      assert.equal("dev,prod,staging", names(envs))
    end)

    it("after a forced push, deploys what differs between the replaced commit and the new one", function()
      c[7] = H.commit(repo, {["dev/ansible/app.txt"] = "dev v3\n"}, "c7: dev")
      local _, envs = push({"refs/heads/main", c[6], c[7]})
      assert.equal("dev", names(envs))
      -- rewrite c7: the dev change is dropped, staging changes instead
      H.git(repo, "reset", "-q", "--hard", c[6])
      c[8] = H.commit(repo, {["staging/ansible/app.txt"] = "staging v2\n"}, "c7': staging instead")
      local out
      out, envs = push({"refs/heads/main", c[7], c[8], {forced = true}})
      assert.equal("succeeded", out.status)
      assert.equal("dev,staging", names(envs)) -- dev goes back to v2, staging gets v2
      assert.equal(c[8], envs.dev)
    end)

    it("deploys every environment after a forced push whose previous commit it has never seen", function()
      local out, envs = push({"refs/heads/main", string.rep("e", 40), c[8], {forced = true}})
      assert.equal("succeeded", out.status)
      assert.equal("dev,prod,staging", names(envs))
    end)

    it("deploys nothing when the branch is deleted", function()
      local out, envs = push({"refs/heads/main", c[8], ZERO, {deleted = true}})
      assert.equal("deleted", out.status)
      assert.equal("", names(envs))
    end)

    it("ignores a push to another branch, even a new one", function()
      H.git(repo, "branch", "feature", c[8])
      local out, envs = push({"refs/heads/feature", ZERO, c[8], {created = true}}, "ignored")
      assert.is_nil(out)
      assert.equal("", names(envs))
    end)

    it("does not roll back for a late delivery of a push it has already gone past", function()
      local out, envs = push({"refs/heads/main", c[1], c[2]})
      assert.equal("stale", out.status)
      assert.equal("", names(envs))
    end)

    it("does not deploy an environment whose folder the push removed", function()
      c[9] = H.commit(repo, {["staging"] = false}, "c9: staging is gone")
      local out, envs = push({"refs/heads/main", c[8], c[9]})
      assert.equal("nothing", out.status)
      assert.equal("", names(envs))
    end)

    it("records every delivery's outcome, shown by opsrun serve status and opsrun runs", function()
      local r = assert(ops.proc.run({h.opsrun, "serve", "status", "--config", srv.config, "--listen", srv.address},
        {env = {OPSRUN_STORE = srv.store}}))
      assert.equal(0, r.code, r.stderr)
      assert.matches("server: " .. srv.address:gsub("%p", "%%%0") .. " answers 200", r.stdout)
      assert.matches("deliveries: 0 waiting, 0 being deployed, %d+ done, 0 dead", r.stdout)
      assert.matches("push%-1 +succeeded +commit " .. c[1]:sub(1, 12) .. "  run %d+", r.stdout)
      assert.matches("push%-%d+ +stale", r.stdout)
      assert.matches("hook ops: last processed commit " .. c[9], r.stdout)
      r = assert(ops.proc.run({h.opsrun, "runs", "--store", srv.store}))
      assert.equal(0, r.code)
      assert.matches("succeeded .* dev,lab,prod,staging", r.stdout)
    end)

    it("reports health and metrics: deliveries by outcome, queue depth, runs by status, durations", function()
      local status, text = H.curl({srv.url .. "/healthz"})
      assert.equal(200, status)
      local health = json.decode(text)
      assert.equal("ok", health.status)
      assert.equal("ok", health.store)
      assert.equal("idle", health.workers.ops)
      local queued, metrics = H.metric(srv, 'opsrun_deliveries_total{outcome="queued"}')
      assert.equal(n - 1, queued) -- every push but the ignored one
      assert.equal(1, H.metric(srv, 'opsrun_deliveries_total{outcome="ignored"}'))
      assert.equal(0, H.metric(srv, "opsrun_queue_depth"))
      assert.equal(n - 1, H.metric(srv, 'opsrun_queue_items{state="done"}'))
      assert.equal(6, H.metric(srv, 'opsrun_runs_total{status="succeeded"}'))
      assert.equal(6, H.metric(srv, "opsrun_run_duration_seconds_count"))
      assert.equal(6, H.metric(srv, 'opsrun_run_duration_seconds_bucket{le="%+Inf"}'))
      assert.equal(1, H.metric(srv, 'opsrun_pushes_total{outcome="stale"}'))
      assert.matches("# TYPE opsrun_run_duration_seconds histogram", metrics)
      -- the deliveries' transactions: at least one, at most one per delivery, each taking time
      local commits = H.metric(srv, "opsrun_delivery_commits_total")
      assert.is_true(commits >= 1 and commits <= n - 1, "commits: " .. tostring(commits))
      local function seconds(pattern) return tonumber(metrics:match("\n" .. pattern .. " ([%d.]+)\n")) end
      assert.is_true(seconds("opsrun_delivery_commit_seconds_total") > 0)
      -- the store's batches: those commits and the workers' bookkeeping, each durable one flushed
      assert.is_true(H.metric(srv, "opsrun_store_batches_total") >= commits)
      for _, phase in ipairs({"waiting", "committing", "flushing", "returning"}) do
        local v = seconds('opsrun_store_batch_seconds_total{phase="' .. phase .. '"}')
        assert.is_true(v and v >= 0, phase)
      end
      assert.is_true(seconds('opsrun_store_batch_seconds_total{phase="flushing"}') > 0)
    end)
  end)

  describe("serialising and coalescing", function()
    -- a server with hooks a and b on one repo, whose deploys take a second (unless env
    -- says otherwise), and more settings (YAML lines); -> dir, srv, body
    local function two_hooks(jobs, settings, env)
      local dir = h.tmpdir()
      local repo, c0, c1 = small_repo(dir)
      local sleeps = {SERVE_SLEEP = "1"}
      for k, v in pairs(env or {}) do sleeps[k] = v end
      local srv = H.server(dir, string.format([[
jobs: %d
%s
hooks:
  a: {repo: %s, branch: main, secret_env: HOOK_SECRET}
  b: {repo: %s, branch: main, secret_env: HOOK_SECRET}
]], jobs, settings or "", repo, repo), recording_env(dir, sleeps))
      return dir, srv, H.push_body("refs/heads/main", c0, c1)
    end

    it("never overlaps two deploys of one target, overlaps different targets, and coalesces what waits", function()
      local dir, srv, body = two_hooks(2)
      assert.equal(202, (H.github(srv.hook("a"), SECRET, body, "a1")))
      assert.equal(202, (H.github(srv.hook("b"), SECRET, body, "b1")))
      H.wait("a1 to start", function() return calls(dir, "WHERE delivery = 'a1'")[1] end)
      for _, id in ipairs({"a2", "a3", "a4"}) do
        assert.equal(202, (H.github(srv.hook("a"), SECRET, body, id)))
      end
      H.wait("a4 to end", function() return calls(dir, "WHERE delivery = 'a4' AND phase = 'end'")[1] end, 30)
      H.wait("b1 to end", function() return calls(dir, "WHERE delivery = 'b1' AND phase = 'end'")[1] end, 30)
      srv.stop()
      local runs = {}
      for _, r in ipairs(calls(dir)) do
        local key = r.hook .. ":" .. r.batch
        if not runs[key] then runs[key] = {hook = r.hook, batch = r.batch}; runs[#runs + 1] = runs[key] end
        runs[key][r.phase] = r.at
      end
      local a = {}
      for _, r in ipairs(runs) do if r.hook == "a" then a[#a + 1] = r end end
      -- a1 alone, then a2..a4 together: they waited while a1 ran
      assert.equal(2, #a)
      assert.equal("a1", a[1].batch)
      assert.equal("a2,a3,a4", a[2].batch)
      assert.is_true(a[2].start >= a[1]["end"], "two deploys of target a overlapped")
      local b = runs["b:b1"]
      assert.is_true(b.start < a[1]["end"] and a[1].start < b["end"], "targets a and b did not deploy at once")
      h.rmtree(dir)
    end)

    it("with coalesce, claims a busy hook's next group only that many seconds after its last", function()
      local dir = h.tmpdir()
      local repo, c0, c1 = small_repo(dir)
      local srv = H.server(dir, string.format("coalesce: 3\nhooks:\n  ops: {repo: %s, branch: main, secret_env: HOOK_SECRET}\n",
        repo), recording_env(dir))
      local body = H.push_body("refs/heads/main", c0, c1)
      -- an idle hook's push is deployed at once, alone
      assert.equal(202, (H.github(srv.hook("ops"), SECRET, body, "p1")))
      H.wait("p1 to end", function() return calls(dir, "WHERE delivery = 'p1' AND phase = 'end'")[1] end, 30)
      -- the next ones, sent apart within the window after it, go into one group
      assert.equal(202, (H.github(srv.hook("ops"), SECRET, body, "p2")))
      ops.sleep(0.5)
      assert.equal(202, (H.github(srv.hook("ops"), SECRET, body, "p3")))
      H.wait("p3 to end", function() return calls(dir, "WHERE delivery = 'p3' AND phase = 'end'")[1] end, 30)
      srv.stop()
      assert.same({"p1", "p2,p3"}, groups(dir, "ops"))
      h.rmtree(dir)
    end)

    it("claims again at once after a full group whatever coalesce says, and ends its pause on SIGTERM", function()
      local dir, srv, body = two_hooks(1, "coalesce: 60\ndrain: 5", {SERVE_SLEEP_A = "0", SERVE_SLEEP_B = "3"})
      assert.equal(202, (H.github(srv.hook("b"), SECRET, body, "b1")))
      H.wait("b1 to start", function() return calls(dir, "WHERE delivery = 'b1'")[1] end)
      -- while b's deploy holds the only slot, 150 deliveries for a (over real HTTP, at once)
      local sig, sent = H.sign(SECRET, body), {}
      for i = 1, 150 do
        sent[i] = ops.spawn(function()
          local r = assert(ops.http.request({method = "POST", url = srv.hook("a"), body = body, timeout = 30,
            headers = {["content-type"] = "application/json", ["x-github-event"] = "push",
              ["x-github-delivery"] = "a" .. i, ["x-hub-signature-256"] = sig}}))
          return r.status
        end)
      end
      for i = 1, 150 do
        local ok, status = sent[i]:wait(30)
        assert.is_true(ok)
        assert.equal(202, status)
      end
      assert.is_nil(calls(dir, "WHERE hook = 'a'")[1], "a deployed while b held the slot")
      -- a then takes a full group (100) and the other 50 at once: not 60 s later
      H.wait("a150 to end", function() return calls(dir, "WHERE delivery = 'a150' AND phase = 'end'")[1] end, 30)
      local a = groups(dir, "a")
      assert.equal(2, #a)
      local _, first = a[1]:gsub(",", "")
      local _, second = a[2]:gsub(",", "")
      assert.same({100, 50}, {first + 1, second + 1})
      -- both workers now pause for 60 s (b after b1, a after its 50): SIGTERM ends that
      local r = srv.stop()
      assert.equal(0, r.code)
      assert.is_nil(srv.log():find("handed back unfinished work", 1, true))
      h.rmtree(dir)
    end)

    it("hands the deploy slot to a hook waiting for it before a busy hook's next group (jobs: 1)", function()
      local dir, srv, body = two_hooks(1)
      assert.equal(202, (H.github(srv.hook("a"), SECRET, body, "a1")))
      H.wait("a1 to start", function() return calls(dir, "WHERE delivery = 'a1'")[1] end)
      assert.equal(202, (H.github(srv.hook("b"), SECRET, body, "b1")))
      assert.equal(202, (H.github(srv.hook("a"), SECRET, body, "a2")))
      H.wait("a2 to end", function() return calls(dir, "WHERE delivery = 'a2' AND phase = 'end'")[1] end, 30)
      srv.stop()
      local start = {}
      for _, r in ipairs(calls(dir, "WHERE phase = 'start'")) do start[r.delivery] = r.at end
      assert.is_truthy(start.b1, "b1 was never deployed")
      -- b was waiting for the slot when a1 ended: a does not keep it for a2
      assert.is_true(start.b1 < start.a2, "a's next group went before the hook waiting for the slot")
      h.rmtree(dir)
    end)
  end)

  describe("the workers' bookkeeping", function()
    it("completes a group in one statement, and logs each delivery whose lease was lost meanwhile", function()
      local dir = h.tmpdir()
      local repo, c0, c1 = small_repo(dir)
      local srv = H.server(dir, string.format("hooks:\n  ops: {repo: %s, branch: main, secret_env: HOOK_SECRET}\n", repo),
        recording_env(dir, {SERVE_SLEEP = "1.5", OPSRUN_LOG_LEVEL = "debug"}))
      local body = H.push_body("refs/heads/main", c0, c1)
      assert.equal(202, (H.github(srv.hook("ops"), SECRET, body, "first")))
      H.wait("first to start", function() return calls(dir, "WHERE delivery = 'first'")[1] end)
      assert.equal(202, (H.github(srv.hook("ops"), SECRET, body, "kept")))
      assert.equal(202, (H.github(srv.hook("ops"), SECRET, body, "stolen")))
      H.wait("the group to start", function() return calls(dir, "WHERE delivery = 'stolen'")[1] end, 30)
      assert.equal("kept,stolen", calls(dir, "WHERE delivery = 'stolen'")[1].batch)
      -- meanwhile another process takes 'stolen', as it would once the lease ran out
      local stolen = H.query(srv.store, "SELECT id FROM ops_queue WHERE key = 'ops:stolen'")[1].id
      do
        local db <close> = assert(require("ops.store").open(srv.store))
        assert.equal(1, db:exec("UPDATE ops_queue SET worker = 'elsewhere:1:0:ops' WHERE id = ?", stolen))
      end
      assert.equal("succeeded", H.outcome(srv.store, "kept", 30).status)
      local lost = H.wait("the lost lease in the log", function()
        for l in srv.log():gmatch("[^\n]+") do
          if l:find("lease was lost before it was marked done", 1, true) then return l end
        end
      end)
      assert.matches("id=" .. stolen .. "$", lost)
      local row = H.query(srv.store, "SELECT state, worker FROM ops_queue WHERE id = ?", stolen)[1]
      assert.same({state = "leased", worker = "elsewhere:1:0:ops"}, row)
      assert.is_nil(H.query(srv.store, "SELECT * FROM serve_outcomes WHERE delivery = 'stolen'")[1])
      assert.equal("done", H.query(srv.store, "SELECT state FROM ops_queue WHERE key = 'ops:kept'")[1].state)
      -- at debug level, each delivery has its own line
      assert.matches("delivery queued  .*delivery=kept", srv.log())
      srv.stop()
      h.rmtree(dir)
    end)
    it("leases a group before its deploy runs, and marks a group that moves nothing done without a lease", function()
      local dir = h.tmpdir()
      local repo, c0, c1 = small_repo(dir)
      local srv = H.server(dir, string.format("hooks:\n  ops: {repo: %s, branch: main, secret_env: HOOK_SECRET}\n", repo),
        recording_env(dir, {SERVE_SLEEP = "1.5"}))
      local function row(delivery)
        return H.query(srv.store, "SELECT state, attempts, worker FROM ops_queue WHERE key = ?", "ops:" .. delivery)[1]
      end
      assert.equal(202, (H.github(srv.hook("ops"), SECRET, H.push_body("refs/heads/main", c0, c1), "moves")))
      H.wait("the deploy to start", function() return calls(dir, "WHERE delivery = 'moves'")[1] end)
      local during = row("moves")
      assert.same({"leased", 1}, {during.state, during.attempts})
      assert.matches(":ops$", during.worker)
      assert.equal("succeeded", H.outcome(srv.store, "moves", 30).status)
      -- pushed again (a replay): before == after on the commit processed, nothing to fetch
      assert.equal(202, (H.github(srv.hook("ops"), SECRET, H.push_body("refs/heads/main", c1, c1), "still")))
      assert.equal("nothing", H.outcome(srv.store, "still", 30).status)
      assert.same({state = "done", attempts = 0, worker = during.worker}, row("still"))
      assert.same({state = "done", attempts = 1, worker = during.worker}, row("moves"))
      assert.equal(1, #calls(dir, "WHERE phase = 'start'")) -- one deploy: the first push
      srv.stop()
      h.rmtree(dir)
    end)
  end)

  describe("the outcomes", function()
    it("hold each delivery id as its stored payload has it (quotes, backslashes, UTF-8, other bytes)", function()
      local dir = h.tmpdir()
      local repo, c0, c1 = small_repo(dir)
      local srv = H.server(dir, string.format("hooks:\n  ops: {repo: %s, branch: main, secret_env: HOOK_SECRET}\n", repo),
        recording_env(dir))
      local body = H.push_body("refs/heads/main", c0, c1)
      local ids = {'q"uote', "back\\slash", '\\"both\\"', "\u{fc}n\u{ef}-c\u{f6}d\u{e9}", "bytes-\255\254", "{\"x\":1}", "plain-1"}
      for _, d in ipairs(ids) do assert.equal(202, (H.github(srv.hook("ops"), SECRET, body, d))) end
      for _, d in ipairs(ids) do
        local row = H.outcome(srv.store, d, 30)
        local q = H.query(srv.store, "SELECT json_extract(payload, '$.delivery') AS d, key FROM ops_queue WHERE id = ?", row.id)[1]
        assert.same({d, "ops:" .. d, "ops"}, {q.d, q.key, row.hook})
      end
      assert.equal(#ids, H.query(srv.store, "SELECT count(*) AS n FROM serve_outcomes")[1].n)
      srv.stop()
      h.rmtree(dir)
    end)
  end)

  describe("a flood of bad deliveries", function()
    it("is logged a few lines per hook and window, says how many it held back, and is counted whole", function()
      local dir = h.tmpdir()
      local srv = H.server(dir, string.format([[
log_limit: 3
log_window: 1
hooks:
  gh: {provider: github, repo: %s/nothing.git, branch: master, secret_env: HOOK_SECRET}
]], dir), {HOOK_SECRET = SECRET})
      local ok, err = pcall(function()
        local function lines(pattern)
          local n = 0
          for _ in srv.log():gmatch(pattern) do n = n + 1 end
          return n
        end
        for i = 1, 8 do
          assert.equal(401, (H.post(srv.hook("gh"), "{}", {["X-GitHub-Event"] = "push", ["X-GitHub-Delivery"] = "u" .. i})))
        end
        for i = 1, 6 do -- a different name each time: still one window
          assert.equal(404, (H.post(srv.hook("nope-" .. i .. string.rep("x", 100)), "{}", {})))
        end
        -- the metrics count every one
        assert.equal(8, H.metric(srv, 'opsrun_deliveries_total{outcome="rejected"}'))
        assert.equal(6, H.metric(srv, 'opsrun_deliveries_total{outcome="unknown_hook"}'))
        assert.equal(3, lines("rejected a delivery"))
        assert.equal(3, lines("a delivery for a hook that is not configured"))
        assert.is_nil(srv.log():find(string.rep("x", 65), 1, true), "a long unknown name is shortened in the log")
        -- a new window: the first line says how many were held back
        ops.sleep(1.1)
        assert.equal(401, (H.post(srv.hook("gh"), "{}", {["X-GitHub-Event"] = "push", ["X-GitHub-Delivery"] = "u9"})))
        H.wait("the next line", function() return lines("rejected a delivery") == 4 end)
        assert.matches("rejected a delivery[^\n]*suppressed=5", srv.log())
        -- signed deliveries are never held back
        assert.equal(200, (H.github(srv.hook("gh"), SECRET, fixture("github/octokit-ping-payload.json"), "ping-flood", "ping")))
      end)
      srv.stop()
      h.rmtree(dir)
      assert(ok, err)
    end)
  end)

  describe("the store's WAL", function()
    it("is checkpointed by the delivery writer, on the thread pool, so it stays small", function()
      local serve = require "ops.serve"
      local config = require "ops.serve.config"
      local log = require "ops.log"
      local dir = h.tmpdir()
      local repo, c0 = small_repo(dir)
      h.write(dir .. "/secret", SECRET .. "\n")
      h.write(dir .. "/serve.yaml", string.format(
        "listen: 127.0.0.1:0\nstore: %s/state/opsrun.db\nhooks:\n  ops: {repo: %s, branch: main, secret_file: %s/secret}\n",
        dir, repo, dir))
      local saved, quiet = serve.CHECKPOINT_FRAMES, log.enabled("info")
      serve.CHECKPOINT_FRAMES = 20
      log.set_level("warn")
      local ok, err = pcall(function()
        local ctx = serve.start(config.load(dir .. "/serve.yaml"))
        local url = "http://" .. ctx.server.address .. "/hooks/ops"
        local body = H.push_body("refs/heads/main", c0, c0)
        local most, counted = 0, 0
        for i = 1, 40 do
          assert.equal(202, (H.github(url, SECRET, body, "wal-" .. i)))
          local frames = ctx.db:wal_frames()
          if frames > 0 then counted = counted + 1 end
          most = math.max(most, frames)
        end
        H.wait("the workers", function() return H.queue_counts(ctx.settings.store).done == 40 end)
        serve.stop(ctx)
        -- each delivery writes about ten pages (queue, claim, outcome): 400 frames without a checkpoint
        assert.is_true(counted > 0, "the WAL's frames were not counted")
        assert.is_true(most < 100, "the WAL grew to " .. most .. " frames")
      end)
      serve.CHECKPOINT_FRAMES = saved
      if quiet then log.set_level("info") end
      h.rmtree(dir)
      assert(ok, err)
    end)
  end)

  describe("lifecycle", function()
    it("reloads the config on SIGHUP: a hook's new secret takes over from the old", function()
      local dir = h.tmpdir()
      local repo, c0, c1 = small_repo(dir)
      h.write(dir .. "/secret", "old-secret-0123\n")
      local srv = H.server(dir, string.format([[
hooks:
  ops: {repo: %s, branch: main, secret_file: %s/secret}
]], repo, dir), recording_env(dir))
      local body = H.push_body("refs/heads/main", c0, c1)
      assert.equal(202, (H.github(srv.hook("ops"), "old-secret-0123", body, "h1")))
      h.write(dir .. "/secret", "new-secret-4567\n")
      srv.kill("SIGHUP")
      H.wait("the reload", function() return srv.log():find("config reloaded", 1, true) end)
      assert.equal(401, (H.github(srv.hook("ops"), "old-secret-0123", body, "h2")))
      assert.equal(202, (H.github(srv.hook("ops"), "new-secret-4567", body, "h3")))
      -- a config that does not load keeps the previous one
      h.write(dir .. "/secret", "")
      srv.kill("SIGHUP")
      H.wait("the refused reload", function() return srv.log():find("config not reloaded", 1, true) end)
      assert.matches("secret_file is empty", srv.log())
      assert.equal(202, (H.github(srv.hook("ops"), "new-secret-4567", body, "h4")))
      local r = srv.stop()
      assert.equal(0, r.code)
      h.rmtree(dir)
    end)

    it("drains on SIGTERM: the deploy in flight finishes, nothing new is accepted, exit 0", function()
      local dir = h.tmpdir()
      local repo, c0, c1 = small_repo(dir)
      local srv = H.server(dir, string.format([[
drain: 20
hooks:
  ops: {repo: %s, branch: main, secret_env: HOOK_SECRET}
]], repo), recording_env(dir, {SERVE_SLEEP = "1.5"}))
      assert.equal(202, (H.github(srv.hook("ops"), SECRET, H.push_body("refs/heads/main", c0, c1), "t1")))
      H.wait("t1 to start", function() return calls(dir, "WHERE delivery = 't1'")[1] end)
      local r = srv.stop("SIGTERM")
      assert.equal(0, r.code)
      assert.equal(1, #calls(dir, "WHERE delivery = 't1' AND phase = 'end'"))
      assert.equal(1, H.queue_counts(srv.store).done)
      h.rmtree(dir)
    end)

    it("hands back a delivery still in flight at the drain deadline; the next start deploys it", function()
      local dir = h.tmpdir()
      local repo, c0, c1 = small_repo(dir)
      local cfg = string.format([[
drain: 0.5
hooks:
  ops: {repo: %s, branch: main, secret_env: HOOK_SECRET}
]], repo)
      local srv = H.server(dir, cfg, recording_env(dir, {SERVE_SLEEP = "30"}))
      assert.equal(202, (H.github(srv.hook("ops"), SECRET, H.push_body("refs/heads/main", c0, c1), "late-1")))
      H.wait("late-1 to start", function() return calls(dir, "WHERE delivery = 'late-1'")[1] end)
      local t0 = ops.time.monotonic()
      local r = srv.stop("SIGTERM")
      assert.equal(0, r.code)
      assert.is_true(ops.time.monotonic() - t0 < 10, "the drain took longer than its deadline")
      assert.matches("handed back unfinished work", srv.log())
      assert.equal(0, #calls(dir, "WHERE phase = 'end'"))
      assert.equal(1, H.queue_counts(srv.store).leased)
      srv = H.server(dir, nil, recording_env(dir, {SERVE_SLEEP = "0"}))
      local out = H.outcome(srv.store, "late-1")
      assert.equal("succeeded", out.status)
      assert.equal(1, #calls(dir, "WHERE delivery = 'late-1' AND phase = 'end'"))
      assert.equal(0, srv.stop().code)
      h.rmtree(dir)
    end)

    it("refuses to start with a config error that names the file, the key and the fix", function()
      local dir = h.tmpdir()
      h.write(dir .. "/serve.yaml", "hooks:\n  ops: {repo: /x, secret_env: NOT_SET_ANYWHERE, secert: 1}\n")
      local r = h.run_opsrun({"serve", "--config", dir .. "/serve.yaml"})
      assert.equal(1, r.code)
      assert.matches("serve.yaml: hooks.ops.secert is not a setting %(known: provider, repo", r.stderr)
      h.write(dir .. "/serve.yaml", "hooks:\n  ops: {repo: /x, secret_env: NOT_SET_ANYWHERE}\n")
      r = h.run_opsrun({"serve", "--config", dir .. "/serve.yaml"})
      assert.matches("hooks.ops.secret_env names NOT_SET_ANYWHERE, which is not set", r.stderr)
      h.write(dir .. "/serve.yaml", "hooks:\n  ops: {repo: /x, secret: hunter2hunter2}\n")
      r = h.run_opsrun({"serve", "--config", dir .. "/serve.yaml"})
      assert.matches("hooks.ops.secret must not be written in the config", r.stderr)
      assert.is_nil(r.stderr:find("hunter2hunter2", 1, true))
      for _, case in ipairs({
        {"coalesce: -1", "coalesce .*must be a number of at least 0 and at most 3600, not %-1"},
        {"coalesce: 4000", "coalesce .*must be a number of at least 0 and at most 3600, not 4000"},
        {"coalesce: .inf", "coalesce .*must be a number of at least 0 and at most 3600, not inf"},
        {"coalesce: 1e400", "coalesce .*must be a number of at least 0 and at most 3600"},
        {"drain: .nan", "drain .*must be a number of at least 0, not"},
        {"lease: .inf", "lease .*must be a number of at least 5, not"},
      }) do
        h.write(dir .. "/serve.yaml", case[1] .. "\nhooks:\n  ops: {repo: /x, secret_env: HOME}\n")
        r = h.run_opsrun({"serve", "--config", dir .. "/serve.yaml"})
        assert.equal(1, r.code, case[1])
        assert.matches("serve.yaml: " .. case[2], r.stderr)
      end
      h.rmtree(dir)
    end)
  end)
end)
