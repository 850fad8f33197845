-- Specification of ops.store: the SQLite connection API, transactions,
-- migrations and the durable queue.

local store = require("ops.store")

local function tmpdir()
  local p = os.tmpname()
  os.remove(p)
  assert(ops.fs.mkdir_p(p))
  return p
end

local function rmdir(p)
  ops.fs.remove(p, {recursive = true})
end

-- A stand-in for ops.core.sched: tasks are coroutines (their own task token), run in FIFO order.
local function fake_scheduler()
  local runq, sched = {}, {}
  function sched.current() return coroutine.running() end
  function sched.suspend() coroutine.yield() end
  function sched.wake(co)
    runq[#runq + 1] = co
    return true
  end
  function sched.spawn(fn)
    local co = coroutine.create(fn)
    runq[#runq + 1] = co
    return co
  end
  function sched.pause() -- stands in for waiting on I/O
    runq[#runq + 1] = coroutine.running()
    coroutine.yield()
  end
  function sched.run()
    while #runq > 0 do
      local co = table.remove(runq, 1)
      local ok, err = coroutine.resume(co)
      if not ok then error(err, 0) end
    end
  end
  return sched
end

describe("ops.store", function()
  local dir, db

  before_each(function()
    dir = tmpdir()
    db = assert(store.open(dir .. "/s.db"))
  end)

  after_each(function()
    if db then db:close() end
    rmdir(dir)
  end)

  describe("open", function()
    it("sets WAL, synchronous=FULL, foreign keys and a busy timeout by default", function()
      assert.equal("wal", db:query("PRAGMA journal_mode")[1].journal_mode)
      assert.equal(2, db:query("PRAGMA synchronous")[1].synchronous)
      assert.equal(1, db:query("PRAGMA foreign_keys")[1].foreign_keys)
      assert.equal(5000, db:query("PRAGMA busy_timeout")[1].timeout)
    end)

    it("accepts synchronous = 'normal' and a busy_timeout in ms", function()
      local d2 = assert(store.open(dir .. "/n.db", { synchronous = "normal", busy_timeout = 250 }))
      assert.equal(1, d2:query("PRAGMA synchronous")[1].synchronous)
      assert.equal(250, d2:query("PRAGMA busy_timeout")[1].timeout)
      d2:close()
    end)

    it("rejects an unknown synchronous mode as misuse", function()
      assert.has_error(function() store.open(dir .. "/x.db", { synchronous = "off" }) end)
    end)

    it("reports a file that is not a database as SQLITE_NOTADB, naming the file", function()
      local path = dir .. "/junk.db"
      local f = assert(io.open(path, "wb"))
      f:write(string.rep("this is not sqlite\n", 500))
      f:close()
      local d, err, code = store.open(path)
      assert.is_nil(d)
      assert.equal("SQLITE_NOTADB", code)
      assert.truthy(err:find("SQLITE_NOTADB: ", 1, true))
      assert.truthy(err:find(path, 1, true))
    end)

    it("reports an unreachable path as SQLITE_CANTOPEN", function()
      local d, err, code = store.open(dir .. "/no/such/dir/x.db")
      assert.is_nil(d)
      assert.equal("SQLITE_CANTOPEN", code)
      assert.truthy(err:find("no/such/dir", 1, true))
    end)

    it("closes idempotently and says so in tostring", function()
      assert.truthy(tostring(db):find("s.db", 1, true))
      assert.is_true(db:close())
      assert.is_true(db:close())
      assert.equal("ops.store.db (closed)", tostring(db))
      assert.has_error(function() db:query("SELECT 1") end, "ops.store: database is closed")
      db = nil
    end)

    it("closes at the end of a <close> scope", function()
      local d2
      do
        local d <close> = assert(store.open(dir .. "/c.db"))
        d2 = d
      end
      assert.equal("ops.store.db (closed)", tostring(d2))
    end)
  end)

  describe("exec and query", function()
    before_each(function()
      assert(db:exec("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT UNIQUE, score REAL, n INTEGER, b BLOB)"))
    end)

    it("returns the number of changed rows and the last inserted rowid", function()
      local changes, rowid = db:exec("INSERT INTO t (name) VALUES (?)", "a")
      assert.same({ 1, 1 }, { changes, rowid })
      changes = db:exec("UPDATE t SET n = 1 WHERE name = ?", "nobody")
      assert.equal(0, changes)
      assert.equal(0, (db:exec("SELECT 1")))
    end)

    it("keeps a value containing quotes and '; DROP TABLE' as data", function()
      local evil = "x'); DROP TABLE t; --\"'"
      assert(db:exec("INSERT INTO t (name) VALUES (?)", evil))
      local rows = db:query("SELECT name FROM t WHERE name = ?", evil)
      assert.equal(evil, rows[1].name)
      assert.equal(1, db:query("SELECT count(*) AS c FROM sqlite_master WHERE name = 't'")[1].c)
    end)

    it("binds nil as NULL, booleans as 0/1, integers, floats and strings", function()
      assert(db:exec("INSERT INTO t (name, score, n, b) VALUES (?, ?, ?, ?)", "x", 1.5, 42, nil))
      assert(db:exec("INSERT INTO t (name, n) VALUES (?, ?)", "y", true))
      local r = db:query("SELECT * FROM t ORDER BY id")
      assert.equal(1.5, r[1].score)
      assert.equal("float", math.type(r[1].score))
      assert.equal(42, r[1].n)
      assert.equal("integer", math.type(r[1].n))
      assert.is_nil(r[1].b)
      assert.equal(1, r[2].n)
    end)

    it("keeps strings with NUL bytes intact", function()
      local bin = "a\0b\255\0"
      assert(db:exec("INSERT INTO t (name) VALUES (?)", bin))
      assert.equal(bin, db:query("SELECT name FROM t")[1].name)
    end)

    it("binds :name parameters from a single table argument", function()
      assert(db:exec("INSERT INTO t (name, n) VALUES (:name, :n)", { name = "z", n = 7 }))
      assert.equal(7, db:query("SELECT n FROM t WHERE name = :name", { name = "z" })[1].n)
    end)

    it("raises on a wrong number of parameters or an unbindable value", function()
      assert.has_error(function() db:exec("INSERT INTO t (name) VALUES (?)") end)
      assert.has_error(function() db:exec("INSERT INTO t (name) VALUES (?)", "a", "b") end)
      assert.has_error(function() db:exec("INSERT INTO t (name) VALUES (?)", function() end) end)
      assert.has_error(function() db:exec("INSERT INTO t (name) VALUES (?)", { "a" }) end)
    end)

    it("refuses several statements outside exec_script", function()
      assert.has_error(function() db:exec("SELECT 1; DROP TABLE t") end)
      assert.equal(1, db:query("SELECT count(*) AS c FROM sqlite_master WHERE name = 't'")[1].c)
    end)

    it("returns nil, 'SQLITE_CONSTRAINT: ...', 'SQLITE_CONSTRAINT' on a unique violation", function()
      assert(db:exec("INSERT INTO t (name) VALUES (?)", "dup"))
      local ok, err, code = db:exec("INSERT INTO t (name) VALUES (?)", "dup")
      assert.is_nil(ok)
      assert.equal("SQLITE_CONSTRAINT", code)
      assert.equal("SQLITE_CONSTRAINT: UNIQUE constraint failed: t.name", err)
    end)

    it("returns SQLITE_ERROR for a syntax error", function()
      local ok, err, code = db:query("SELEC nothing")
      assert.is_nil(ok)
      assert.equal("SQLITE_ERROR", code)
      assert.truthy(err:find("syntax error", 1, true))
    end)

    it("leaves no statement running after an error (the table can be dropped)", function()
      assert(db:exec("INSERT INTO t (name) VALUES (?)", "dup"))
      assert.is_nil(db:exec("INSERT INTO t (name) VALUES (?)", "dup"))
      assert(db:exec("DROP TABLE t"))
    end)

    it("runs several statements with exec_script", function()
      assert.is_true(db:exec_script("INSERT INTO t (name) VALUES ('a'); INSERT INTO t (name) VALUES ('b');"))
      assert.equal(2, db:query("SELECT count(*) AS c FROM t")[1].c)
      local ok, _, code = db:exec_script("INSERT INTO t (name) VALUES ('c'); INSERT INTO t (name) VALUES ('a');")
      assert.is_nil(ok)
      assert.equal("SQLITE_CONSTRAINT", code)
    end)

    it("reuses cached statements across calls and past the cache size", function()
      for i = 1, 200 do
        assert(db:exec("INSERT INTO t (name, n) VALUES (?, " .. (i % 100) .. ")", "n" .. i))
      end
      for i = 1, 200 do
        assert.equal("n" .. i, db:query("SELECT name FROM t WHERE name = ?", "n" .. i)[1].name)
      end
    end)
  end)

  describe("rows", function()
    before_each(function()
      assert(db:exec("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))
      for i = 1, 5 do assert(db:exec("INSERT INTO t (v) VALUES (?)", "v" .. i)) end
    end)

    it("iterates rows in order", function()
      local seen = {}
      for row in db:rows("SELECT id, v FROM t WHERE id > ? ORDER BY id", 2) do seen[#seen + 1] = row.v end
      assert.same({ "v3", "v4", "v5" }, seen)
    end)

    it("finishes the statement when a loop breaks early", function()
      for _ in db:rows("SELECT * FROM t") do break end
      assert(db:exec("DROP TABLE t"))
    end)

    it("finishes the statement when the loop body raises", function()
      assert.has_error(function()
        for _ in db:rows("SELECT * FROM t") do error("boom") end
      end)
      assert(db:exec("DROP TABLE t"))
    end)

    it("allows the same query to be iterated twice at once", function()
      local pairs_seen = 0
      for _ in db:rows("SELECT * FROM t") do
        for _ in db:rows("SELECT * FROM t") do pairs_seen = pairs_seen + 1 end
      end
      assert.equal(25, pairs_seen)
    end)

    it("returns nil, err, code for bad SQL", function()
      local it_, err, code = db:rows("SELECT * FROM missing")
      assert.is_nil(it_)
      assert.equal("SQLITE_ERROR", code)
      assert.truthy(err:find("no such table", 1, true))
    end)

    it("raises from the iterator if the database is closed mid-iteration", function()
      local next_row = db:rows("SELECT * FROM t")
      assert.truthy(next_row())
      db:close()
      assert.has_error(function() next_row() end, "ops.store: database closed while iterating rows")
      db = nil
    end)
  end)

  describe("transaction", function()
    before_each(function()
      assert(db:exec("CREATE TABLE t (v TEXT)"))
    end)

    local function count() return db:query("SELECT count(*) AS c FROM t")[1].c end

    it("commits when fn returns, and returns fn's results", function()
      local a, b = db:transaction(function(d)
        assert.is_true(d:in_transaction())
        assert(d:exec("INSERT INTO t VALUES ('a')"))
        return 1, 2
      end)
      assert.same({ 1, 2 }, { a, b })
      assert.is_false(db:in_transaction())
      assert.equal(1, count())
    end)

    it("rolls back and re-raises the same error when fn raises", function()
      local e = {}
      local ok, err = pcall(db.transaction, db, function(d)
        assert(d:exec("INSERT INTO t VALUES ('a')"))
        error(e)
      end)
      assert.is_false(ok)
      assert.equal(e, err)
      assert.equal(0, count())
      assert.is_false(db:in_transaction())
    end)

    it("nests with savepoints: an inner failure undoes only the inner work", function()
      db:transaction(function(d)
        assert(d:exec("INSERT INTO t VALUES ('outer')"))
        assert.is_false(pcall(d.transaction, d, function(d2)
          assert(d2:exec("INSERT INTO t VALUES ('inner')"))
          error("inner fails")
        end))
        d:transaction(function(d2) assert(d2:exec("INSERT INTO t VALUES ('inner ok')")) end)
      end)
      local vs = {}
      for _, r in ipairs(db:query("SELECT v FROM t ORDER BY rowid")) do vs[#vs + 1] = r.v end
      assert.same({ "outer", "inner ok" }, vs)
    end)

    it("an outer failure undoes committed inner levels too", function()
      pcall(db.transaction, db, function(d)
        d:transaction(function(d2) assert(d2:exec("INSERT INTO t VALUES ('inner')")) end)
        error("outer fails")
      end)
      assert.equal(0, count())
    end)

    it("is usable again after a failure (the lock was released)", function()
      pcall(db.transaction, db, function() error("x") end)
      db:transaction(function(d) assert(d:exec("INSERT INTO t VALUES ('a')")) end)
      assert.equal(1, count())
    end)

    describe("with tasks that yield inside", function()
      local sched

      before_each(function()
        sched = fake_scheduler()
        package.loaded["ops.core.sched"] = sched
      end)

      after_each(function()
        package.loaded["ops.core.sched"] = nil
      end)

      it("keeps another task's statements out of an open transaction", function()
        local order = {}
        sched.spawn(function()
          pcall(db.transaction, db, function(d)
            assert(d:exec("INSERT INTO t VALUES ('a')"))
            order[#order + 1] = "a inserted"
            sched.pause()
            order[#order + 1] = "a fails"
            error("a fails")
          end)
        end)
        sched.spawn(function()
          assert(db:exec("INSERT INTO t VALUES ('b')"))
          order[#order + 1] = "b inserted"
        end)
        sched.run()
        assert.same({ "a inserted", "a fails", "b inserted" }, order)
        assert.same({ { v = "b" } }, db:query("SELECT v FROM t"))
      end)

      it("serialises transactions of different tasks in FIFO order", function()
        local order = {}
        for i = 1, 3 do
          sched.spawn(function()
            db:transaction(function(d)
              order[#order + 1] = "begin " .. i
              sched.pause()
              assert(d:exec("INSERT INTO t VALUES (?)", "t" .. i))
              order[#order + 1] = "end " .. i
            end)
          end)
        end
        sched.run()
        assert.same({ "begin 1", "end 1", "begin 2", "end 2", "begin 3", "end 3" }, order)
        assert.equal(3, count())
      end)

      it("drops a task cancelled while waiting for the lock from the line", function()
        local order = {}
        sched.spawn(function()
          db:transaction(function(d)
            sched.pause()
            assert(d:exec("INSERT INTO t VALUES ('a')"))
          end)
          order[#order + 1] = "a committed"
        end)
        local b = sched.spawn(function()
          db:transaction(function() order[#order + 1] = "b ran" end)
        end)
        sched.spawn(function()
          assert(coroutine.close(b)) -- b is suspended in lock(); cancel it there
          db:transaction(function(d) assert(d:exec("INSERT INTO t VALUES ('c')")) end)
          order[#order + 1] = "c committed"
        end)
        sched.run()
        assert.same({ "a committed", "c committed" }, order)
        assert.equal(2, count())
      end)

      it("rolls back and releases the lock when a task is cancelled mid-transaction", function()
        local co = coroutine.create(function()
          db:transaction(function(d)
            assert(d:exec("INSERT INTO t VALUES ('a')"))
            coroutine.yield()
          end)
        end)
        assert(coroutine.resume(co))
        assert(coroutine.close(co))
        assert.is_false(db:in_transaction())
        assert.equal(0, count())
        db:transaction(function(d) assert(d:exec("INSERT INTO t VALUES ('b')")) end)
        assert.equal(1, count())
      end)
    end)
  end)

  describe("migrate", function()
    local migrations = {
      "CREATE TABLE a (x INTEGER)",
      "CREATE TABLE b (y INTEGER); INSERT INTO b VALUES (1);",
    }

    it("applies migrations in order and records the version in user_version", function()
      local applied, version = db:migrate(migrations)
      assert.same({ 2, 2 }, { applied, version })
      assert.equal(2, db:query("PRAGMA user_version")[1].user_version)
      assert.equal(1, db:query("SELECT y FROM b")[1].y)
    end)

    it("applies nothing when re-run, and only new ones when extended", function()
      db:migrate(migrations)
      assert.same({ 0, 2 }, { db:migrate(migrations) })
      local more = { migrations[1], migrations[2], "INSERT INTO b VALUES (2)" }
      assert.same({ 1, 3 }, { db:migrate(more) })
      assert.equal(2, #db:query("SELECT y FROM b"))
    end)

    it("rolls back a failing migration and keeps the earlier ones", function()
      local ok, err, code = db:migrate({ "CREATE TABLE a (x)", "CREATE TABLE c (z); CREATE TABLE a (x)" })
      assert.is_nil(ok)
      assert.equal("SQLITE_ERROR", code)
      assert.truthy(err:find("migration 2 failed", 1, true))
      assert.equal(1, db:query("PRAGMA user_version")[1].user_version)
      assert.is_nil(db:query("SELECT name FROM sqlite_master WHERE name = 'c'")[1])
    end)

    it("refuses a database newer than the migrations it is given", function()
      db:migrate(migrations)
      local ok, _, code = db:migrate({ migrations[1] })
      assert.is_nil(ok)
      assert.equal("ESCHEMA", code)
    end)

    it("tracks a named component separately from user_version", function()
      assert.same({ 1, 1 }, { db:migrate({ "CREATE TABLE q (x)" }, { component = "lib" }) })
      assert.equal(0, db:query("PRAGMA user_version")[1].user_version)
      assert.same({ 2, 2 }, { db:migrate(migrations) })
      assert.same({ 0, 1 }, { db:migrate({ "CREATE TABLE q (x)" }, { component = "lib" }) })
    end)

    it("runs function migrations with the db", function()
      db:migrate({ "CREATE TABLE a (x)", function(d) assert(d:exec("INSERT INTO a VALUES (?)", 5)) end })
      assert.equal(5, db:query("SELECT x FROM a")[1].x)
    end)
  end)

  describe("a queue made before its state check was rewritten", function()
    -- migration 1 as opsrun wrote it until 2026-11-24: the state checked with IN (...)
    local OLD_V1 = [[
  CREATE TABLE ops_queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    key TEXT,
    state TEXT NOT NULL CHECK (state IN ('ready', 'leased', 'done', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    available_at REAL,
    worker TEXT,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
  );
  CREATE UNIQUE INDEX ops_queue_key ON ops_queue (queue, key) WHERE key IS NOT NULL;
  CREATE INDEX ops_queue_available ON ops_queue (queue, available_at) WHERE available_at IS NOT NULL;
  ]]

    local function queue_sql(d)
      return d:query("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'ops_queue'")[1].sql
    end

    it("is made again with the same rows, ids and id counter, once", function()
      assert.same({ 1, 1 }, { db:migrate({ OLD_V1 }, { component = "ops.queue" }) })
      local insert = "INSERT INTO ops_queue (queue, kind, payload, key, state, attempts, available_at, worker, "
        .. "last_error, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
      assert(db:exec(insert, "deliveries", "push", '{"a":1}', "d-1", "ready", 0, 10.5, nil, nil, 1.0, 1.0))
      assert(db:exec(insert, "deliveries", "push", '{"a":2}', "d-2", "leased", 1, 99.0, "w1", nil, 2.0, 3.0))
      assert(db:exec(insert, "deliveries", "push", '{"a":3}', "d-3", "done", 1, nil, "w1", nil, 3.0, 4.0))
      assert(db:exec(insert, "deliveries", "push", '{"a":4}', nil, "dead", 5, nil, "w2", "boom", 4.0, 5.0))
      assert(db:exec(insert, "deliveries", "push", '{"a":5}', "d-5", "ready", 0, 11.0, nil, nil, 5.0, 5.0))
      assert(db:exec("DELETE FROM ops_queue WHERE key = 'd-5'")) -- the counter is now past the last row
      local before = db:query("SELECT * FROM ops_queue ORDER BY id")
      assert.is_truthy(queue_sql(db):find("state IN (", 1, true))

      local q = assert(db:queue("deliveries"))
      assert.same(before, db:query("SELECT * FROM ops_queue ORDER BY id"))
      assert.is_nil(queue_sql(db):find("state IN (", 1, true))
      assert.equal(2, db:query("SELECT version FROM ops_schema_versions WHERE component = 'ops.queue'")[1].version)
      -- the check still holds, the unique key and the id counter carried over
      local ok, err = db:exec(insert, "deliveries", "push", "{}", nil, "bogus", 0, nil, nil, nil, 1.0, 1.0)
      assert.is_nil(ok)
      assert.matches("CHECK constraint failed", err)
      assert.same({ before[1].id, "duplicate" }, { q:enqueue("push", "{}", { key = "d-1" }) })
      local id, state = q:enqueue("push", "{}", { key = "d-6" })
      assert.equal("queued", state)
      assert.is_true(id > before[#before].id + 1, "a new id, not the deleted row's") -- 5 was taken
      assert.equal(1, #db:query("SELECT name FROM sqlite_master WHERE name = 'ops_queue_key'"))
      assert.equal(1, #db:query("SELECT name FROM sqlite_master WHERE name = 'ops_queue_available'"))
      assert.equal(0, #db:query("SELECT name FROM sqlite_master WHERE name = 'ops_queue_rebuilt'"))

      -- opened again: nothing is made again
      db:close()
      db = assert(store.open(dir .. "/s.db"))
      local after = db:query("SELECT * FROM ops_queue ORDER BY id")
      assert(db:queue("deliveries"))
      assert.same(after, db:query("SELECT * FROM ops_queue ORDER BY id"))
    end)

    it("whose every row was deleted keeps its id counter", function()
      assert(db:migrate({ OLD_V1 }, { component = "ops.queue" }))
      assert(db:exec("INSERT INTO ops_queue (queue, kind, payload, state, created_at, updated_at) "
        .. "VALUES ('x', 'k', 'p', 'ready', 1, 1)"))
      local last = db:query("SELECT max(id) AS id FROM ops_queue")[1].id
      assert(db:exec("DELETE FROM ops_queue"))
      local q = assert(db:queue("x"))
      assert.equal(last + 1, (q:enqueue("k", "p")))
    end)

    it("that was dropped by hand fails its migration with a message that says so", function()
      assert(db:migrate({ OLD_V1 }, { component = "ops.queue" }))
      assert(db:exec("DROP TABLE ops_queue"))
      local q, err = db:queue("x")
      assert.is_nil(q)
      assert.matches("migration 'ops.queue' 2 failed: the table ops_queue is missing", err, 1, true)
    end)

    it("is not made again when new: the check is written as comparisons from the start", function()
      assert(db:queue("x"))
      local sql = queue_sql(db)
      assert.is_nil(sql:find("state IN (", 1, true))
      assert.is_truthy(sql:find("state = 'dead'", 1, true))
    end)
  end)

  describe("queue", function()
    local now, q

    before_each(function()
      now = 1000.0
      q = assert(db:queue("deploys", { now = function() return now end, backoff = 10, max_attempts = 3 }))
    end)

    it("enqueues and reports a duplicate idempotency key with the existing id", function()
      local id1, s1 = q:enqueue("push", "{}", { key = "delivery-1" })
      local id2, s2 = q:enqueue("push", "{\"other\":1}", { key = "delivery-1" })
      assert.equal("queued", s1)
      assert.same({ id1, "duplicate" }, { id2, s2 })
      assert.equal("{}", q:get(id1).payload)
      assert.equal(1, q:stats().ready)
    end)

    it("scopes keys per queue", function()
      local other = assert(db:queue("other"))
      local a = q:enqueue("k", "p", { key = "same" })
      local b, state = other:enqueue("k", "p", { key = "same" })
      assert.equal("queued", state)
      assert.are_not.equal(a, b)
    end)

    it("requires string kind and payload", function()
      assert.has_error(function() q:enqueue("k", { a = 1 }) end)
      assert.has_error(function() q:enqueue(nil, "p") end)
    end)

    it("claims the oldest ready item first and honours delay", function()
      local late = q:enqueue("k", "late", { delay = 5 })
      local first = q:enqueue("k", "first")
      local second = q:enqueue("k", "second")
      assert.equal(first, q:claim("w", 30).id)
      assert.equal(second, q:claim("w", 30).id)
      assert.is_nil(q:claim("w", 30))
      now = now + 5
      local item = q:claim("w", 30)
      assert.equal(late, item.id)
      assert.same({ "k", "late", 1, 1035.0 }, { item.kind, item.payload, item.attempts, item.lease_until })
    end)

    it("claims only the given kinds", function()
      q:enqueue("a", "1")
      local b = q:enqueue("b", "2")
      assert.equal(b, q:claim("w", 30, { "b", "c" }).id)
      assert.is_nil(q:claim("w", 30, { "b" }))
    end)

    it("returns the key with the item", function()
      q:enqueue("k", "p", { key = "abc" })
      assert.equal("abc", q:claim("w", 30).key)
    end)

    it("re-claims an expired lease exactly once, and the old holder can no longer complete", function()
      local id = q:enqueue("k", "p")
      assert.equal(id, q:claim("w1", 10).id)
      now = now + 9
      assert.is_nil(q:claim("w2", 10))
      now = now + 2
      local again = q:claim("w2", 10)
      assert.equal(id, again.id)
      assert.equal(2, again.attempts)
      assert.is_nil(q:claim("w3", 10))
      assert.same({ false, "lease lost" }, { q:complete(id, "w1") })
      assert.is_true(q:complete(id, "w2"))
      assert.equal("done", q:get(id).state)
    end)

    it("refuses complete, extend and fail from a worker that does not hold the lease", function()
      local id = q:enqueue("k", "p")
      q:claim("w1", 10)
      assert.same({ false, "lease lost" }, { q:complete(id, "w2") })
      assert.same({ false, "lease lost" }, { q:extend(id, "w2", 10) })
      assert.same({ false, "lease lost" }, { q:fail(id, "w2", "x") })
      assert.equal("leased", q:get(id).state)
    end)

    it("extends a lease so it is not re-claimed", function()
      local id = q:enqueue("k", "p")
      q:claim("w1", 10)
      now = now + 8
      assert.equal(now + 10, q:extend(id, "w1", 10))
      now = now + 8
      assert.is_nil(q:claim("w2", 10))
      assert.is_true(q:complete(id, "w1"))
    end)

    it("requeues a failure with exponential backoff, then dead-letters after max attempts", function()
      local id = q:enqueue("k", "p")
      q:claim("w", 60)
      assert.same({ "ready", now + 10 }, { q:fail(id, "w", "first") })
      assert.is_nil(q:claim("w", 60))
      now = now + 10
      assert.equal(2, q:claim("w", 60).attempts)
      assert.same({ "ready", now + 20 }, { q:fail(id, "w", "second") })
      now = now + 20
      assert.equal(3, q:claim("w", 60).attempts)
      assert.same({ "dead" }, { q:fail(id, "w", "third") })
      local item = q:get(id)
      assert.same({ "dead", "third", 3 }, { item.state, item.last_error, item.attempts })
      now = now + 1e6
      assert.is_nil(q:claim("w", 60))
      assert.same({ ready = 0, leased = 0, done = 0, dead = 1 }, q:stats())
    end)

    it("lets fail options override the queue's max_attempts and backoff", function()
      local id = q:enqueue("k", "p")
      q:claim("w", 60)
      assert.same({ "ready", now + 0.5 }, { q:fail(id, "w", "x", { backoff = 0.5, max_attempts = 2 }) })
      now = now + 1
      q:claim("w", 60)
      assert.equal("dead", q:fail(id, "w", "x", { max_attempts = 2 }))
    end)

    it("dead-letters an item whose last allowed lease expired", function()
      local id = q:enqueue("k", "p")
      for _ = 1, 3 do
        assert.equal(id, q:claim("w", 10).id)
        now = now + 11
      end
      assert.is_nil(q:claim("w", 10))
      assert.equal("dead", q:get(id).state)
    end)

    it("never hands out a spent item, and dead-letters it when its pass is due (dead_letter_every)", function()
      local lazy = assert(db:queue("lazy", { now = function() return now end, max_attempts = 1, dead_letter_every = 100 }))
      local spent = lazy:enqueue("k", "poison")
      assert.equal(spent, lazy:claim("w", 10).id) -- the pass ran with this first claim
      now = now + 11 -- its lease expired after its last allowed attempt
      local fresh = lazy:enqueue("k", "fresh")
      -- not due: the claim skips the spent item (older) and takes the one behind it
      assert.equal(fresh, lazy:claim("w", 10).id)
      assert.same({}, lazy:claim_many("w", 10, nil, 5))
      assert.is_nil(lazy:claim("w", 10))
      assert.same({ "leased", 1 }, { lazy:get(spent).state, lazy:get(spent).attempts })
      now = now + 90 -- 101 s after the first pass: the next claim runs it
      assert.is_nil(lazy:claim("w", 10))
      assert.same({ "dead", "lease expired after the last attempt" }, { lazy:get(spent).state, lazy:get(spent).last_error })
      -- a clock gone back to before the last pass runs it at once, and counts from there
      local other = lazy:enqueue("k", "other") -- now 1101: the last pass
      assert.equal(other, lazy:claim("w", 10).id)
      now = 1096
      assert.is_nil(lazy:claim("w", 10)) -- a pass: the next is due at 1196, not 1201
      now = 1150
      assert.is_nil(lazy:claim("w", 10)) -- expired and spent: skipped, not yet dead
      assert.equal("leased", lazy:get(other).state)
      now = 1197
      assert.is_nil(lazy:claim("w", 10))
      assert.equal("dead", lazy:get(other).state)
      assert.has_error(function() db:queue("bad", { dead_letter_every = -1 }) end,
        "ops.store: queue: dead_letter_every must be a number of seconds (0: at every claim)")
      assert.has_error(function() db:queue("bad", { dead_letter_every = "10" }) end)
    end)

    it("counts items by state", function()
      local a = q:enqueue("k", "1")
      q:enqueue("k", "2")
      q:enqueue("k", "3")
      q:claim("w", 10)
      q:complete(a, "w")
      q:claim("w", 10)
      assert.same({ ready = 1, leased = 1, done = 1, dead = 0 }, q:stats())
    end)

    it("purges done items older than the given age", function()
      local a = q:enqueue("k", "1", { key = "x" })
      q:claim("w", 10)
      q:complete(a, "w")
      assert.equal(0, q:purge(60))
      now = now + 61
      assert.equal(1, q:purge(60))
      assert.is_nil(q:get(a))
      assert.equal("queued", select(2, q:enqueue("k", "1", { key = "x" })))
    end)

    it("enqueues atomically with the caller's transaction", function()
      assert(db:exec("CREATE TABLE runs (id INTEGER)"))
      pcall(db.transaction, db, function(d)
        assert(d:exec("INSERT INTO runs VALUES (1)"))
        q:enqueue("k", "p")
        error("abort")
      end)
      assert.same({ ready = 0, leased = 0, done = 0, dead = 0 }, q:stats())
    end)

    describe("in sets", function()
      it("enqueue_many queues each entry, and reports a key already stored or repeated in the set as a duplicate", function()
        local old = q:enqueue("k", "old", { key = "a" })
        local batch = {
          { kind = "k", payload = "1", key = "a" },
          { kind = "k", payload = "2", key = "b" },
          { kind = "j", payload = "3" },
          { kind = "k", payload = "4", key = "b" },
        }
        assert.equal(4, q:enqueue_many(batch))
        assert.same({ old, "duplicate" }, { batch[1].id, batch[1].outcome })
        assert.equal("queued", batch[2].outcome)
        assert.equal("queued", batch[3].outcome)
        assert.same({ batch[2].id, "duplicate" }, { batch[4].id, batch[4].outcome })
        assert.same({ "k", "2", "ready" }, { q:get(batch[2].id).kind, q:get(batch[2].id).payload, q:get(batch[2].id).state })
        assert.equal("j", q:get(batch[3].id).kind)
        assert.equal(3, q:stats().ready)
      end)

      it("enqueue_many stores all of a set or none of it", function()
        assert(db:exec_script([[CREATE TRIGGER refuse BEFORE INSERT ON ops_queue WHEN NEW.payload = 'boom'
          BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END]]))
        local batch = { { kind = "k", payload = "fine", key = "x" }, { kind = "k", payload = "boom", key = "y" } }
        local n, err, code = q:enqueue_many(batch)
        assert.is_nil(n)
        assert.matches("refused by a trigger", err)
        assert.equal("SQLITE_CONSTRAINT", code)
        assert.equal(0, q:stats().ready)
        assert.has_error(function() q:enqueue_many({ { kind = "k", payload = {} } }) end)
        assert.has_error(function() q:enqueue_many({ { kind = "k", payload = "p", key = 1 } }) end)
      end)

      it("claim_many leases up to limit due items of the kinds, oldest first, in one go, in id order", function()
        local late = q:enqueue("k", "late", { delay = 5 })
        local a = q:enqueue("k", "a")
        q:enqueue("other", "o")
        local b = q:enqueue("k", "b")
        local c = q:enqueue("k", "c")
        local items = q:claim_many("w", 30, { "k" }, 2)
        assert.same({ a, b }, { items[1].id, items[2].id })
        assert.same({ "k", "a", 1, 1030.0 }, { items[1].kind, items[1].payload, items[1].attempts, items[1].lease_until })
        assert.equal("w", q:get(a).worker)
        items = q:claim_many("w", 30, { "k" }, 10)
        assert.same({ c }, { items[1].id, items[2] and items[2].id })
        assert.same({}, q:claim_many("w", 30, { "k" }, 10))
        now = now + 5
        assert.equal(late, q:claim_many("w", 30, { "k" }, 10)[1].id)
        assert.equal(1, #q:claim_many("w", 30, nil, 10)) -- the other kind
        assert.has_error(function() q:claim_many("w", 30, { "k" }, 0) end)
        assert.has_error(function() q:claim_many("w", 30, {}, 1) end)
      end)

      it("claim_many re-claims expired leases and dead-letters an item whose last allowed lease expired", function()
        local id = q:enqueue("k", "p")
        for attempt = 1, 3 do
          local items = q:claim_many("w", 10, nil, 5)
          assert.same({ id, attempt }, { items[1].id, items[1].attempts })
          now = now + 11
        end
        assert.same({}, q:claim_many("w", 10, nil, 5))
        assert.equal("dead", q:get(id).state)
      end)

      it("complete_many marks done what the worker still holds and reports the leases it lost", function()
        local a, b, c = q:enqueue("k", "a"), q:enqueue("k", "b"), q:enqueue("k", "c")
        assert.equal(3, #q:claim_many("w1", 10, nil, 10))
        now = now + 11 -- the leases run out: another worker takes a and b, and hands a back
        assert.equal(a, q:claim("w2", 10).id)
        assert.equal(b, q:claim("w2", 10).id)
        assert.same({ "ready" }, { (q:fail(a, "w2", "handed back")) })
        local done, lost = q:complete_many({ a, b, c }, "w1")
        assert.same({ { c }, { a, b } }, { done, lost })
        assert.same({ "ready", "leased", "done" }, { q:get(a).state, q:get(b).state, q:get(c).state })
        assert.equal("w2", q:get(b).worker)
        assert.same({ { b }, {} }, { q:complete_many({ b }, "w2") })
        assert.same({ {}, { b } }, { q:complete_many({ b }, "w2") }) -- done already: not held any more
        assert.same({ {}, {} }, { q:complete_many({}, "w2") })
        assert.has_error(function() q:complete_many({ "1" }, "w2") end)
        assert.has_error(function() q:complete_many({ 1.5 }, "w2") end)
      end)

      it("complete_many runs more statements and claims the worker's next items in the same transaction", function()
        local a, b = q:enqueue("k", "a"), q:enqueue("k", "b")
        assert(db:exec("CREATE TABLE outcome (id INTEGER PRIMARY KEY, worker TEXT)"))
        assert.equal(2, #q:claim_many("w1", 10, { "k" }, 10))
        local c, d = q:enqueue("k", "c"), q:enqueue("other", "d")
        local done, lost, claimed = q:complete_many({ a, b }, "w1", {
          { "INSERT INTO outcome SELECT id, worker FROM ops_queue WHERE state = 'done' AND worker = ?", "w1" },
        }, { lease = 10, kinds = { "k" }, limit = 5 })
        assert.same({ { a, b }, {} }, { done, lost })
        assert.same({ { id = a, worker = "w1" }, { id = b, worker = "w1" } }, db:query("SELECT * FROM outcome ORDER BY id"))
        assert.same({ c }, { claimed[1].id, claimed[2] and claimed[2].id })
        assert.same({ "leased", "w1", 1010.0 }, { q:get(c).state, q:get(c).worker, claimed[1].lease_until })
        assert.equal("ready", q:get(d).state)
        -- nothing left of its kind: an empty claim; without claim, nothing is claimed
        assert.same({}, select(3, q:complete_many({ c }, "w1", nil, { lease = 10, kinds = { "k" }, limit = 5 })))
        assert.is_nil(select(3, q:complete_many({}, "w1")))
        -- a statement of more that fails undoes the completion and the claim
        local e = q:enqueue("k", "e")
        assert.equal(e, q:claim("w1", 10, { "k" }).id)
        local f = q:enqueue("k", "f")
        local r, err = q:complete_many({ e }, "w1", { { "INSERT INTO outcome VALUES (?, ?)", a, "dup" } },
          { lease = 10, kinds = { "k" }, limit = 5 })
        assert.is_nil(r)
        assert.matches("UNIQUE", err)
        assert.same({ "leased", "ready" }, { q:get(e).state, q:get(f).state })
        assert.has_error(function() q:complete_many({ e }, "w1", nil, { lease = 10, limit = 0 }) end)
        assert.has_error(function() q:complete_many({ e }, "w1", nil, { lease = 0, limit = 1 }) end)
      end)
    end)

    it("peek_many reads the items claim_many would lease, without leasing them", function()
      local late = q:enqueue("k", "late", { delay = 5 })
      local a, _, b = q:enqueue("k", "a"), q:enqueue("other", "o"), q:enqueue("k", "b")
      local c = q:enqueue("k", "c")
      local items = q:peek_many({ "k" }, 2)
      assert.same({ a, b }, { items[1].id, items[2].id })
      assert.same({ "k", "a", 0, "ready" }, { items[1].kind, items[1].payload, items[1].attempts, q:get(a).state })
      assert.same({ ready = 5, leased = 0, done = 0, dead = 0 }, q:stats())
      assert.same({ a, b }, { q:peek_many({ "k" }, 2)[1].id, q:peek_many({ "k" }, 2)[2].id }) -- still there
      assert.equal(4, #q:peek_many(nil, 10)) -- every kind; late is not due
      -- what a claim leases is not peeked again until its lease runs out
      assert.equal(3, #q:claim_many("w", 10, { "k" }, 10))
      assert.same({}, q:peek_many({ "k" }, 10))
      now = now + 11 -- a, b, c's leases ran out; late is due
      local ids = {}
      for i, it in ipairs(q:peek_many({ "k" }, 10)) do ids[i] = it.id end
      assert.same({ late, a, b, c }, ids)
      -- an item whose last allowed lease ran out is never peeked
      for _ = 2, 3 do
        q:claim_many("w", 10, { "k" }, 10)
        now = now + 11
      end
      assert.same({ late }, { q:peek_many({ "k" }, 10)[1].id, q:peek_many({ "k" }, 10)[2] })
      assert.has_error(function() q:peek_many({ "k" }, 0) end)
      assert.has_error(function() q:peek_many({}, 1) end)
    end)

    it("lease_ids leases those of the ids a claim could still take, as claim_many leases", function()
      local a, b, c = q:enqueue("k", "a"), q:enqueue("k", "b"), q:enqueue("k", "c")
      assert.equal(3, #q:peek_many(nil, 10))
      assert.equal(a, q:claim("w2", 10).id) -- another worker took a meanwhile
      local items = q:lease_ids({ c, a, b }, "w1", 30)
      assert.same({ b, c }, { items[1].id, items[2].id, items[3] and items[3].id })
      assert.same({ "b", 1, 1030.0 }, { items[1].payload, items[1].attempts, items[1].lease_until })
      assert.same({ "w2", "w1", "w1" }, { q:get(a).worker, q:get(b).worker, q:get(c).worker })
      assert.same({}, q:lease_ids({ b }, "w1", 30)) -- held: not taken twice
      assert.same({}, q:lease_ids({}, "w1", 30))
      assert.has_error(function() q:lease_ids({ "1" }, "w1", 30) end)
      assert.has_error(function() q:lease_ids({ a }, "w1", 0) end)
    end)

    it("complete_peeked marks done the peeked items no one took meanwhile, once, and runs more with it", function()
      assert(db:exec("CREATE TABLE outcome (id INTEGER PRIMARY KEY, worker TEXT)"))
      local a, b, c = q:enqueue("k", "a"), q:enqueue("k", "b"), q:enqueue("k", "c")
      assert.equal(3, #q:peek_many(nil, 10))
      assert.equal(a, q:claim("w2", 10).id)
      local more = { { "INSERT INTO outcome SELECT id, worker FROM ops_queue WHERE state = 'done' AND worker = ?", "w1" } }
      assert.same({ { b, c }, { a } }, { q:complete_peeked({ a, b, c }, "w1", more) })
      assert.same({ "leased", "done", "done" }, { q:get(a).state, q:get(b).state, q:get(c).state })
      assert.same({ "w1", 0 }, { q:get(b).worker, q:get(b).attempts })
      assert.same({ { id = b, worker = "w1" }, { id = c, worker = "w1" } }, db:query("SELECT * FROM outcome ORDER BY id"))
      assert.same({ {}, { b } }, { q:complete_peeked({ b }, "w3") }) -- done already
      -- a statement of more that fails undoes the completion
      local d = q:enqueue("k", "d")
      local r, err = q:complete_peeked({ d }, "w1", { { "INSERT INTO outcome VALUES (?, ?)", b, "dup" } })
      assert.is_nil(r)
      assert.matches("UNIQUE", err)
      assert.equal("ready", q:get(d).state)
      -- an item whose last allowed lease ran out is never peeked, and is dead-lettered when
      -- the pass is due, as a claim would do
      local once = assert(db:queue("once", { now = function() return now end, max_attempts = 1 }))
      local spent, e = once:enqueue("k", "spent"), once:enqueue("k", "e")
      assert.equal(spent, once:claim("w2", 10).id) -- the pass ran: due again in 10 s
      now = now + 11
      local peeked = once:peek_many(nil, 10)
      assert.same({ e }, { peeked[1].id, peeked[2] and peeked[2].id })
      assert.same({ { e }, {} }, { once:complete_peeked({ e }, "w1") })
      assert.same({ "dead", "lease expired after the last attempt" }, { once:get(spent).state, once:get(spent).last_error })
      assert.has_error(function() q:complete_peeked({ 1.5 }, "w1") end)
      assert.has_error(function() q:complete_peeked({ d }, nil) end)
    end)

    it("names the caller's line when a queue method is misused", function()
      local function where(f)
        local ok, err = pcall(f)
        assert.is_false(ok)
        return tostring(err):match("^[^:]*store_spec%.lua:%d+: ops%.store: ([%w_]+):")
      end
      assert.equal("peek_many", where(function() q:peek_many({}, 1) end))
      assert.equal("lease_ids", where(function() q:lease_ids({ "1" }, "w", 1) end))
      assert.equal("lease_ids", where(function() q:lease_ids({ 1 }, "w", 0) end))
      assert.equal("complete_peeked", where(function() q:complete_peeked({ 1.5 }, "w") end))
      assert.equal("complete_many", where(function() q:complete_many({ 1 }, "w", nil, { lease = 0, limit = 1 }) end))
      assert.equal("complete_many", where(function() q:complete_many({ 1 }, "w", nil, { lease = 1, kinds = {}, limit = 1 }) end))
      assert.equal("claim_many", where(function() q:claim_many("w", 1, {}, 1) end))
      assert.equal("claim", where(function() q:claim(nil, 1) end))
    end)

    it("claim_many and complete_many's claim give the items in id order whatever order the UPDATE returns", function()
      -- oldest available first is not id order here: the newest item is due first
      local late = q:enqueue("k", "late", { delay = 5 })
      local early = q:enqueue("k", "early")
      now = now + 10
      local mid = q:enqueue("k", "mid")
      local items = q:claim_many("w", 30, { "k" }, 10)
      assert.same({ late, early, mid }, { items[1].id, items[2].id, items[3].id })
      assert.same({ "late", "early", "mid" }, { items[1].payload, items[2].payload, items[3].payload })
      local x = q:enqueue("k", "x", { delay = 5 })
      local y = q:enqueue("k", "y")
      now = now + 10
      local _, _, claimed = q:complete_many({ late, early, mid }, "w", nil, { lease = 30, kinds = { "k" }, limit = 10 })
      assert.same({ x, y }, { claimed[1].id, claimed[2].id })
      assert.is_true(x < y)
    end)

    it("survives reopening the database", function()
      local path = dir .. "/s.db"
      local id = q:enqueue("k", "p", { key = "persist" })
      db:close()
      db = assert(store.open(path))
      local q2 = assert(db:queue("deploys"))
      assert.same({ id, "duplicate" }, { q2:enqueue("k", "p", { key = "persist" }) })
    end)
  end)

  describe("crash safety", function()
    local child_src = [[
      local store = require("ops.store")
      local db = assert(store.open(arg[1]))
      local q = assert(db:queue("crash"))
      for i = 1, 1000000 do
        local id = assert(q:enqueue("k", "payload " .. i, { key = "k" .. i }))
        io.stdout:write(id, "\n")
        io.stdout:flush()
      end
    ]]

    it("keeps every acknowledged enqueue after the writer is killed with SIGKILL", function()
      local script = dir .. "/child.lua"
      local f = assert(io.open(script, "w"))
      f:write(child_src)
      f:close()
      local path, out = dir .. "/crash.db", dir .. "/acked.txt"
      -- the child is opsrun itself, writing each id once its enqueue has committed
      local child = assert(ops.proc.spawn({assert(os.getenv("OPSRUN")), script, path},
        {stdout = {path = out}, stderr = {path = out .. ".err"}}))
      local function acked_lines()
        local f = io.open(out)
        if not f then return 0 end
        local _, n = f:read("a"):gsub("\n", "")
        f:close()
        return n
      end
      for _ = 1, 200 do
        if acked_lines() >= 50 then break end
        ops.sleep(0.05)
      end
      assert(child:kill("SIGKILL"))
      assert.are.equal("SIGKILL", child:wait().signal)
      local acked = {}
      local text = assert(io.open(out)):read("a")
      for line in text:gmatch("(%d+)\n") do acked[#acked + 1] = tonumber(line) end
      local errtext = assert(io.open(out .. ".err")):read("a")
      assert.equal("", errtext)
      assert.is_true(#acked >= 50, "child acknowledged only " .. #acked .. " items")

      local d = assert(store.open(path))
      assert.equal("ok", d:query("PRAGMA integrity_check")[1].integrity_check)
      local q = assert(d:queue("crash"))
      for _, id in ipairs(acked) do
        local item = q:get(id)
        assert.is_table(item, "acknowledged item " .. id .. " is missing")
      end
      local total = d:query("SELECT count(*) AS c FROM ops_queue")[1].c
      assert.is_true(total >= #acked and total <= #acked + 1)
      d:close()
    end)

    it("hands each item to exactly one of several worker processes", function()
      local path = dir .. "/shared.db"
      local d = assert(store.open(path))
      local q = assert(d:queue("work"))
      for i = 1, 300 do assert(q:enqueue("k", tostring(i))) end
      d:close()
      local script = dir .. "/worker.lua"
      local f = assert(io.open(script, "w"))
      f:write([[
        local store = require("ops.store")
        local db = assert(store.open(arg[1]))
        local q = assert(db:queue("work"))
        while not io.open(arg[1] .. ".go") do end -- start together
        while true do
          local item, err = q:claim(arg[2], 60)
          assert(item or err == nil, err)
          if not item then break end
          -- Work outside the transaction, as real workers do, so claims interleave.
          local t = os.clock()
          while os.clock() - t < 0.002 do end
          assert(q:complete(item.id, arg[2]))
          io.stdout:write(item.id, "\n")
        end
      ]])
      f:close()
      local workers_started = {}
      for w = 1, 3 do
        workers_started[w] = assert(ops.proc.spawn({assert(os.getenv("OPSRUN")), script, path, "w" .. w},
          {stdout = {path = dir .. "/w" .. w .. ".out"}, stderr = {path = dir .. "/w" .. w .. ".out.err"}}))
      end
      ops.sleep(0.2)
      assert(io.open(path .. ".go", "w")):close() -- start together
      for w = 1, 3 do assert.is_true(workers_started[w]:wait().ok) end
      local seen, count, workers = {}, 0, 0
      for w = 1, 3 do
        local err = assert(io.open(dir .. "/w" .. w .. ".out.err")):read("a")
        assert.equal("", err)
        local mine = 0
        for line in io.lines(dir .. "/w" .. w .. ".out") do
          mine = mine + 1
          local id = tonumber(line)
          assert.is_nil(seen[id], "item " .. line .. " was claimed twice")
          seen[id] = true
          count = count + 1
        end
        if mine > 0 then workers = workers + 1 end
      end
      assert.equal(300, count)
      assert.is_true(workers >= 2, "the workers never contended")
    end)
  end)
end)

describe("db:sync", function()
  local store = require "ops.store"

  it("flushes the WAL of a synchronous=normal connection, from a task", function()
    local path = os.tmpname()
    os.remove(path)
    local db = assert(store.open(path, {synchronous = "normal"}))
    assert(db:exec("CREATE TABLE t (x)"))
    for i = 1, 10 do assert(db:exec("INSERT INTO t VALUES (?)", i)) end
    assert.is_true(db:sync())
    -- another connection sees every row (the flush is about power cuts, which a test
    -- cannot make; this checks the call works and leaves the data intact)
    local other = assert(store.open(path))
    assert.are.equal(10, other:query("SELECT count(*) AS n FROM t")[1].n)
    other:close()
    db:close()
    for _, suffix in ipairs({"", "-wal", "-shm"}) do os.remove(path .. suffix) end
  end)

  it("has nothing to flush for a database in memory", function()
    local db = assert(store.open(":memory:"))
    assert.is_true(db:sync())
    db:close()
  end)
end)

describe("db:batch", function()
  local store = require "ops.store"
  local path, db
  before_each(function()
    path = os.tmpname()
    os.remove(path)
    db = assert(store.open(path, {synchronous = "normal", autocheckpoint = false}))
    assert(db:exec("CREATE TABLE t (id INTEGER PRIMARY KEY, x TEXT UNIQUE, y)"))
  end)
  after_each(function()
    db:close()
    for _, suffix in ipairs({"", "-wal", "-shm"}) do os.remove(path .. suffix) end
  end)

  it("runs the statements in order in one transaction and gives each one's rows, or its changes and rowid", function()
    local r = assert(db:batch({
      {"INSERT INTO t (x, y) VALUES (?, ?)", "a", 1.5},
      {"INSERT INTO t (x, y) VALUES (?, ?)", "b", nil, n = 3},
      {"INSERT INTO t (x) VALUES (?) ON CONFLICT DO NOTHING", "a"},
      {"UPDATE t SET y = ? WHERE x = ? RETURNING id, x, y", true, "b"},
      {"SELECT id, y FROM t ORDER BY id"},
    }))
    assert.same({changes = 1, rowid = 1}, r[1])
    assert.same({changes = 1, rowid = 2}, r[2])
    assert.equal(0, r[3].changes) -- the conflict inserted nothing
    assert.same({{id = 2, x = "b", y = 1}}, r[4])
    assert.same({{id = 1, y = 1.5}, {id = 2, y = 1}}, r[5])
    -- another connection sees them: they were committed
    local other = assert(store.open(path))
    assert.equal(2, other:query("SELECT count(*) AS n FROM t")[1].n)
    other:close()
    -- the WAL frames of its commits are counted (autocheckpoint = false)
    assert.is_true(db:wal_frames() > 0)
  end)

  it("gives rows as tables keyed by column name: NULLs absent, a repeated name's last value, wide rows, no rows", function()
    assert(db:batch({{"INSERT INTO t (x, y) VALUES ('a', NULL), ('b', 2), ('c', 'three')"}}))
    local cols = {}
    for i = 1, 300 do cols[i] = i .. " AS c" .. i end
    local r = assert(db:batch({
      {"SELECT id, x, y FROM t ORDER BY id"},
      {"SELECT x AS v, y AS v FROM t ORDER BY id"},
      {"SELECT " .. table.concat(cols, ", ") .. " FROM t WHERE id <= 2"},
      {"SELECT id, x FROM t WHERE id > 10"},
      {"SELECT x FROM t WHERE id = 1"},
    }))
    assert.same({{id = 1, x = "a"}, {id = 2, x = "b", y = 2}, {id = 3, x = "c", y = "three"}}, r[1])
    assert.same({{v = "a"}, {v = 2}, {v = "three"}}, r[2]) -- the later column wins; a NULL one sets nothing
    assert.equal(2, #r[3])
    for _, row in ipairs(r[3]) do
      for i = 1, 300 do assert.equal(i, row["c" .. i]) end
    end
    assert.same({}, r[4])
    assert.same({{x = "a"}}, r[5])
    -- the same through db:query
    assert.same(r[1], db:query("SELECT id, x, y FROM t ORDER BY id"))
  end)

  it("stores all of them or none: a failing statement rolls back the ones before it", function()
    local r, err, code = db:batch({
      {"INSERT INTO t (x) VALUES (?)", "a"},
      {"INSERT INTO t (x) VALUES (?)", "a"},
    })
    assert.is_nil(r)
    assert.equal("SQLITE_CONSTRAINT", code)
    assert.matches("^SQLITE_CONSTRAINT: UNIQUE constraint failed: t%.x %(statement 2 of the batch%)$", err)
    assert.equal(0, db:query("SELECT count(*) AS n FROM t")[1].n)
    -- the connection goes on working
    assert(db:batch({{"INSERT INTO t (x) VALUES (?)", "a"}}))
    assert.equal(1, db:query("SELECT count(*) AS n FROM t")[1].n)
  end)

  it("raises on misuse: no statement, two in one entry, a wrong number of values, a value it cannot bind", function()
    assert.has_error(function() db:batch("SELECT 1") end)
    assert.has_error(function() db:batch({}) end)
    assert.has_error(function() db:batch({{42}}) end)
    assert.has_error(function() db:batch({{"SELECT ?", {}}}) end)
    assert.has_error(function() db:batch({{"SELECT 1; SELECT 2"}}) end, "ops.store: SQLITE_MISUSE: each entry of a batch is one statement (statement 1 of the batch)")
    assert.has_error(function() db:batch({{"SELECT ?, ?", 1}}) end,
      "ops.store: SQLITE_MISUSE: the statement has 2 parameter(s) but 1 value(s) were given (statement 1 of the batch)")
    assert.has_error(function() db:batch({{"   "}}) end)
    -- nothing of a refused batch was kept, and the connection is free again
    assert(db:batch({{"INSERT INTO t (x) VALUES (?)", "z"}}))
  end)

  it("holds the connection's other tasks off while it runs on the thread pool", function()
    local order = {}
    local batcher = ops.spawn(function()
      assert(db:batch({{"INSERT INTO t (x) VALUES (?)", "first"}}))
      order[#order + 1] = "batch"
    end)
    local writer = ops.spawn(function()
      ops.sleep(0) -- the batch has started (it is on the thread pool)
      assert(db:exec("INSERT INTO t (x) VALUES (?)", "second"))
      order[#order + 1] = "insert"
    end)
    assert(batcher:wait(10))
    assert(writer:wait(10))
    assert.same({"batch", "insert"}, order)
    assert.same({{x = "first"}, {x = "second"}}, db:query("SELECT x FROM t ORDER BY id"))
  end)

  -- a batch that keeps the batch thread busy for a while (tens of ms), so that the
  -- batches sent meanwhile wait for it together, and are then run as one transaction
  local SLOW = {"WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 400000) "
    .. "SELECT count(*) AS n FROM c"}

  it("runs the batches of several tasks in the order they came, each all or nothing, one failing alone", function()
    local done = {}
    local function send(name, statements, opts)
      return ops.spawn(function()
        local r, err = db:batch(statements, opts)
        done[#done + 1] = name
        return r, err
      end)
    end
    local slow = send("slow", {SLOW, {"INSERT INTO t (x) VALUES (?)", "s"}})
    ops.sleep(0) -- it is on the batch thread
    local a = send("a", {{"INSERT INTO t (x) VALUES (?)", "a1"}, {"INSERT INTO t (x) VALUES (?)", "a2"}})
    local bad = send("bad", {{"INSERT INTO t (x) VALUES (?)", "b1"}, {"INSERT INTO t (x) VALUES (?)", "a1"}})
    local c = send("c", {{"INSERT INTO t (x) VALUES (?)", "c1"}, {"SELECT count(*) AS n FROM t"}}, {sync = true})
    local d = send("d", {{"UPDATE t SET y = 'seen' WHERE x = ? RETURNING x", "c1"}})
    for _, t in ipairs({slow, a, bad, c, d}) do assert(t:wait(30)) end
    -- answered in the order they ran, but for the durable one (c), answered when the WAL is
    -- on disk: possibly after d
    assert.same({"slow", "a", "bad"}, {done[1], done[2], done[3]})
    local _, r = slow:wait()
    assert.equal(400000, r[1][1].n)
    _, r = a:wait()
    assert.same({changes = 1, rowid = 3}, r[2])
    local _, rb, errb = bad:wait()
    assert.is_nil(rb)
    assert.matches("^SQLITE_CONSTRAINT: UNIQUE constraint failed: t%.x %(statement 2 of the batch%)$", errb)
    _, r = c:wait()
    assert.equal(4, r[2][1].n) -- s, a1, a2 and its own c1: nothing of the failed batch
    _, r = d:wait()
    assert.same({{x = "c1"}}, r[1]) -- it sees the batches before it
    assert.same({{x = "s"}, {x = "a1"}, {x = "a2"}, {x = "c1", y = "seen"}}, db:query("SELECT x, y FROM t ORDER BY id"))
    -- another connection sees them all: committed
    local other = assert(store.open(path))
    assert.equal(4, other:query("SELECT count(*) AS n FROM t")[1].n)
    other:close()
  end)

  it("lets a query that only reads run while batches are in flight; one that writes waits for them", function()
    local order = {}
    local batcher = ops.spawn(function()
      assert(db:batch({SLOW, {"INSERT INTO t (x) VALUES (?)", "batched"}}))
      order[#order + 1] = "batch"
    end)
    local reader = ops.spawn(function()
      ops.sleep(0) -- the batch is on its thread
      local rows = assert(db:query("SELECT count(*) AS n FROM t"))
      order[#order + 1] = "read " .. rows[1].n
    end)
    local writer = ops.spawn(function()
      ops.sleep(0)
      local rows = assert(db:query("INSERT INTO t (x) VALUES (?) RETURNING id", "queried"))
      order[#order + 1] = "write " .. rows[1].id
    end)
    for _, t in ipairs({batcher, reader, writer}) do assert(t:wait(30)) end
    -- the read saw what was committed before the batch; the write came after it
    assert.same({"read 0", "batch", "write 2"}, order)
  end)

  it("runs inside the caller's transaction as a savepoint: rolled back with it", function()
    local ok = pcall(db.transaction, db, function()
      assert(db:batch({{"INSERT INTO t (x) VALUES (?)", "inner"}}))
      assert.equal(1, db:query("SELECT count(*) AS n FROM t")[1].n)
      error("abort")
    end)
    assert.is_false(ok)
    assert.equal(0, db:query("SELECT count(*) AS n FROM t")[1].n)
    db:transaction(function()
      assert.is_nil(db:batch({{"INSERT INTO t (x) VALUES (?)", "kept"}, {"INSERT INTO t (x) VALUES (?)", "kept"}}))
      assert(db:batch({{"INSERT INTO t (x) VALUES (?)", "kept"}}))
    end)
    assert.same({{x = "kept"}}, db:query("SELECT x FROM t"))
  end)

  it("with sync, commits as synchronous=FULL and leaves the connection's setting as it was", function()
    assert(db:batch({{"INSERT INTO t (x) VALUES (?)", "durable"}}, {sync = true}))
    assert.equal(1, db:query("PRAGMA synchronous")[1].synchronous) -- NORMAL, as opened
    -- run here (inside no task), the same
    local co = coroutine.create(function() return db:batch({{"INSERT INTO t (x) VALUES (?)", "here"}}, {sync = true}) end)
    assert.is_true((coroutine.resume(co)))
    assert.equal(1, db:query("PRAGMA synchronous")[1].synchronous)
    assert.equal(2, db:query("SELECT count(*) AS n FROM t")[1].n)
    assert.has_error(function() db:batch({{"SELECT 1"}}, "sync") end)
  end)

  it("runs on the connection itself for a database in memory, and outside a task", function()
    local mem = assert(store.open(":memory:"))
    assert(mem:exec("CREATE TABLE m (x)"))
    assert.same({{changes = 1, rowid = 1}, {{x = 7}}}, mem:batch({{"INSERT INTO m VALUES (?)", 7}, {"SELECT x FROM m"}}))
    mem:close()
    local co = coroutine.create(function() return db:batch({{"INSERT INTO t (x) VALUES (?)", "plain"}}) end)
    local ok, r = coroutine.resume(co)
    assert.is_true(ok)
    assert.same({{changes = 1, rowid = 1}}, r)
  end)

  it("finishes a batch whose task was cancelled, and a db closed meanwhile frees its connection after it", function()
    local t = ops.spawn(function() db:batch({{"INSERT INTO t (x) VALUES (?)", "cancelled"}}) end)
    ops.sleep(0)
    t:cancel()
    -- the batch still runs to its end (it is committed), and the connection is usable
    local after = ops.spawn(function() return db:batch({{"SELECT count(*) AS n FROM t"}}) end)
    local ok, r = after:wait(10)
    assert.is_true(ok)
    assert.equal(1, r[1][1].n)
    local t2 = ops.spawn(function() db:batch({{"INSERT INTO t (x) VALUES (?)", "closing"}}) end)
    ops.sleep(0)
    t2:cancel()
    db:close()
    ops.sleep(0.2) -- the batch ends on the thread pool, then its connection is closed
    db = assert(store.open(path))
    assert.equal(2, db:query("SELECT count(*) AS n FROM t")[1].n)
  end)

  it("counts the batches its thread ran, their statements and their time by phase; a flush only when durable", function()
    local phases = {"waiting", "committing", "flushing", "returning"}
    local s = db:batch_stats()
    assert.same({batches = 0, statements = 0, waiting = 0, committing = 0, flushing = 0, returning = 0}, s)
    assert(db:batch({{"INSERT INTO t (x) VALUES (?)", "a"}, {"INSERT INTO t (x) VALUES (?)", "b"}}))
    assert.is_nil((db:batch({{"INSERT INTO t (x) VALUES (?)", "a"}}))) -- fails (UNIQUE): still a batch that ran
    s = db:batch_stats()
    assert.equal(2, s.batches)
    assert.equal(3, s.statements)
    assert.equal(0, s.flushing) -- neither was durable: no flush, no time in it
    assert.is_true(s.committing > 0)
    for _, p in ipairs(phases) do assert.is_true(s[p] >= 0, p) end
    assert(db:batch({{"INSERT INTO t (x) VALUES (?)", "c"}}, {sync = true}))
    local d = db:batch_stats()
    assert.equal(3, d.batches)
    assert.is_true(d.flushing > 0) -- the WAL was synced, and that took time
    for _, p in ipairs(phases) do assert.is_true(d[p] >= s[p], p) end
    -- a batch run inside the caller's transaction is not one of the thread's
    db:transaction(function() assert(db:batch({{"INSERT INTO t (x) VALUES (?)", "d"}})) end)
    assert.equal(3, db:batch_stats().batches)
    -- a fresh connection starts from nothing; a closed one refuses
    local other = assert(store.open(path))
    assert.equal(0, other:batch_stats().batches)
    other:close()
    assert.has_error(function() other:batch_stats() end)
  end)
end)

describe("db:checkpoint and autocheckpoint = false", function()
  local store = require "ops.store"
  local path
  before_each(function()
    path = os.tmpname()
    os.remove(path)
  end)
  after_each(function()
    for _, suffix in ipairs({"", "-wal", "-shm"}) do os.remove(path .. suffix) end
  end)

  it("lets the WAL grow past SQLite's autocheckpoint, counts its frames, and checkpoints it on the thread pool", function()
    local db = assert(store.open(path, {synchronous = "normal", autocheckpoint = false}))
    assert(db:exec("CREATE TABLE t (x)"))
    local blob = string.rep("x", 3000) -- about a page per row
    for i = 1, 1200 do assert(db:exec("INSERT INTO t VALUES (?)", blob .. i)) end
    local frames = db:wal_frames()
    assert.is_true(frames > 1200, "SQLite checkpointed by itself: " .. frames .. " frames")
    local wal, done = db:checkpoint()
    assert.equal(frames, wal)
    assert.equal(wal, done)
    -- everything is in the database now: the next commit starts the WAL again
    assert(db:exec("INSERT INTO t VALUES (1)"))
    assert.is_true(db:wal_frames() < 10, "the WAL did not start again: " .. db:wal_frames())
    local other = assert(store.open(path))
    assert.equal(1201, other:query("SELECT count(*) AS n FROM t")[1].n)
    other:close()
    db:close()
  end)

  it("holds the connection's other tasks off while it runs, and lets them go when it ends or is cancelled", function()
    local db = assert(store.open(path, {synchronous = "normal", autocheckpoint = false}))
    assert(db:exec("CREATE TABLE t (x)"))
    local blob = string.rep("x", 3000)
    for i = 1, 300 do assert(db:exec("INSERT INTO t VALUES (?)", blob .. i)) end
    local order = {}
    local checkpointer = ops.spawn(function()
      local wal, done = db:checkpoint()
      order[#order + 1] = "checkpoint " .. tostring(wal == done)
    end)
    local writer = ops.spawn(function()
      ops.sleep(0) -- the checkpoint has started (it is on the thread pool)
      assert(db:exec("INSERT INTO t VALUES (1)"))
      order[#order + 1] = "insert"
    end)
    assert(checkpointer:wait(10))
    assert(writer:wait(10))
    assert.same({"checkpoint true", "insert"}, order)
    -- the WAL started again: nothing was written beside the checkpoint
    assert.is_true(db:wal_frames() < 10, "the WAL did not start again: " .. db:wal_frames())
    -- inside a transaction of the same task: no deadlock
    db:transaction(function() assert.is_truthy(db:checkpoint()) end)
    -- a checkpoint whose task is cancelled leaves the connection usable
    for i = 1, 300 do assert(db:exec("INSERT INTO t VALUES (?)", blob .. i)) end
    local t = ops.spawn(function() db:checkpoint() end)
    ops.sleep(0)
    t:cancel()
    local done = ops.spawn(function() return db:exec("INSERT INTO t VALUES (2)") end)
    assert.is_truthy(done:wait(10))
    db:close()
  end)

  it("checkpoints what no reader still needs, and says how far it got", function()
    local db = assert(store.open(path, {autocheckpoint = false}))
    assert(db:exec("CREATE TABLE t (x)"))
    assert(db:exec("INSERT INTO t VALUES (1)"))
    local reader = assert(store.open(path))
    assert(reader:exec("BEGIN"))
    assert.equal(1, reader:query("SELECT count(*) AS n FROM t")[1].n) -- holds its snapshot
    for i = 2, 20 do assert(db:exec("INSERT INTO t VALUES (?)", i)) end
    local wal, done = db:checkpoint()
    assert.is_true(done < wal, done .. " of " .. wal)
    assert(reader:exec("COMMIT"))
    wal, done = db:checkpoint()
    assert.equal(wal, done)
    reader:close()
    db:close()
  end)

  it("keeps SQLite's autocheckpoint by default (wal_frames is not counted then)", function()
    local db = assert(store.open(path))
    assert(db:exec("CREATE TABLE t (x)"))
    local blob = string.rep("x", 3000)
    for i = 1, 1200 do assert(db:exec("INSERT INTO t VALUES (?)", blob .. i)) end
    assert.equal(0, db:wal_frames())
    db:close()
    assert.has_error(function() store.open(path, {autocheckpoint = "no"}) end)
  end)

  it("answers nil, a message naming the file, and a code when the checkpoint cannot run", function()
    local db = assert(store.open(path, {synchronous = "normal", autocheckpoint = false}))
    assert(db:exec("CREATE TABLE t (x)"))
    assert(db:exec("INSERT INTO t VALUES (1)"))
    os.remove(path) -- this connection keeps its file open; the checkpoint's cannot open it
    local wal, err, code = db:checkpoint()
    assert.is_nil(wal)
    assert.equal("SQLITE_CANTOPEN", code)
    assert.matches("^SQLITE_CANTOPEN: cannot checkpoint " .. path:gsub("%p", "%%%0") .. ": ", err)
    db:close()
  end)

  it("has nothing to checkpoint in memory, and refuses to run outside a task", function()
    local db = assert(store.open(":memory:"))
    assert.same({0, 0}, {db:checkpoint()})
    local co = coroutine.create(function() return db:checkpoint() end)
    local ok, err = coroutine.resume(co)
    assert.is_false(ok)
    assert.matches("must be called from a task", err)
    db:close()
  end)

  it("refuses to run outside a task", function()
    local db = assert(store.open(":memory:"))
    local co = coroutine.create(function() return db:sync() end)
    local ok, err = coroutine.resume(co)
    assert.is_false(ok)
    assert.matches("must be called from a task", err)
    db:close()
  end)
end)
