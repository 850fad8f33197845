-- Durability of `opsrun serve`: 500 signed deliveries, the server killed with SIGKILL in
-- the middle of them, then started again. Every delivery answered 202 is deployed, and
-- deployed once; a delivery that got no answer is not lost: the sender's retry is either
-- queued or recognised as a duplicate of the one that reached the disk before the kill.
-- The deploy is a recording mapper (an OPSRUN_PATH override of ops.serve.environments)
-- writing each delivery it deploys to its own SQLite file, committed (fsync'd) per call.
local h = require "helpers"
local H = require "serve_harness"

local SECRET = "durability-secret-0123"
local TOTAL = 500
local KILL_AFTER = 250 -- 202 answers seen before the SIGKILL

local RECORDING_MAPPER = [[
local store = require "ops.store"
local sys = require "ops.sys"
local M = {}
local db
function M.run(job)
  db = db or assert(store.open(sys.getenv("SERVE_RECORD")))
  assert(db:exec("CREATE TABLE IF NOT EXISTS deployed (delivery TEXT NOT NULL, pid INTEGER NOT NULL)"))
  db:transaction(function()
    for _, d in ipairs(job.deliveries) do assert(db:exec("INSERT INTO deployed VALUES (?, ?)", d, sys.pid())) end
  end)
  require("ops").sleep(0.1) -- a deploy takes a little while: the kill can land in one
  return "succeeded"
end
return M
]]

-- One curl process sends `ids` 8 at a time; on_answer(id, status) for each.
local function send_all(dir, url, ids, on_answer)
  local lines = {}
  for _, id in ipairs(ids) do
    lines[#lines + 1] = string.format(
      'url = "%s?d=%s"\nrequest = "POST"\nheader = "Content-Type: application/json"\n'
      .. 'header = "X-GitHub-Event: push"\nheader = "X-GitHub-Delivery: %s"\nheader = "X-Hub-Signature-256: %s"\n'
      .. 'data-binary = "@%s/body.json"\noutput = "/dev/null"\nwrite-out = "%%{http_code} %%{url}\\n"\nmax-time = 20\n',
      url, id, id, H.sign(SECRET, h.read(dir .. "/body.json")), dir)
  end
  h.write(dir .. "/curl.cfg", table.concat(lines, "next\n"))
  local r = assert(ops.proc.run({"curl", "-s", "--parallel", "--parallel-max", "8", "--config", dir .. "/curl.cfg"}, {
    stdout = function(line)
      local status, id = line:match("^(%d+) .*%?d=(%S+)$")
      if id then on_answer(id, tonumber(status)) end
    end,
  }))
  return r
end

describe("opsrun serve durability", function()
  teardown(H.reap) -- servers a failed test left running
  it("deploys every delivery answered 202 once, across a SIGKILL, and loses none of the unanswered", function()
    local t0 = ops.time.monotonic()
    local dir = h.tmpdir()
    local repo = H.repo(dir .. "/repo")
    local c0 = H.commit(repo, {["dev/app.txt"] = "0\n"}, "c0")
    local c1 = H.commit(repo, {["dev/app.txt"] = "1\n"}, "c1")
    h.write(dir .. "/body.json", H.push_body("refs/heads/main", c0, c1))
    assert(ops.fs.mkdir_p(dir .. "/override/ops/serve"))
    h.write(dir .. "/override/ops/serve/environments.lua", RECORDING_MAPPER)
    local env = {OPSRUN_PATH = dir .. "/override", SERVE_RECORD = dir .. "/record.db", HOOK_SECRET = SECRET}
    local srv = H.server(dir, string.format("hooks:\n  ops: {repo: %s, branch: main, secret_env: HOOK_SECRET}\n", repo), env)

    local ids, answered, first = {}, {}, {}
    for i = 1, TOTAL do ids[i] = string.format("d-%04d", i) end
    -- the SIGKILL: after KILL_AFTER answers, at a moment a deploy is in flight (an item leased)
    local accepted, leased_at_kill = 0, 0
    -- polled every 5 ms: the server answers the 500 in a fraction of a second, and a kill
    -- that came after the last answer would test nothing
    local function soon(what, fn)
      local deadline = ops.time.monotonic() + 30
      while not fn() do
        if ops.time.monotonic() > deadline then error("timed out waiting for " .. what, 2) end
        ops.sleep(0.005)
      end
    end
    local killer = ops.spawn(function()
      soon("half of the answers", function() return accepted >= KILL_AFTER end)
      soon("a deploy in flight", function()
        leased_at_kill = H.queue_counts(srv.store).leased
        return leased_at_kill > 0
      end)
      srv.kill("SIGKILL")
    end)
    send_all(dir, srv.hook("ops"), ids, function(id, status)
      first[id] = status
      if status == 202 then
        answered[id] = true
        accepted = accepted + 1
      end
    end)
    assert(killer:wait())
    local r = srv.proc:wait()
    assert.equal("SIGKILL", r.signal)
    local unanswered = {}
    for _, id in ipairs(ids) do
      assert.is_number(first[id], "curl reported nothing for " .. id)
      if first[id] ~= 202 then unanswered[#unanswered + 1] = id end
    end
    assert.is_true(#unanswered > 0, "the kill came after every answer: nothing was tested")
    assert.is_true(accepted >= KILL_AFTER)

    -- the restart, then the sender's retries: the unanswered, and a few answered ones again
    local restart_at = ops.time.now()
    srv = H.server(dir, nil, env)
    local retry, again = {}, {}
    for _, id in ipairs(unanswered) do retry[#retry + 1] = id end
    for i = 1, 20 do retry[#retry + 1] = ids[i]; again[ids[i]] = true end
    local second = {}
    send_all(dir, srv.hook("ops"), retry, function(id, status) second[id] = status end)
    local stored_unanswered = 0
    for _, id in ipairs(retry) do
      assert.equal(202, second[id], "the retry of " .. id .. " was not accepted")
      answered[id] = true
    end
    H.wait("every delivery to be deployed", function()
      local c = H.queue_counts(srv.store)
      return c.ready == 0 and c.leased == 0 and c.done == TOTAL
    end, 40)
    assert.equal(0, srv.stop().code)

    -- the store: one item per delivery, all done, each with one outcome
    local items = {}
    for _, row in ipairs(H.query(srv.store, "SELECT key, state, attempts, created_at FROM ops_queue WHERE queue = 'deliveries'")) do
      items[row.key:match("^ops:(.*)$")] = row
    end
    local outcomes = {}
    for _, row in ipairs(H.query(srv.store, "SELECT delivery, status FROM serve_outcomes")) do
      assert.is_nil(outcomes[row.delivery], "two outcomes for " .. row.delivery)
      outcomes[row.delivery] = row.status
    end
    -- the mapper's record: each delivery deployed once; twice only for the deploy the
    -- SIGKILL interrupted (its item was leased by the killed process: attempts > 1)
    local deployed = {}
    for _, row in ipairs(H.query(dir .. "/record.db", "SELECT delivery FROM deployed")) do
      deployed[row.delivery] = (deployed[row.delivery] or 0) + 1
    end
    local rerun = 0
    for _, id in ipairs(ids) do
      assert.is_true(answered[id], id .. " never got a 202")
      assert.equal("done", items[id] and items[id].state, id .. " is not done in the store")
      assert.equal("succeeded", outcomes[id], id .. " has no outcome")
      assert.is_number(deployed[id], id .. " was answered 202 but never deployed")
      if deployed[id] > 1 then
        rerun = rerun + 1
        assert.equal(2, deployed[id])
        assert.is_true(items[id].attempts > 1, id .. " was deployed twice without a crash in between")
      end
      if first[id] ~= 202 and items[id].created_at < restart_at then
        stored_unanswered = stored_unanswered + 1 -- on disk before the kill, not answered: the retry was a duplicate
      end
    end
    assert.is_true(rerun <= 100, "more re-runs than one coalesced group")
    print(string.format("\n  %d answered before the kill, %d unanswered and retried (%d of them already on disk), "
      .. "%d leased at the kill, %d deployed twice (the deploy the kill interrupted), %.1fs", accepted, #unanswered,
      stored_unanswered, leased_at_kill, rerun, ops.time.monotonic() - t0))
    assert.is_true(ops.time.monotonic() - t0 < 60)
    h.rmtree(dir)
  end)
end)
