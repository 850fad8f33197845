-- ops.store: the durable store on SQLite (WAL, synchronous=FULL by default).
--
-- The C module (ops.core.store) gives connections, statements and a statement
-- cache; this file adds transactions, migrations and the durable work queue.
-- Many tasks share one connection on one thread, and a task may yield inside a
-- transaction, so each db carries a task-aware mutex: transaction() holds it
-- for its whole duration, and exec/query/exec_script from any other task wait
-- for it rather than running inside someone else's transaction.

local core = require("ops.core.store")
local sync = require("ops.sync")
local current_task = require("ops.core.sched").current

local pack, unpack = table.pack, table.unpack
local running = coroutine.running

local store = { now = core.now }

local methods = core.methods
local c_exec, c_query, c_exec_script = methods.exec, methods.query, methods.exec_script

-- Per-connection Lua state, keyed weakly by the db userdata.
local states = setmetatable({}, { __mode = "k" })

local function state_of(db)
  local st = states[db]
  if not st then
    st = { mutex = sync.mutex(), depth = 0, batches = 0 }
    states[db] = st
  end
  return st
end

-- ops.store.open(path [, opts]) -> db | nil, err, code
function store.open(path, opts)
  local db, err, code = core.open(path, opts)
  if not db then return nil, err, code end
  state_of(db)
  return db
end

local function guarded(fn)
  return function(db, ...)
    local m = state_of(db).mutex
    if not m:held_by_other() then return fn(db, ...) end
    m:lock()
    local r = pack(pcall(fn, db, ...))
    m:unlock()
    if not r[1] then error(r[2], 0) end
    return unpack(r, 2, r.n)
  end
end

methods.exec = guarded(c_exec)
methods.exec_script = guarded(c_exec_script)

-- While only batches hold the connection (BATCHING, below: they run on a connection of
-- their own, and no transaction is open on this one), a query that only reads runs at
-- once: it sees what was committed, as SQLite's WAL gives readers. One that writes waits
-- its turn, as exec does.
local c_read = methods._read
methods._read = nil
local BATCHING
local guarded_query = guarded(c_query)
function methods.query(db, ...)
  local st = states[db]
  if st and st.mutex.owner == BATCHING then
    local rows, err, code = c_read(db, ...)
    if rows ~= false then return rows, err, code end
  end
  return guarded_query(db, ...)
end

-- db:checkpoint() -> wal_frames, checkpointed_frames | nil, err, code
-- The checkpoint itself runs on the thread pool (core); meanwhile this connection's other
-- tasks are held off as by a transaction, so that nothing of this process writes beside
-- it: it can then cover the whole WAL, and the next commit starts the WAL again. Inside
-- the caller's own transaction it runs as it is (the caller already holds them off).
local c_checkpoint = methods.checkpoint
function methods:checkpoint()
  local m = state_of(self).mutex
  local co = running()
  if m.owner == co then return c_checkpoint(self) end
  m:lock()
  local unlock <close> = setmetatable({}, { __close = function() m:unlock(co) end })
  return c_checkpoint(self)
end

-- Raises a database failure as its "SQLITE_CODE: message" string.
local function must(first, err)
  if first == nil then error(err, 0) end
  return first
end

-- Ends a transaction level that did not complete normally (fn raised, or the
-- task was cancelled and its <close> variables are being run).
local Level = {}
Level.__index = Level
function Level.__close(lvl)
  if lvl.finished then return end
  lvl.finished = true
  local db, st = lvl.db, lvl.st
  if lvl.savepoint then
    c_exec(db, "ROLLBACK TO " .. lvl.savepoint)
    c_exec(db, "RELEASE " .. lvl.savepoint)
    st.depth = st.depth - 1
  else
    -- SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR...).
    if db:in_transaction() then c_exec(db, "ROLLBACK") end
    st.depth = 0
    st.mutex:unlock(lvl.owner)
  end
end

-- db:transaction(fn, ...) -> fn's results; raises fn's error after rolling back.
-- Outermost level: BEGIN IMMEDIATE ... COMMIT under the db mutex; nested levels
-- (same task) use savepoints.
function methods:transaction(fn, ...)
  local st = state_of(self)
  local co = running()
  local lvl = setmetatable({ db = self, st = st, owner = co }, Level)
  if st.depth > 0 and st.mutex.owner == co then
    -- Savepoint names come from an integer depth, never from caller data.
    lvl.savepoint = "ops_sp" .. (st.depth + 1)
    must(c_exec(self, "SAVEPOINT " .. lvl.savepoint))
    st.depth = st.depth + 1
  else
    st.mutex:lock()
    local ok, err = c_exec(self, "BEGIN IMMEDIATE")
    if not ok then
      st.mutex:unlock()
      error(err, 0)
    end
    st.depth = 1
  end
  local guard <close> = lvl
  local results = pack(fn(self, ...))
  if lvl.savepoint then
    local ok, err = c_exec(self, "RELEASE " .. lvl.savepoint)
    if not ok then error(err, 0) end -- guard rolls back to the savepoint
    st.depth = st.depth - 1
  else
    local ok, err = c_exec(self, "COMMIT")
    if not ok then error(err, 0) end -- guard rolls back and unlocks
    st.depth = 0
    st.mutex:unlock(co)
  end
  lvl.finished = true
  return unpack(results, 1, results.n)
end

local function table_exists(db, name)
  local rows = must(c_query(db, "SELECT 1 AS x FROM sqlite_master WHERE type = 'table' AND name = ?", name))
  return rows[1] ~= nil
end

local function schema_version(db, component)
  if not component then
    return must(c_query(db, "PRAGMA user_version"))[1].user_version
  end
  if not table_exists(db, "ops_schema_versions") then return 0 end
  local row = must(c_query(db, "SELECT version FROM ops_schema_versions WHERE component = ?", component))[1]
  return row and row.version or 0
end

local function set_schema_version(db, component, v)
  if not component then
    -- PRAGMA takes no parameters; v is an integer we computed, not caller text.
    must(c_exec(db, string.format("PRAGMA user_version = %d", v)))
    return
  end
  must(c_exec_script(db, [[CREATE TABLE IF NOT EXISTS ops_schema_versions (
    component TEXT PRIMARY KEY, version INTEGER NOT NULL)]]))
  must(c_exec(db, "INSERT INTO ops_schema_versions (component, version) VALUES (?, ?) "
    .. "ON CONFLICT (component) DO UPDATE SET version = excluded.version", component, v))
end

-- db:migrate(migrations [, {component = name}]) -> applied, version | nil, err, code
function methods:migrate(migrations, opts)
  if type(migrations) ~= "table" then
    error("ops.store: migrate expects an array of SQL scripts or functions", 2)
  end
  local component = opts and opts.component
  local label = component and ("'" .. component .. "' ") or ""
  local ok, current = pcall(schema_version, self, component)
  if not ok then return nil, current, current:match("^(SQLITE_%u+):") or "SQLITE_ERROR" end
  if current > #migrations then
    return nil, string.format("ESCHEMA: database %sschema is at version %d but only %d migrations are known; "
      .. "this database was written by a newer opsrun", label, current, #migrations), "ESCHEMA"
  end
  local applied = 0
  for v = current + 1, #migrations do
    local step = migrations[v]
    local ok2, err = pcall(self.transaction, self, function()
      -- Another process may have migrated while we waited for the write lock.
      if schema_version(self, component) >= v then return end
      if type(step) == "function" then
        step(self)
      else
        must(c_exec_script(self, step))
      end
      set_schema_version(self, component, v)
      applied = applied + 1
    end)
    if not ok2 then
      local code = type(err) == "string" and err:match("^(SQLITE_%u+):") or "EMIGRATION"
      return nil, string.format("%s: migration %s%d failed: %s", code, label, v, tostring(err)), code
    end
  end
  return applied, #migrations
end

-- ---- durable queue ---------------------------------------------------------

-- The state's check is written as comparisons, not `state IN (...)`: SQLite 3.40 checks
-- an IN list through an ephemeral index it builds for every statement that writes a row
-- (a row of a 32-row claim: 1.4 against 0.7 us).
local function queue_table(name)
  return string.format([[
  CREATE TABLE %s (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    key TEXT,
    state TEXT NOT NULL CHECK (state = 'ready' OR state = 'leased' OR state = 'done' OR state = 'dead'),
    attempts INTEGER NOT NULL DEFAULT 0,
    -- ready: when it may be claimed; leased: when the lease ends; NULL once finished
    available_at REAL,
    worker TEXT,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
  );
  ]], name)
end
local QUEUE_INDEXES = [[
  CREATE UNIQUE INDEX ops_queue_key ON ops_queue (queue, key) WHERE key IS NOT NULL;
  CREATE INDEX ops_queue_available ON ops_queue (queue, available_at) WHERE available_at IS NOT NULL;
]]
local QUEUE_COLUMNS = "id, queue, kind, payload, key, state, attempts, available_at, worker, last_error, "
  .. "created_at, updated_at"

local QUEUE_MIGRATIONS = {
  queue_table("ops_queue") .. QUEUE_INDEXES,
  -- 2: a queue made by opsrun before 2026-11-24 has the IN check: its table is made again
  -- (SQLite cannot change a check in place) with the same rows, ids and id counter
  function(db)
    local row = must(c_query(db, "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'ops_queue'"))[1]
    if not row then error("the table ops_queue is missing, though its schema says version 1", 0) end
    if not row.sql:find("state IN (", 1, true) then return end
    local seq = must(c_query(db, "SELECT seq FROM sqlite_sequence WHERE name = 'ops_queue'"))[1]
    must(c_exec_script(db, queue_table("ops_queue_rebuilt")
      .. "INSERT INTO ops_queue_rebuilt (" .. QUEUE_COLUMNS .. ") SELECT " .. QUEUE_COLUMNS .. " FROM ops_queue;"
      .. "DROP TABLE ops_queue; ALTER TABLE ops_queue_rebuilt RENAME TO ops_queue;" .. QUEUE_INDEXES))
    if seq then -- ids taken by rows since deleted are not given again
      must(c_exec(db, "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'ops_queue'", seq.seq))
      must(c_exec(db, "INSERT INTO sqlite_sequence (name, seq) SELECT 'ops_queue', ? "
        .. "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'ops_queue')", seq.seq))
    end
  end,
}

local function check_opts(opts, where)
  if opts ~= nil and type(opts) ~= "table" then
    error("ops.store: " .. where .. ": options must be a table", 3)
  end
  return opts or {}
end

-- Runs fn in a transaction; database failures become nil, err, code.
local function atomically(db, fn)
  local r = pack(pcall(db.transaction, db, fn))
  if r[1] then return unpack(r, 2, r.n) end
  local code = type(r[2]) == "string" and r[2]:match("^(SQLITE_%u+):")
  if code then return nil, r[2], code end
  error(r[2], 0)
end

-- db:batch(statements [, {sync = true}]) -> results | nil, err, code
-- statements: an array of {sql, arg, ...} (set n = 1 + the number of arguments when one
-- of them is nil). Runs them in order in one transaction (all or nothing) and gives one
-- result per statement: its rows when it has result columns (SELECT, ... RETURNING), else
-- {changes =, rowid =}. From a task, outside a transaction of its own, they run on a
-- thread and a connection of the db's own, so the loop goes on meanwhile (the batches of
-- several tasks in the order they came, those waiting together as one transaction, each
-- in a savepoint); this connection's writers wait for them, as for a transaction, and
-- its queries that only read do not. Inside the
-- caller's transaction (as a savepoint), outside a task, or for a database in memory,
-- they run here. sync: the commit is on disk when batch returns, as with
-- synchronous=FULL, whatever the connection's setting (inside the caller's transaction,
-- the caller's commit decides).
local c_batch = methods._batch
methods._batch = nil

-- While batches are on their thread, the mutex is held by this token, not by a task: a
-- batch of another task goes along (the core runs batches in the order they came, those
-- waiting together as one transaction), unless some task already waits in line for the
-- connection (a transaction, exec, a query that writes, a checkpoint): then it waits its
-- turn too. The last batch back lets go.
BATCHING = setmetatable({}, { __name = "ops.store batches in flight" })

local function batch_offloaded(db, st, statements, durable)
  local m = st.mutex
  if m.owner == BATCHING and m.head > m.tail then
    st.batches = st.batches + 1
  else
    m:lock()
    m.owner = BATCHING
    st.batches = 1
  end
  local leave <close> = setmetatable({}, { __close = function()
    st.batches = st.batches - 1
    if st.batches == 0 then m:unlock(BATCHING) end
  end })
  return c_batch(db, statements, false, durable)
end

local function batch_here(db, statements)
  local r, e = c_batch(db, statements, true)
  if not r then error(e, 0) end
  return r
end

function methods:batch(statements, opts)
  if type(statements) ~= "table" then
    error("ops.store: batch expects an array of {sql, arg, ...}", 2)
  end
  opts = check_opts(opts, "batch")
  local durable = opts.sync == true
  local st = state_of(self)
  local co = running()
  local nested = st.depth > 0 and st.mutex.owner == co
  local results, err, code = false, nil, nil
  if not nested and current_task() and coroutine.isyieldable() then
    results, err, code = batch_offloaded(self, st, statements, durable)
  end
  if results == false then -- run here, as a transaction (a savepoint inside the caller's)
    local level = durable and not nested and must(c_query(self, "PRAGMA synchronous"))[1].synchronous
    if level then must(c_exec(self, "PRAGMA synchronous=FULL")) end
    local restore <close> = level and setmetatable({}, { __close = function()
      c_exec(self, string.format("PRAGMA synchronous=%d", level))
    end }) or nil
    results, err, code = atomically(self, function() return batch_here(self, statements) end)
  end
  if code == "SQLITE_MISUSE" then error("ops.store: " .. err, 2) end
  return results, err, code
end

local DEFAULTS = { max_attempts = 5, backoff = 1, max_backoff = 3600, dead_letter_every = 10 }

local Queue = {}
Queue.__index = Queue

-- db:queue(name [, opts]) -> queue | nil, err, code
-- opts: now (clock function, float seconds), max_attempts, backoff, max_backoff,
-- dead_letter_every (seconds of that clock between two passes of dead-lettering).
function methods:queue(name, opts)
  if type(name) ~= "string" or name == "" then
    error("ops.store: queue name must be a non-empty string", 2)
  end
  opts = check_opts(opts, "queue")
  local every = opts.dead_letter_every
  if every ~= nil and (type(every) ~= "number" or every < 0 or every ~= every) then
    error("ops.store: queue: dead_letter_every must be a number of seconds (0: at every claim)", 2)
  end
  local st = state_of(self)
  if not st.queue_schema then
    local ok, err, code = self:migrate(QUEUE_MIGRATIONS, { component = "ops.queue" })
    if not ok then return nil, err, code end
    st.queue_schema = true
  end
  return setmetatable({
    db = self,
    name = name,
    now = opts.now or core.now,
    max_attempts = opts.max_attempts or DEFAULTS.max_attempts,
    backoff = opts.backoff or DEFAULTS.backoff,
    max_backoff = opts.max_backoff or DEFAULTS.max_backoff,
    dead_letter_every = opts.dead_letter_every or DEFAULTS.dead_letter_every,
    dead_letter_at = nil, -- when a claim next runs the dead-lettering pass (nil: the first)
  }, Queue)
end

-- ops.store.queue(db, name [, opts]): the same as db:queue(name, opts).
function store.queue(db, name, opts) return methods.queue(db, name, opts) end

-- A new item, unless its key is taken (then the id of the one that has it is looked up).
local ENQUEUE_SQL = "INSERT INTO ops_queue (queue, kind, payload, key, state, available_at, created_at, updated_at) "
  .. "VALUES (?, ?, ?, ?, 'ready', ?, ?, ?) ON CONFLICT DO NOTHING"
local DUPLICATE_SQL = "SELECT id FROM ops_queue WHERE queue = ? AND key = ?"

-- q:enqueue(kind, payload [, {key =, delay =}]) -> id, "queued" | id, "duplicate" | nil, err, code
function Queue:enqueue(kind, payload, opts)
  if type(kind) ~= "string" then error("ops.store: enqueue: kind must be a string", 2) end
  if type(payload) ~= "string" then
    error("ops.store: enqueue: payload must be a string (encode tables as JSON first)", 2)
  end
  opts = check_opts(opts, "enqueue")
  local key, delay = opts.key, opts.delay or 0
  if key ~= nil and type(key) ~= "string" then error("ops.store: enqueue: key must be a string", 2) end
  local now = self.now()
  local db = self.db
  local changes, id_or_err, code = db:exec(ENQUEUE_SQL, self.name, kind, payload, key, now + delay, now, now)
  if changes == nil then return nil, id_or_err, code end
  if changes == 1 then return id_or_err, "queued" end
  local rows, err, code2 = db:query(DUPLICATE_SQL, self.name, key)
  if not rows then return nil, err, code2 end
  if not rows[1] then
    return nil, "SQLITE_CONSTRAINT: enqueue was refused by the database", "SQLITE_CONSTRAINT"
  end
  return rows[1].id, "duplicate"
end

-- q:enqueue_many(entries [, {sync = true}]) -> count | nil, err, code
-- entries: an array of {kind =, payload =, key =}; sets each entry's id and outcome
-- ("queued" or "duplicate"), as enqueue would. All or nothing: one db:batch (off the loop
-- from a task; a savepoint inside the caller's transaction) of one INSERT per entry;
-- then, for an entry whose key was taken (a redelivery: rare), the id of the item that has
-- it, read once the entries are stored. sync: as db:batch's (on disk when it returns).
function Queue:enqueue_many(entries, opts)
  if type(entries) ~= "table" then error("ops.store: enqueue_many: entries must be an array", 2) end
  local n = #entries
  for i = 1, n do
    local e = entries[i]
    if type(e) ~= "table" or type(e.kind) ~= "string" or type(e.payload) ~= "string"
      or (e.key ~= nil and type(e.key) ~= "string") then
      error("ops.store: enqueue_many: entry " .. i .. " needs a string kind and payload (and a string key or none)", 2)
    end
  end
  if n == 0 then return 0 end
  local name, now = self.name, self.now()
  local statements = {}
  for i = 1, n do
    local e = entries[i]
    statements[i] = { ENQUEUE_SQL, name, e.kind, e.payload, e.key, now, now, now, n = 8 }
  end
  local results, err, code = self.db:batch(statements, opts)
  if not results then return nil, err, code end
  for i = 1, n do
    local e, inserted = entries[i], results[i]
    if inserted.changes == 1 then
      e.id, e.outcome = inserted.rowid, "queued"
    else
      -- the item holding the key is stored (before this call, or by an earlier entry)
      local rows, qerr, qcode = self.db:query(DUPLICATE_SQL, name, e.key)
      if not rows then return nil, qerr, qcode end
      if not rows[1] then
        return nil, "SQLITE_CONSTRAINT: enqueue was refused by the database", "SQLITE_CONSTRAINT"
      end
      e.id, e.outcome = rows[1].id, "duplicate"
    end
  end
  return n
end

-- The argument checks below raise at `level` as their caller sees it (default 2: the
-- caller of the method that called them).
local function check_lease(where, worker, lease_seconds, level)
  level = (level or 2) + 1
  if type(worker) ~= "string" then error("ops.store: " .. where .. ": worker must be a string", level) end
  if type(lease_seconds) ~= "number" or lease_seconds <= 0 then
    error("ops.store: " .. where .. ": lease_seconds must be a positive number", level)
  end
end

-- The SQL filter on kinds ("" for every kind) and its parameters.
local function kinds_filter(where, kinds, level)
  if kinds == nil then return "", {} end
  if type(kinds) ~= "table" or #kinds == 0 then
    error("ops.store: " .. where .. ": kinds must be a non-empty array of strings", (level or 2) + 1)
  end
  -- Only placeholders are generated; the kinds themselves are bound.
  return " AND kind IN (" .. string.rep("?", #kinds, ", ") .. ")", kinds
end

local function claim_args(where, worker, lease_seconds, kinds, level)
  level = (level or 2) + 1
  check_lease(where, worker, lease_seconds, level)
  local filter, params = kinds_filter(where, kinds, level) -- not a tail call: the levels count this frame
  return filter, params
end

-- A lease that expired after the last allowed attempt dead-letters the item instead of
-- handing a poison item out forever. Finding those means reading every item due, ready
-- ones included (they share the index on available_at): with 50,000 ready items, a claim
-- of 100 took 13 ms with it, 2.5 ms without (bench/queue_backlog.lua). So a claim runs
-- this pass only when dead_letter_every seconds have gone by since the last; the claim
-- itself never hands out such an item (it skips leased items whose attempts are used up),
-- which stays leased, expired, until the next pass.
local DEAD_LETTER_SQL = "UPDATE ops_queue SET state = 'dead', available_at = NULL, updated_at = ?, "
  .. "last_error = 'lease expired after the last attempt' "
  .. "WHERE queue = ? AND state = 'leased' AND available_at <= ? AND attempts >= ?"

-- Appends the dead-lettering pass to statements when it is due (or the clock went back).
local function dead_letter_statement(statements, q, now)
  local at = q.dead_letter_at
  if not at or now >= at or now < at - q.dead_letter_every then
    q.dead_letter_at = now + q.dead_letter_every
    statements[#statements + 1] = { DEAD_LETTER_SQL, now, q.name, now, q.max_attempts }
  end
end

-- The items a claim may take now: due, and ready or leased with a lease run out and
-- attempts left.
local DUE = "queue = ? AND available_at <= ? AND (state = 'ready' OR attempts < ?)"
-- The same test for items given by id: the unary + keeps SQLite from answering it with the
-- index on (queue, available_at), which reads every item due (a backlog: 15 us per item
-- of a group of 100 with 20,000 waiting) instead of looking the ids up.
local DUE_BY_ID = "+queue = ? AND +available_at <= ? AND (state = 'ready' OR attempts < ?)"
-- A lease (parameters: worker, lease end, now), and the items it returns
local LEASE_SET = "UPDATE ops_queue SET state = 'leased', worker = ?, available_at = ?, "
  .. "attempts = attempts + 1, updated_at = ? "
local LEASED = " RETURNING id, kind, payload, attempts, key, available_at AS lease_until"

-- The statements that lease up to limit items due now (oldest available first), appended
-- to statements: the dead-lettering pass when it is due, then the lease, whose rows are
-- the items (the last statement's).
local function lease_statements(statements, q, worker, lease_seconds, filter, kind_params, limit)
  local sql = LEASE_SET .. "WHERE id IN (SELECT id FROM ops_queue WHERE " .. DUE .. filter
    .. " ORDER BY available_at, id LIMIT ?)" .. LEASED
  local now = q.now()
  dead_letter_statement(statements, q, now)
  local claim = { sql, worker, now + lease_seconds, now, q.name, now, q.max_attempts }
  for i = 1, #kind_params do claim[#claim + 1] = kind_params[i] end
  claim[#claim + 1] = limit
  statements[#statements + 1] = claim
  return statements
end

local function by_id(a, b) return a.id < b.id end

-- Runs statements in one db:batch: the last one's rows (the items it leased), in id order.
local function leased_items(q, statements)
  local results, err, code = q.db:batch(statements)
  if not results then return nil, err, code end
  local items = results[#statements]
  table.sort(items, by_id)
  return items
end

-- Leases up to limit items in one db:batch; in id order.
local function lease(q, worker, lease_seconds, filter, kind_params, limit)
  return leased_items(q, lease_statements({}, q, worker, lease_seconds, filter, kind_params, limit))
end

-- q:claim(worker, lease_seconds [, kinds]) -> item | nil (empty) | nil, err, code
function Queue:claim(worker, lease_seconds, kinds)
  local filter, kind_params = claim_args("claim", worker, lease_seconds, kinds)
  local items, err, code = lease(self, worker, lease_seconds, filter, kind_params, 1)
  if not items then return nil, err, code end
  return items[1]
end

-- q:claim_many(worker, lease_seconds, kinds, limit) -> { item, ... } | nil, err, code
-- Up to limit items, chosen as claim would choose them one by one (oldest available
-- first), leased in one statement; returned in id order. An empty table when none is due.
-- kinds may be nil (every kind).
function Queue:claim_many(worker, lease_seconds, kinds, limit)
  local filter, kind_params = claim_args("claim_many", worker, lease_seconds, kinds)
  if math.type(limit) ~= "integer" or limit <= 0 then
    error("ops.store: claim_many: limit must be a positive integer", 2)
  end
  return lease(self, worker, lease_seconds, filter, kind_params, limit)
end

-- q:peek_many(kinds, limit) -> { item, ... } | nil, err, code
-- The items claim_many(worker, lease, kinds, limit) would lease now, read without leasing
-- them: a read, which runs at once, even while batches are being written. Nothing stops
-- another worker from taking them meanwhile: before lasting work, lease them with
-- lease_ids; a group settled at once is marked done with complete_peeked. In id order;
-- kinds may be nil (every kind).
function Queue:peek_many(kinds, limit)
  local filter, kind_params = kinds_filter("peek_many", kinds)
  if math.type(limit) ~= "integer" or limit <= 0 then
    error("ops.store: peek_many: limit must be a positive integer", 2)
  end
  local params = { self.name, self.now(), self.max_attempts }
  for i = 1, #kind_params do params[#params + 1] = kind_params[i] end
  params[#params + 1] = limit
  local items, err, code = self.db:query("SELECT id, kind, payload, attempts, key FROM ops_queue WHERE "
    .. DUE .. filter .. " ORDER BY available_at, id LIMIT ?", table.unpack(params, 1, #params))
  if not items then return nil, err, code end
  table.sort(items, by_id)
  return items
end

local function id_list(where, ids, level)
  level = (level or 2) + 1
  if type(ids) ~= "table" then error("ops.store: " .. where .. ": ids must be an array of integers", level) end
  for i = 1, #ids do
    if math.type(ids[i]) ~= "integer" then error("ops.store: " .. where .. ": ids must be an array of integers", level) end
  end
  return "[" .. table.concat(ids, ",") .. "]" -- one JSON array, read by json_each
end

-- q:lease_ids(ids, worker, lease_seconds) -> { item, ... } | nil, err, code
-- Leases, in one statement, those of ids that a claim could still take (peek_many's
-- items, unless another worker took them meanwhile), as claim_many leases: the items
-- leased, with attempts and lease_until, in id order.
function Queue:lease_ids(ids, worker, lease_seconds)
  local list = id_list("lease_ids", ids)
  check_lease("lease_ids", worker, lease_seconds)
  if #ids == 0 then return {} end
  local now = self.now()
  local statements = {}
  dead_letter_statement(statements, self, now)
  statements[#statements + 1] = { LEASE_SET .. "WHERE id IN (SELECT value FROM json_each(?)) AND " .. DUE_BY_ID
    .. LEASED, worker, now + lease_seconds, now, list, self.name, now, self.max_attempts }
  return leased_items(self, statements)
end

-- q:complete(id, worker) -> true | false, "lease lost" | nil, err, code
function Queue:complete(id, worker)
  local changes, err, code = self.db:exec(
    "UPDATE ops_queue SET state = 'done', available_at = NULL, updated_at = ? "
      .. "WHERE id = ? AND queue = ? AND state = 'leased' AND worker = ?",
    self.now(), id, self.name, worker)
  if changes == nil then return nil, err, code end
  if changes == 0 then return false, "lease lost" end
  return true
end

-- Marks ids done in one db:batch: those worker holds (held), or those a claim could take
-- (peeked: then the dead-lettering pass runs too, when due, as a claim would run it);
-- then more, then the claim. -> done, lost, claimed
local function complete(q, where, ids, worker, more, claim, peeked)
  -- (called by the methods: their caller is 3 levels up)
  local list = id_list(where, ids, 3)
  if type(worker) ~= "string" then error("ops.store: " .. where .. ": worker must be a string", 3) end
  if more ~= nil and type(more) ~= "table" then error("ops.store: " .. where .. ": more must be an array of statements", 3) end
  local filter, kind_params
  if claim ~= nil then
    if type(claim) ~= "table" then error("ops.store: complete_many: claim must be a table {lease =, kinds =, limit =}", 3) end
    filter, kind_params = claim_args("complete_many", worker, claim.lease, claim.kinds, 3)
    if math.type(claim.limit) ~= "integer" or claim.limit <= 0 then
      error("ops.store: complete_many: claim.limit must be a positive integer", 3)
    end
  end
  if #ids == 0 and not claim then return {}, {} end
  local now = q.now()
  local statements = {}
  if peeked then
    dead_letter_statement(statements, q, now)
    statements[#statements + 1] = { "UPDATE ops_queue SET state = 'done', worker = ?, available_at = NULL, "
      .. "updated_at = ? WHERE id IN (SELECT value FROM json_each(?)) AND " .. DUE_BY_ID .. " RETURNING id",
      worker, now, list, q.name, now, q.max_attempts }
  else
    statements[1] = { "UPDATE ops_queue SET state = 'done', available_at = NULL, updated_at = ? "
      .. "WHERE id IN (SELECT value FROM json_each(?)) AND queue = ? AND state = 'leased' AND worker = ? "
      .. "RETURNING id", now, list, q.name, worker }
  end
  local first = #statements
  for i = 1, more and #more or 0 do statements[#statements + 1] = more[i] end
  if claim then lease_statements(statements, q, worker, claim.lease, filter, kind_params, claim.limit) end
  local results, err, code = q.db:batch(statements)
  if not results then return nil, err, code end
  local rows = results[first]
  local got = {}
  for i = 1, #rows do got[rows[i].id] = true end
  local done, lost = {}, {}
  for i = 1, #ids do
    local id = ids[i]
    if got[id] then done[#done + 1] = id else lost[#lost + 1] = id end
  end
  local claimed = claim and results[#statements] or nil
  if claimed then table.sort(claimed, by_id) end
  return done, lost, claimed
end

-- q:complete_many(ids, worker [, more [, claim]]) -> done, lost, claimed | nil, err, code
-- Marks done, in one statement, every item of ids that worker still holds. done: the ids
-- completed, lost: those whose lease was lost (each id is in one of them), both in the
-- order of ids. more: statements (as db:batch takes them) run after it in the same
-- transaction (one db:batch: off the loop from a task), e.g. the outcomes of the
-- items done; an item this call completed is then state 'done' with worker = worker.
-- claim = {lease =, kinds =, limit =}: then, in the same transaction, leases the worker's
-- next items as claim_many(worker, lease, kinds, limit) would: claimed.
function Queue:complete_many(ids, worker, more, claim)
  local done, lost, claimed = complete(self, "complete_many", ids, worker, more, claim, false)
  return done, lost, claimed -- not a tail call: complete's errors count this frame
end

-- q:complete_peeked(ids, worker [, more]) -> done, lost | nil, err, code
-- complete_many for items read with peek_many and not leased: marks done those of ids a
-- claim could still take (none is done twice: an item another worker leased meanwhile, or
-- already done, is lost), with worker = worker; more as complete_many's.
function Queue:complete_peeked(ids, worker, more)
  local done, lost = complete(self, "complete_peeked", ids, worker, more, nil, true)
  return done, lost -- not a tail call: complete's errors count this frame
end

-- q:extend(id, worker, lease_seconds) -> lease_until | false, "lease lost" | nil, err, code
function Queue:extend(id, worker, lease_seconds)
  if type(lease_seconds) ~= "number" or lease_seconds <= 0 then
    error("ops.store: extend: lease_seconds must be a positive number", 2)
  end
  local now = self.now()
  local until_ = now + lease_seconds
  local changes, err, code = self.db:exec(
    "UPDATE ops_queue SET available_at = ?, updated_at = ? "
      .. "WHERE id = ? AND queue = ? AND state = 'leased' AND worker = ?",
    until_, now, id, self.name, worker)
  if changes == nil then return nil, err, code end
  if changes == 0 then return false, "lease lost" end
  return until_
end

-- q:fail(id, worker, err [, {max_attempts =, backoff =, max_backoff =}])
--   -> "ready", ready_at | "dead" | false, "lease lost" | nil, err, code
function Queue:fail(id, worker, reason, opts)
  opts = check_opts(opts, "fail")
  local max_attempts = opts.max_attempts or self.max_attempts
  local backoff = opts.backoff or self.backoff
  local max_backoff = opts.max_backoff or self.max_backoff
  return atomically(self.db, function(db)
    local now = self.now()
    local row = must(c_query(db, "SELECT attempts FROM ops_queue "
      .. "WHERE id = ? AND queue = ? AND state = 'leased' AND worker = ?", id, self.name, worker))[1]
    if not row then return false, "lease lost" end
    local msg = reason ~= nil and tostring(reason) or nil
    if row.attempts >= max_attempts then
      must(c_exec(db, "UPDATE ops_queue SET state = 'dead', available_at = NULL, last_error = ?, "
        .. "updated_at = ? WHERE id = ?", msg, now, id))
      return "dead"
    end
    local ready_at = now + math.min(max_backoff, backoff * 2 ^ (row.attempts - 1))
    must(c_exec(db, "UPDATE ops_queue SET state = 'ready', worker = NULL, available_at = ?, "
      .. "last_error = ?, updated_at = ? WHERE id = ?", ready_at, msg, now, id))
    return "ready", ready_at
  end)
end

-- q:get(id) -> item (every column; NULL columns absent) | nil | nil, err, code
function Queue:get(id)
  local rows, err, code = self.db:query("SELECT * FROM ops_queue WHERE id = ? AND queue = ?", id, self.name)
  if not rows then return nil, err, code end
  return rows[1]
end

-- q:stats() -> { ready = n, leased = n, done = n, dead = n } | nil, err, code
function Queue:stats()
  local rows, err, code = self.db:query(
    "SELECT state, count(*) AS n FROM ops_queue WHERE queue = ? GROUP BY state", self.name)
  if not rows then return nil, err, code end
  local counts = { ready = 0, leased = 0, done = 0, dead = 0 }
  for _, r in ipairs(rows) do counts[r.state] = r.n end
  return counts
end

-- q:purge(age_seconds) -> removed | nil, err, code
-- Deletes done items finished more than age_seconds ago (their keys stop deduplicating).
function Queue:purge(age_seconds)
  if type(age_seconds) ~= "number" or age_seconds < 0 then
    error("ops.store: purge: age_seconds must be a non-negative number", 2)
  end
  local changes, err, code = self.db:exec(
    "DELETE FROM ops_queue WHERE queue = ? AND state = 'done' AND updated_at < ?",
    self.name, self.now() - age_seconds)
  if changes == nil then return nil, err, code end
  return changes
end

return store
