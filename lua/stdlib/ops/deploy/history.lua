-- ops.deploy.history: runs, their steps and the environment locks, in the store.
local store = require "ops.store"
local sys = require "ops.sys"
local fs = require "ops.fs"
local failure = require "ops.deploy.failure"

local history = {}

local MIGRATIONS = {
  [[
  CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,          -- running, succeeded, failed, interrupted
    repo TEXT, revision TEXT, envs TEXT, args TEXT,
    trigger TEXT, delivery TEXT,   -- cli, serve (with the webhook delivery id)
    pid INTEGER, host TEXT, error TEXT
  );
  CREATE TABLE steps (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    id TEXT NOT NULL, env TEXT, tool TEXT,
    status TEXT NOT NULL,          -- pending, running, succeeded, failed, skipped, not-run, interrupted
    code INTEGER, started REAL, finished REAL, duration REAL,
    error TEXT, log_tail TEXT,
    PRIMARY KEY (run_id, id)
  );
  CREATE TABLE locks (
    name TEXT PRIMARY KEY, pid INTEGER NOT NULL, host TEXT NOT NULL,
    run_id INTEGER, started REAL NOT NULL
  );
  ]],
  -- 2: a run's working folder, removed by history.reap once its process is gone; the runs
  -- still marked running, found without reading the others
  [[
  ALTER TABLE runs ADD COLUMN workdir TEXT;
  CREATE INDEX runs_running ON runs (host) WHERE status = 'running';
  ]],
}

--- history.default_path() -> $OPSRUN_STORE, or $XDG_STATE_HOME/opsrun/opsrun.db, or
--- ~/.local/state/opsrun/opsrun.db; raises a failure when none of them is set
function history.default_path()
  local p = sys.getenv("OPSRUN_STORE")
  if p and p ~= "" then return p end
  local base = sys.getenv("XDG_STATE_HOME")
  if not base or base == "" then
    -- not a folder every user shares (/tmp): someone else could make it first, and read or
    -- forge the history
    local home = sys.getenv("HOME")
    if not home or home == "" then
      failure.raise("no place for the state store: HOME is not set (set OPSRUN_STORE, --store or XDG_STATE_HOME)")
    end
    base = home .. "/.local/state"
  end
  return base .. "/opsrun/opsrun.db"
end

--- history.open(path [, opts]) -> db, raising a failure that names the path and the fix
--- (opts go to ops.store.open: synchronous = "normal" trades power-cut safety for speed)
function history.open(path, opts)
  path = path or history.default_path()
  local ok, err = fs.mkdir_p(fs.dirname(path))
  if not ok then
    failure.raise("cannot create the folder of the state store " .. path .. ": " .. err
      .. " (set OPSRUN_STORE or --store to a writable path)")
  end
  local db, oerr = store.open(path, opts)
  if not db then
    failure.raise("cannot open the state store " .. path .. ": " .. oerr .. " (set OPSRUN_STORE or --store)")
  end
  -- migrate raises on misuse and returns nil, message for a store it cannot bring up to date
  -- (one a newer opsrun wrote)
  local mok, applied, merr = pcall(db.migrate, db, MIGRATIONS, {component = "ops.deploy"})
  if not mok or applied == nil then
    db:close()
    failure.raise("the state store " .. path .. " cannot be used: " .. tostring(mok and merr or applied))
  end
  return db, path
end

local function now() return require("ops.time").now() end

--- history.start_run(db, fields) -> run id; fields: repo, revision, envs, args, trigger,
--- delivery, workdir (the run's working folder, removed by history.reap if the run dies)
function history.start_run(db, fields)
  local _, id = assert(db:exec(
    "INSERT INTO runs (started, status, repo, revision, envs, args, trigger, delivery, pid, host, workdir) "
      .. "VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    now(), fields.repo, fields.revision, fields.envs, fields.args, fields.trigger or "cli", fields.delivery,
    sys.pid(), sys.hostname(), fields.workdir))
  return id
end

function history.finish_run(db, run_id, status, err)
  assert(db:exec("UPDATE runs SET finished = ?, status = ?, error = ? WHERE id = ?", now(), status, err, run_id))
end

function history.record_step(db, run_id, s)
  assert(db:exec([[INSERT INTO steps (run_id, id, env, tool, status, code, started, finished, duration, error, log_tail)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (run_id, id) DO UPDATE SET status = excluded.status, code = excluded.code,
      started = excluded.started, finished = excluded.finished, duration = excluded.duration,
      error = excluded.error, log_tail = excluded.log_tail]],
    run_id, s.id, s.env, s.tool, s.status, s.code, s.started, s.finished, s.duration, s.error, s.log_tail))
end

local function alive(pid)
  local ok, _, code = sys.kill(pid, "0")
  return ok or code == "EPERM"
end

--- history.reap(db) -> the runs of this host still marked running whose process is gone
--- (killed with SIGKILL, out of memory, the machine stopped): each is marked interrupted
--- (with no end time: when it ended is not known), its running steps interrupted and its
--- pending ones not-run, and its working folder (a $TMPDIR/opsrun-run-* folder of this
--- user: copies of the repo, decoded secrets) removed. Returns {{id, pid, workdir}, ...}.
function history.reap(db)
  local me, host = sys.pid(), sys.hostname()
  local dead = {}
  for _, r in ipairs(db:query("SELECT id, pid, workdir FROM runs WHERE status = 'running' AND host = ?", host)) do
    if r.pid ~= me and not alive(r.pid) then dead[#dead + 1] = r end
  end
  if #dead == 0 then return dead end
  db:transaction(function()
    for _, r in ipairs(dead) do
      db:exec("UPDATE runs SET status = 'interrupted', error = ? WHERE id = ? AND status = 'running'",
        string.format("its process (%d) ended without finishing the run: killed, or the machine stopped", r.pid),
        r.id)
      db:exec("UPDATE steps SET status = 'interrupted' WHERE run_id = ? AND status = 'running'", r.id)
      db:exec("UPDATE steps SET status = 'not-run' WHERE run_id = ? AND status = 'pending'", r.id)
    end
  end)
  local uid = sys.uid()
  for _, r in ipairs(dead) do
    local w = r.workdir
    local st = type(w) == "string" and fs.basename(w):match("^opsrun%-run%-") and fs.lstat(w)
    if st and st.type == "directory" and st.uid == uid then fs.remove(w, {recursive = true}) end
  end
  return dead
end

-- The locks this process holds, name -> run id: one process may run several deploys at once
-- (tasks of a script, `opsrun serve`), so its pid alone does not tell whose a lock is.
local held = {}

-- A row of the locks table that no live run holds any more.
local function stale(row, me, host)
  if row.host ~= host then return false end
  if row.pid == me then return held[row.name] == nil end
  return not alive(row.pid)
end

-- Takes the lock `name` for run_id unless a live run holds it, inside the caller's transaction.
local function take(db, name, run_id, me, host)
  local row = db:query("SELECT name, pid, host, run_id, started FROM locks WHERE name = ?", name)[1]
  if row and not stale(row, me, host) then
    return false, row
  end
  if row then
    db:exec("UPDATE locks SET pid = ?, host = ?, run_id = ?, started = ? WHERE name = ?", me, host, run_id, now(), name)
  else
    db:exec("INSERT INTO locks (name, pid, host, run_id, started) VALUES (?, ?, ?, ?, ?)", name, me, host, run_id, now())
  end
  held[name] = run_id
  return true, row
end

--- history.lock(db, name, run_id) -> true | false, holder ({pid, host, run_id, started})
--- A lock whose process is gone (same host), or that this process left behind, is stale
--- and taken over.
function history.lock(db, name, run_id)
  return db:transaction(function()
    return take(db, name, run_id, sys.pid(), sys.hostname())
  end)
end

--- history.lock_all(db, names, run_id) -> true | false, holder, i : history.lock of each name
--- in turn, in one transaction (one commit for them all); stops at the first that another
--- run holds, names[i], and returns its holder: the ones before it are taken (the caller
--- releases them).
function history.lock_all(db, names, run_id)
  return db:transaction(function()
    local me, host = sys.pid(), sys.hostname()
    for i, name in ipairs(names) do
      local got, holder = take(db, name, run_id, me, host)
      if not got then return false, holder, i end
    end
    return true
  end)
end

local UNLOCK = "DELETE FROM locks WHERE name = ? AND pid = ? AND host = ?"

--- history.unlock(db, name, run_id) : releases a lock this process holds for that run
function history.unlock(db, name, run_id)
  if run_id ~= nil and held[name] ~= run_id then return end
  held[name] = nil
  db:exec(UNLOCK, name, sys.pid(), sys.hostname())
end

--- history.unlock_all(db, names, run_id) : history.unlock of each name, in one transaction
--- (or, when that cannot be had, one by one); never raises
function history.unlock_all(db, names, run_id)
  local mine = {}
  for _, name in ipairs(names) do
    if run_id == nil or held[name] == run_id then
      held[name] = nil
      mine[#mine + 1] = name
    end
  end
  if #mine == 0 then return end
  local me, host = sys.pid(), sys.hostname()
  local function unlock_each()
    for _, name in ipairs(mine) do pcall(db.exec, db, UNLOCK, name, me, host) end
  end
  if not pcall(db.transaction, db, unlock_each) then unlock_each() end
end

function history.runs(db, limit)
  return db:query("SELECT * FROM runs ORDER BY id DESC LIMIT ?", limit or 20)
end

function history.run(db, id)
  local run = db:query("SELECT * FROM runs WHERE id = ?", id)[1]
  if not run then return nil end
  run.steps = db:query("SELECT * FROM steps WHERE run_id = ? ORDER BY started IS NULL, started, id", id)
  return run
end

return history
