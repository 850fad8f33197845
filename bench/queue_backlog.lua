-- Claiming with a backlog: the cost of q:claim_many(100) when many items already wait.
--
-- A worker takes 100 items at a time and completes them, ROUNDS times, while BACKLOG older
-- items stay ready (each round adds 100 new ones). Timed: the claim alone, averaged over
-- the rounds. The same workload runs twice per backlog, the queue's default
-- (dead_letter_every = 10 s: the dead-lettering pass runs with the first claim only) and
-- dead_letter_every = 0 (the pass at every claim, as ops.store did before 2026-11-24: it
-- reads every item due, ready ones included). The ratio is the second over the first.
--
-- A second table: a whole group's cycle, read and marked done, leased (claim_many then
-- complete_many, the baseline) against peeked (peek_many then complete_peeked: how a serve
-- worker settles a group that needs no deploy, without a lease).
--
-- Run:
--   build/opsrun bench/queue_backlog.lua [backlogs=0,10000,50000] [rounds=20] [parent dir]
local store = require("ops.store")
local time = require("ops.time")
local fs = require("ops.fs")

local backlogs = {}
for n in (arg[1] or "0,10000,50000"):gmatch("%d+") do backlogs[#backlogs + 1] = tonumber(n) end
local rounds = tonumber(arg[2]) or 20
local dir -- made here and removed at the end: under the folder given, never the folder itself
if arg[3] then
  dir = fs.join(arg[3], "opsrun-queue-backlog")
else
  dir = os.tmpname()
  os.remove(dir)
end
assert(fs.mkdir(dir, {parents = true}))

local payload = string.rep("x", 300) -- about a stored push

local function fill(q, backlog)
  local batch = {}
  for i = 1, backlog do
    batch[#batch + 1] = {kind = "push", payload = payload, key = "old-" .. i}
    if #batch == 5000 or i == backlog then
      assert(q:enqueue_many(batch))
      batch = {}
    end
  end
end

local function ids_of(items)
  local ids = {}
  for i, it in ipairs(items) do ids[i] = it.id end
  return ids
end

local function run(backlog, every)
  local path = dir .. "/backlog.db"
  for _, suffix in ipairs({"", "-wal", "-shm"}) do os.remove(path .. suffix) end
  local db = assert(store.open(path, {synchronous = "normal"}))
  local q = assert(db:queue("bench", {dead_letter_every = every}))
  fill(q, backlog)
  local spent = 0
  for r = 1, rounds do
    local fresh = {}
    for i = 1, 100 do fresh[i] = {kind = "push", payload = payload, key = "new-" .. r .. "-" .. i} end
    assert(q:enqueue_many(fresh))
    local t0 = time.monotonic()
    local items = assert(q:claim_many("bench-worker", 600, {"push"}, 100))
    spent = spent + (time.monotonic() - t0)
    assert(q:complete_many(ids_of(items), "bench-worker"))
  end
  db:close()
  return spent / rounds
end

-- a group of 100 read and marked done, ROUNDS times: leased or peeked
local function cycle(backlog, peeked)
  local path = dir .. "/cycle.db"
  for _, suffix in ipairs({"", "-wal", "-shm"}) do os.remove(path .. suffix) end
  local db = assert(store.open(path, {synchronous = "normal"}))
  local q = assert(db:queue("bench"))
  fill(q, backlog)
  local t0 = time.monotonic()
  for _ = 1, rounds do
    if peeked then
      local items = assert(q:peek_many({"push"}, 100))
      assert(#assert(q:complete_peeked(ids_of(items), "bench-worker")) == #items)
    else
      local items = assert(q:claim_many("bench-worker", 600, {"push"}, 100))
      assert(#assert(q:complete_many(ids_of(items), "bench-worker")) == #items)
    end
  end
  local spent = (time.monotonic() - t0) / rounds
  db:close()
  return spent
end

print(string.format("claim_many(100), mean of %d rounds, in %s", rounds, dir))
print(string.format("%10s %14s %22s %7s", "backlog", "default (ms)", "pass every claim (ms)", "ratio"))
for _, n in ipairs(backlogs) do
  local lazy = run(n, nil)
  local every = run(n, 0)
  print(string.format("%10d %14.2f %22.2f %6.1fx", n, lazy * 1000, every * 1000, every / lazy))
end
print(string.format("\na group of 100 read and marked done, mean of %d rounds (oldest first)", rounds))
print(string.format("%10s %26s %26s %7s", "waiting", "leased: claim+complete (ms)", "peeked: peek+complete (ms)", "ratio"))
for _, n in ipairs(backlogs) do
  n = math.max(n, 100 * rounds) -- enough for every round
  local leased, peeked = cycle(n, false), cycle(n, true)
  print(string.format("%10d %26.2f %26.2f %6.2fx", n, leased * 1000, peeked * 1000, peeked / leased))
end
assert(fs.remove(dir, {recursive = true}))
