-- Durable enqueue throughput: ops.store queue vs the sqlite3 CLI.
--
-- Both sides do one INSERT per transaction into the same table (the queue's
-- schema, created by ops.store) with journal_mode=WAL and synchronous=FULL, so
-- every item costs a WAL fsync. Prints items/second for each and the ratio.
--
-- Run:
--   build/opsrun bench/store_bench.lua [items=2000] [dir=a fresh directory under /tmp]
-- The directory must be on the disk you care about: a tmpfs makes fsync free.

local store = require("ops.store")

local n = tonumber(arg[1]) or 2000
local dir = arg[2]
if not dir then
  dir = os.tmpname()
  os.remove(dir)
end
assert(os.execute("mkdir -p '" .. dir .. "'"))

local function fresh_queue_db(path)
  os.remove(path)
  os.remove(path .. "-wal")
  os.remove(path .. "-shm")
  local db = assert(store.open(path))
  local q = assert(db:queue("bench"))
  return db, q
end

local function rate(count, seconds) return count / seconds end

-- ops.store: the queue API (the path a webhook delivery takes).
local db, q = fresh_queue_db(dir .. "/ops.db")
local t0 = store.now()
for i = 1, n do
  assert(q:enqueue("push", '{"delivery":' .. i .. "}", { key = "d" .. i }))
end
local ops_seconds = store.now() - t0
db:close()

-- ops.store: a bare parameterised INSERT per transaction, to show the queue's own cost.
db = fresh_queue_db(dir .. "/raw.db")
local insert = "INSERT INTO ops_queue (queue, kind, payload, key, state, available_at, created_at, updated_at) "
  .. "VALUES (?, ?, ?, ?, 'ready', ?, ?, ?)"
t0 = store.now()
for i = 1, n do
  local now = store.now()
  assert(db:exec(insert, "bench", "push", '{"delivery":' .. i .. "}", "d" .. i, now, now, now))
end
local raw_seconds = store.now() - t0
db:close()

-- sqlite3 CLI: the same schema and rows, one autocommit INSERT each.
db = fresh_queue_db(dir .. "/cli.db")
db:close()
local script = dir .. "/inserts.sql"
local f = assert(io.open(script, "w"))
f:write("PRAGMA journal_mode=WAL;\nPRAGMA synchronous=FULL;\n")
local now = store.now()
for i = 1, n do
  f:write(string.format("INSERT INTO ops_queue (queue, kind, payload, key, state, available_at, created_at, updated_at) "
    .. "VALUES ('bench', 'push', '{\"delivery\":%d}', 'd%d', 'ready', %.6f, %.6f, %.6f);\n", i, i, now, now, now))
end
f:close()
t0 = store.now()
assert(os.execute(string.format("sqlite3 '%s/cli.db' < '%s' > /dev/null", dir, script)))
local cli_seconds = store.now() - t0

local check = assert(store.open(dir .. "/cli.db"))
assert(check:query("SELECT count(*) AS c FROM ops_queue")[1].c == n, "sqlite3 CLI did not insert every row")
check:close()

local ops_rate, raw_rate, cli_rate = rate(n, ops_seconds), rate(n, raw_seconds), rate(n, cli_seconds)
print(string.format("items: %d, dir: %s (WAL, synchronous=FULL, one transaction per item)", n, dir))
print(string.format("ops.store queue:enqueue  %9.0f items/s  (%.3f s)", ops_rate, ops_seconds))
print(string.format("ops.store db:exec INSERT %9.0f items/s  (%.3f s)", raw_rate, raw_seconds))
print(string.format("sqlite3 CLI INSERT       %9.0f items/s  (%.3f s)", cli_rate, cli_seconds))
print(string.format("ratio enqueue/cli: %.2f   exec/cli: %.2f", ops_rate / cli_rate, raw_rate / cli_rate))

if not arg[2] then os.execute("rm -rf '" .. dir .. "'") end
