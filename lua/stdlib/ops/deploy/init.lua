-- ops.deploy: the deploy engine. A run is a set of steps (one tool in one environment)
-- forming a graph through `needs`; independent steps run in parallel up to `jobs`.
--
--   local deploy = require "ops.deploy"
--   local code = deploy.run{repo = ".", envs = {"prod"}, jobs = 4}
--
-- Each run works in a copy of the environments it deploys, holds a lock per environment, and
-- is recorded, step by step, in the store (a dry run takes no lock and records nothing).
--
-- _default, merged into each copy (repo.working_copy, repo.merge_default):
--   _default/<folder>/ goes into the environment's <folder>/ when the environment has one;
--   a file only _default has is copied; bitops.config.yaml and values*.yaml in both are
--   deep-merged: mappings key by key, the environment's value winning, its lists and scalars
--   replacing _default's whole (a `false` is a value); a tool's settings nested under its
--   name (`ansible: {cli: ...}`) or not (`cli: ...`) merge alike; any other file in both is
--   the environment's. _default/bitops.config.yaml merges under <env>/bitops.config.yaml.
--   Messages about these files name them as in the repo, never by the copy.
local fs = require "ops.fs"
local log = require "ops.log"
local sys = require "ops.sys"
local time = require "ops.time"
local proc = require "ops.proc"
local sched = require "ops.core.sched"
local modules = require "ops.core.modules"
local failure = require "ops.deploy.failure"
local config = require "ops.deploy.config"
local repo = require "ops.deploy.repo"
local hooks = require "ops.deploy.hooks"
local history = require "ops.deploy.history"
local Step = require "ops.deploy.step"

local deploy = {
  failure = failure,
  config = config,
  repo = repo,
  hooks = hooks,
  history = history,
  Step = Step,
}

--- How long a step's change of status may wait before it is written to the store, so
--- that steps which end quickly share a transaction (the end of the run writes the rest).
deploy.RECORD_DELAY = 0.05

--- deploy.driver(tool) -> the driver module; an override that is a plain table falls back
--- to the built-in driver for the stages it does not define
function deploy.driver(tool)
  local ok, mod = pcall(require, "tools." .. tool)
  if not ok then failure.raise("cannot load the driver for '" .. tool .. "': " .. tostring(mod)) end
  if type(mod) ~= "table" then failure.raise("tools." .. tool .. " must return a table of stages") end
  if getmetatable(mod) == nil and modules.locate("tools." .. tool) ~= "builtin" then
    local bok, base = pcall(modules.builtin, "tools." .. tool)
    if bok and base ~= mod then setmetatable(mod, {__index = base}) end
  end
  if type(mod.deploy) ~= "function" then failure.raise("tools." .. tool .. " has no deploy stage") end
  return mod
end

-- A name given to --only or --skip must name something: a step, folder, tool or environment
-- of the environments planned, a tool opsrun knows, or an environment of the repo (or a
-- step of one) that was not planned (--changed-since left it out). A misspelt --skip would
-- deploy what it was meant to keep out, a misspelt --only would deploy nothing and succeed.
local function check_selection(root, flag, list, names, planned)
  local all
  for _, want in ipairs(list or {}) do
    local known = names[want] or repo.is_tool(want)
    if not known then
      all = all or repo.environments(root)
      local env = want:match("^([^/]+)/[^/]+$") or want
      for _, e in ipairs(all) do
        if e == env and not planned[e] then known = true end
      end
    end
    if not known then
      local ids = {}
      for id in pairs(names) do
        if id:find("/", 1, true) then ids[#ids + 1] = id end
      end
      table.sort(ids)
      failure.raise(string.format("%s %s: no step, folder, tool or environment of that name (steps: %s; tools: %s)",
        flag, want, #ids > 0 and table.concat(ids, ", ") or "none", repo.tool_names()))
    end
  end
end

--- deploy.plan(opts) -> steps for a BitOps repo: opts.repo, opts.envs (nil: all of them),
--- opts.only, opts.skip, opts.changed_since (keeps the environments whose files, or _default's,
--- changed since that revision). Steps of one environment run in order, each needing the one
--- before.
function deploy.plan(opts)
  local root = opts.repo
  local envs = opts.envs
  if not envs or #envs == 0 then envs = repo.environments(root) end
  if opts.changed_since then
    local changed = repo.changed_environments(root, opts.changed_since)
    local candidates = envs
    envs = {}
    for _, e in ipairs(candidates) do
      if changed[e] or changed[repo.DEFAULT_DIR] then envs[#envs + 1] = e end
    end
  end
  local steps, settings, names, planned = {}, {}, {}, {}
  for _, env in ipairs(envs) do
    local env_steps, s = repo.plan_env(root, env)
    settings[env] = s
    planned[env], names[env] = true, true
    local prev
    for _, st in ipairs(env_steps) do
      names[st.id], names[st.folder], names[st.tool] = true, true, true
      local function matches(list)
        for _, want in ipairs(list or {}) do
          if want == st.id or want == st.folder or want == st.tool or want == st.env then return true end
        end
        return false
      end
      if (not opts.only or #opts.only == 0 or matches(opts.only)) and not matches(opts.skip) then
        st.needs = prev and {prev.id} or {}
        steps[#steps + 1] = st
        prev = st
      end
    end
  end
  check_selection(root, "--only", opts.only, names, planned)
  check_selection(root, "--skip", opts.skip, names, planned)
  return steps, settings, envs
end

local function check_graph(steps)
  local by_id = {}
  for _, s in ipairs(steps) do
    if type(s.id) ~= "string" then failure.raise("every step needs an id") end
    if by_id[s.id] then failure.raise("two steps are called '" .. s.id .. "'") end
    for _, key in ipairs({"folder", "dir"}) do
      local rel = s[key]
      if rel ~= nil and (type(rel) ~= "string" or rel == "" or rel:sub(1, 1) == "/"
          or ("/" .. rel .. "/"):find("/%.%./")) then
        failure.raise(string.format("step '%s': %s must be a folder inside its environment, not %s",
          s.id, key, tostring(rel)))
      end
    end
    if type(s.env) ~= "string" or not s.env:match("^[%w_][%w_.-]*$") then
      failure.raise(string.format("step '%s': env must name a top-level folder of the repo, not %s", s.id, tostring(s.env)))
    end
    if s.folder == nil and s.dir == nil then failure.raise("step '" .. s.id .. "' needs a folder") end
    by_id[s.id] = s
  end
  for _, s in ipairs(steps) do
    s.needs = s.needs or {}
    for _, n in ipairs(s.needs) do
      if not by_id[n] then failure.raise("step '" .. s.id .. "' needs '" .. n .. "', which is not a step of this run") end
    end
  end
  local state = {}
  local function visit(s, path)
    if state[s.id] == "done" then return end
    if state[s.id] == "visiting" then
      failure.raise("the steps' needs form a cycle: " .. table.concat(path, " -> ") .. " -> " .. s.id)
    end
    state[s.id] = "visiting"
    path[#path + 1] = s.id
    for _, n in ipairs(s.needs) do visit(by_id[n], path) end
    path[#path] = nil
    state[s.id] = "done"
  end
  for _, s in ipairs(steps) do visit(s, {}) end
  return by_id
end

--- deploy.start_order(steps, jobs) -> the order in which ready steps are started. With one
--- job, the plan's order (environment after environment). With more, the step with the
--- longest chain of steps still to come after it first (ties: plan order): the critical
--- path first keeps every slot busy, so the run takes max(steps/jobs, longest chain) rounds
--- rather than finishing one environment before starting the next.
function deploy.start_order(steps, jobs)
  local order = {}
  for i, s in ipairs(steps) do order[i] = s end
  if (jobs or 1) <= 1 then return order end
  local dependents, index, chain = {}, {}, {}
  for i, s in ipairs(steps) do
    index[s.id] = i
    for _, n in ipairs(s.needs or {}) do
      dependents[n] = dependents[n] or {}
      table.insert(dependents[n], s.id)
    end
  end
  local function length(id) -- the graph has no cycle (check_graph)
    if chain[id] then return chain[id] end
    local longest = 0
    for _, d in ipairs(dependents[id] or {}) do longest = math.max(longest, length(d)) end
    chain[id] = longest + 1
    return chain[id]
  end
  table.sort(order, function(a, b)
    local la, lb = length(a.id), length(b.id)
    if la ~= lb then return la > lb end
    return index[a.id] < index[b.id]
  end)
  return order
end

local function git_revision(root)
  local r = proc.run({"git", "-C", root, "rev-parse", "HEAD"}, {timeout = 30, stderr = "ignore"})
  if r and r.ok then return (r.stdout:gsub("%s+$", "")) end
  return nil
end

local function traceback(err)
  if failure.is(err) then return err end
  return debug.traceback(tostring(err), 2)
end

local function truthy_skip(cfg)
  for _, section in pairs(cfg) do
    if type(section) == "table" and section["skip-deploy"] == true then return true end
  end
  return false
end

-- One step, in a task of its own.
local function execute(run, s)
  s.status = "running"
  s.started = time.now()
  s.t0 = time.monotonic()
  run.record(s)
  local env_dir = fs.join(run.workdir, s.env) -- being made by the copier: run.await_copy
  local private = fs.join(run.workdir, ".private", (s.id:gsub("[^%w_.-]", "_"))) -- made on first use
  local dir = s.dir and fs.join(env_dir, s.dir) or fs.join(env_dir, s.folder)
  local vars = {
    BITOPS_ENVIRONMENT = s.env, ENVIRONMENT = s.env,
    BITOPS_ENVROOT = env_dir, BITOPS_OPSREPO_ENVIRONMENT_DIR = env_dir,
    BITOPS_TEMPDIR = run.workdir, BITOPS_PLUGIN_NAME = s.tool,
    BITOPS_DRY_RUN = run.dry_run and "true" or "false",
    OPSRUN_ENVIRONMENT = s.env, OPSRUN_ENV_DIR = env_dir, OPSRUN_WORKDIR = run.workdir,
    OPSRUN_TOOL = s.tool, OPSRUN_STEP = s.id, OPSRUN_STEP_DIR = dir, OPSRUN_REPO = run.repo,
    OPSRUN_DRY_RUN = run.dry_run and "1" or "0",
  }
  if run.run_id then vars.OPSRUN_RUN_ID = tostring(run.run_id) end
  run.outputs[s.env] = run.outputs[s.env] or {}
  run.exports[s.env] = run.exports[s.env] or {}
  local step = Step.new({
    id = s.id, env = s.env, tool = s.tool, folder = s.folder, dir = dir, env_dir = env_dir,
    repo = run.repo, workdir = run.workdir, dry_run = run.dry_run, vars = vars,
    outputs = run.outputs[s.env], exports = run.exports[s.env], private_dir = private,
    timeout = run.timeout, out = run.out,
  })
  s.step = step
  local driver
  local ok, err = xpcall(function()
    run.await_copy(s.env)
    if not fs.exists(dir) then step:fail(s.id .. ": the folder " .. dir .. " does not exist") end
    driver = run.drivers[s.tool]
    if not driver then
      driver = deploy.driver(s.tool)
      run.drivers[s.tool] = driver
    end
    hooks.run(step, "before")
    -- read after the before-hooks: a hook may still edit the config
    local shown = s.id .. "/bitops.config.yaml"
    local file = config.load_yaml(fs.join(dir, "bitops.config.yaml"), shown)
    local cfg, exported, warnings = config.resolve(driver.schema or {}, file, {
      tool = s.tool, where = string.format("environment '%s': %s step", s.env, s.tool), file = shown,
    })
    for _, w in ipairs(warnings) do step.log.warn(w) end
    step.config, step.config_file = cfg, shown
    for k, v in pairs(exported) do step.vars[k] = v end
    if truthy_skip(cfg) then
      s.status = "skipped"
      step.log.info("skip-deploy is set: skipped")
      return
    end
    step.log.info("deploying with " .. s.tool)
    driver:deploy(step)
    hooks.run(step, "after")
    s.status = "succeeded"
  end, traceback)
  if not ok then
    s.status = "failed"
    -- paths in the working copy as the repo has them: the copy is gone once the run ends
    s.error = step:shown(failure.message(err))
    step.log.error(failure.is(err) and s.error or ("internal error: " .. s.error))
    if driver and type(driver.recover) == "function" then
      local rok, rerr = pcall(driver.recover, driver, step, err)
      if not rok then step.log.error("recovery failed: " .. failure.message(rerr)) end
    end
    local hok, herr = pcall(hooks.run, step, "failure")
    if not hok then step.log.error(failure.message(herr)) end
  end
  s.code = step.last_code
  s.finished = time.now()
  s.duration = time.monotonic() - s.t0
  s.log_tail = table.concat(step.tail, "\n")
  run.record(s)
end

local function summary(run, out)
  local w = 4
  for _, s in ipairs(run.steps) do w = math.max(w, #s.id) end
  out:write("\n", string.format("%-" .. w .. "s  %-11s  %9s\n", "step", "status", "duration"))
  for _, s in ipairs(run.steps) do
    out:write(string.format("%-" .. w .. "s  %-11s  %8.1fs\n", s.id, s.status, s.duration or 0))
  end
  for _, s in ipairs(run.steps) do
    if s.error and (s.status == "failed" or s.status == "not-run" or s.status == "interrupted") then
      out:write(string.format("\n%s %s: %s\n", s.id, s.status, log.redact(s.error)))
    end
  end
  out:flush()
end

--- deploy.run(opts) -> exit code, run
--- opts: repo (folder), steps (from deploy.plan, or written by hand: {id, env, tool, folder|dir,
--- needs}), or envs (planned here); jobs (default 4), fail_fast (default true, or the
--- environments' bitops.fail_fast), dry_run, store (path), timeout (seconds per command),
--- trigger, delivery, out (where the summary and dry-run go; io.stdout), handle_signals
--- (default true: SIGINT/SIGTERM interrupt the run), lock_scope (what the environment
--- locks are named after: $OPSRUN_LOCK_SCOPE, else the repo's remote.origin.url, else its path)
function deploy.run(opts)
  local out = opts.out or io.stdout
  local ok, code, run = xpcall(function()
    local root = opts.repo or "."
    local real, rerr = fs.realpath(root)
    if not real then failure.raise("the operations repo " .. root .. " cannot be read: " .. rerr) end
    local steps, settings = opts.steps, opts.settings or {}
    if not steps then
      local envs = opts.envs
      -- --changed-since alone plans every environment that changed
      if (not envs or #envs == 0) and not opts.changed_since then
        local all = repo.environments(real)
        failure.raise("no environment given: use --env NAME or BITOPS_ENVIRONMENT (environments in "
          .. root .. ": " .. (#all > 0 and table.concat(all, ", ") or "none") .. ")")
      end
      steps, settings = deploy.plan({repo = real, envs = envs, only = opts.only, skip = opts.skip,
        changed_since = opts.changed_since})
    end
    local by_id = check_graph(steps)
    local fail_fast = opts.fail_fast
    local env_names, seen = {}, {}
    for _, s in ipairs(steps) do
      s.status = "pending"
      if not seen[s.env] then
        seen[s.env] = true
        env_names[#env_names + 1] = s.env
      end
    end
    table.sort(env_names)
    for _, e in ipairs(env_names) do
      -- steps written by hand: their environments' settings (fail_fast, masks) still apply
      if settings[e] == nil and fs.exists(fs.join(real, e, "bitops.config.yaml")) then
        settings[e] = repo.env_config(real, e)
      end
      local st = settings[e]
      if fail_fast == nil and st and st.fail_fast == false then fail_fast = false end
      if st and st.logging then
        for _, m in ipairs(repo.mask_patterns(st.logging.masks, e .. "/bitops.config.yaml")) do
          log.add_mask(m[1], m[2], m.raw)
        end
      end
    end
    if fail_fast == nil then fail_fast = true end
    if #steps == 0 then
      local why = ""
      if opts.changed_since and not next(settings) then
        why = ": no environment changed since " .. opts.changed_since
      elseif #(opts.only or {}) + #(opts.skip or {}) > 0 then
        why = ": --only/--skip left no step"
      end
      out:write("nothing to deploy" .. why .. "\n")
      return 0, {steps = {}}
    end

    local workdir <close>, werr = fs.tempdir("opsrun-run-")
    if not workdir then
      failure.raise("cannot make the run's working folder: " .. werr .. " (set TMPDIR to a writable folder)")
    end
    local run = {
      repo = real, steps = steps, by_id = by_id, jobs = math.max(1, opts.jobs or 4),
      fail_fast = fail_fast, dry_run = opts.dry_run and true or false, workdir = workdir.path,
      copies = {}, outputs = {}, exports = {}, timeout = opts.timeout, out = out, drivers = {},
    }
    local tools = {}
    for _, s in ipairs(steps) do
      tools[s.env] = tools[s.env] or {}
      tools[s.env][s.folder or s.dir] = s.tool
    end
    -- the working copies are made in the order the steps need them, while the steps of
    -- environments already copied run; a step waits for its own
    -- first what every step may reach by a relative path (repo.shared_entries), then the
    -- environments in the order the steps need them
    local copy_order, to_copy, copy_waiters = {}, {}, {}
    for _, st in ipairs(steps) do to_copy[st.env] = true end
    local shared, shared_dirs = repo.shared_entries(real, to_copy)
    local is_shared = {}
    for _, name in ipairs(shared) do
      is_shared[name] = true
      copy_order[#copy_order + 1] = name
    end
    for _, st in ipairs(steps) do
      if to_copy[st.env] then to_copy[st.env] = nil; copy_order[#copy_order + 1] = st.env end
    end
    -- (with several jobs, a few copies at once: steps of several environments start together)
    -- (kept between runs unless OPSRUN_KEEP_COPIES=0: repo.kept_copies)
    local kept_key = opts.lock_scope or sys.getenv("OPSRUN_LOCK_SCOPE")
    local kept = repo.kept_copies(kept_key and kept_key ~= "" and log.public_url(kept_key) or real)
    local next_copy, copiers = 1, {}
    for c = 1, math.min(run.jobs, 4) do
      copiers[c] = sched.spawn(function()
        while next_copy <= #copy_order do
          local e = copy_order[next_copy]
          next_copy = next_copy + 1
          local cok, cerr
          if is_shared[e] then
            cok, cerr = pcall(repo.shared_copy, real, e, workdir.path, kept)
          else
            cok, cerr = pcall(repo.working_copy, real, e, workdir.path, tools[e], kept)
          end
          run.copies[e] = cok and {ok = true} or {err = cerr}
          for _, t in ipairs(copy_waiters[e] or {}) do sched.wake(t) end
          copy_waiters[e] = nil
        end
      end)
    end
    local copying <close> = setmetatable({}, {__close = function()
      for _, c in ipairs(copiers) do c:cancel() end
    end})
    local function await(e)
      while not run.copies[e] do
        copy_waiters[e] = copy_waiters[e] or {}
        table.insert(copy_waiters[e], sched.current())
        sched.suspend()
      end
      if run.copies[e].err then error(run.copies[e].err, 0) end
    end
    function run.await_copy(e)
      for _, name in ipairs(shared) do await(name) end
      await(e)
    end

    -- the store: history and locks (a dry run touches neither)
    local db, locks, origin_url = nil, {}, nil
    local scope = opts.lock_scope or sys.getenv("OPSRUN_LOCK_SCOPE")
    if scope == "" then scope = nil end
    run.record = function() end
    local flush_records, writer = function() end, nil
    if not run.dry_run then
      -- without a lock scope the locks are named by the repo's origin: that git lookup runs
      -- beside the revision's, and is waited for at this block's end, also when opening the
      -- store raises (its result is kept for the locks below)
      if not scope then
        origin_url = proc.spawn({"git", "-C", real, "config", "--get", "remote.origin.url"}, {timeout = 30, stderr = "ignore"})
      end
      local origin_done <close> = origin_url and setmetatable({}, {__close = function() pcall(origin_url.wait, origin_url) end}) or nil
      -- the run's record is safe from a crash of opsrun but for its last RECORD_DELAY
      -- seconds (a step's row lags it by that much at most); a power cut may lose its last
      -- lines (synchronous=NORMAL): the deploy itself must not wait on fsync per step
      db = history.open(opts.store, {synchronous = "normal"})
      -- runs a killed opsrun left marked running: marked interrupted, their folders removed
      local rok, reaped = pcall(history.reap, db)
      for _, r in ipairs(rok and reaped or {}) do
        log.warn(string.format("run %d was left running by process %d, which is gone: recorded as interrupted", r.id, r.pid))
      end
      if not rok then log.warn("the runs left by processes that are gone were not looked at: " .. failure.message(reaped)) end
      run.run_id = history.start_run(db, {
        repo = real, revision = git_revision(real), envs = table.concat(env_names, ","),
        args = opts.args and log.redact(opts.args), trigger = opts.trigger, delivery = opts.delivery,
        workdir = workdir.path,
      })
      -- A step's record is written by a task of its own, in one transaction for all the
      -- steps that changed meanwhile, RECORD_DELAY seconds after the first of them: a step
      -- marks itself and goes on, and rows are written in batches while commands run.
      local dirty, queued, writer_idle = {}, {}, nil
      flush_records = function()
        while #queued > 0 do
          local list = queued
          queued, dirty = {}, {}
          db:transaction(function()
            for _, s in ipairs(list) do
              history.record_step(db, run.run_id, {
                id = s.id, env = s.env, tool = s.tool, status = s.status, code = s.code, started = s.started,
                finished = s.finished, duration = s.duration, error = s.error and log.redact(s.error), log_tail = s.log_tail,
              })
            end
          end)
        end
      end
      writer = sched.spawn(function()
        while true do
          if #queued == 0 then
            writer_idle = sched.current()
            sched.suspend()
            writer_idle = nil
          else
            sched.sleep(deploy.RECORD_DELAY)
            flush_records()
          end
        end
      end)
      run.record = function(s)
        if not dirty[s] then
          dirty[s] = true
          queued[#queued + 1] = s
        end
        if writer_idle then sched.wake(writer_idle) end
      end
      for _, s in ipairs(steps) do run.record(s) end -- one commit for the whole plan
    end
    local records <close> = setmetatable({}, {__close = function()
      if writer then writer:cancel() end
      pcall(flush_records)
    end})
    local function release()
      if #locks > 0 then history.unlock_all(db, locks, run.run_id) end
      locks = {}
    end
    local guard <close> = setmetatable({}, {__close = release})
    if db then
      -- the lock names the repo by where it comes from, so a deploy from a clone and one
      -- from opsrun serve's checkout of the same repo exclude each other
      if not scope then
        local o = origin_url and origin_url:wait()
        scope = o and o.ok and o.stdout:gsub("%s+$", "") or real
      end
      scope = log.public_url(scope) -- no credentials in lock names
      -- every environment's lock in one transaction; up to the first held by another run
      local names = {}
      for i, e in ipairs(env_names) do names[i] = "env:" .. scope .. ":" .. e end
      local got, holder, at = history.lock_all(db, names, run.run_id)
      for i = 1, got and #names or at - 1 do locks[i] = names[i] end
      if not got then
        local e = env_names[at]
        for _, s in ipairs(steps) do
          s.status, s.error = "not-run", "environment '" .. e .. "' was locked by another deploy"
          run.record(s)
        end
        flush_records()
        history.finish_run(db, run.run_id, "failed", "locked")
        failure.raise(string.format("environment '%s' is being deployed by process %d on %s (run %s, since %s); "
          .. "wait for it, or stop it", e, holder.pid, holder.host, tostring(holder.run_id), time.iso8601(holder.started)))
      end
    end

    -- SIGINT/SIGTERM: stop the running steps (their programs get the signal's TERM/KILL),
    -- start nothing more, record the run as interrupted
    local me = sched.current()
    local finished, waiting = {}, false
    local function interrupt(signame)
      if run.interrupted then return end
      run.interrupted = signame
      log.warn("interrupted by " .. signame .. ": stopping the running steps")
      for _, s in ipairs(steps) do
        if s.status == "running" and s.task then s.task:cancel() end
      end
      if waiting then sched.wake(me) end
    end
    -- (opsrun serve runs several deploys at once and handles signals itself)
    local previous = {}
    if opts.handle_signals ~= false then
      previous.SIGINT = sys.on_signal("SIGINT", interrupt)
      previous.SIGTERM = sys.on_signal("SIGTERM", interrupt)
    end
    local signals <close> = setmetatable({}, {__close = function()
      if opts.handle_signals ~= false then
        sys.on_signal("SIGINT", previous.SIGINT)
        sys.on_signal("SIGTERM", previous.SIGTERM)
      end
      -- the runner itself was cancelled: its steps go with it
      for _, s in ipairs(steps) do
        if s.status == "running" and s.task then s.task:cancel() end
      end
    end})

    -- Which steps may start: each counts the needs it still waits for; a step that ends
    -- tells the steps that need it. Ready steps start in deploy.start_order's order.
    local running, stop = 0, false
    -- An environment whose steps have all ended gives its copy back at once (while the
    -- other environments' steps run), not at the end of the run: repo.keep_copy
    local open_steps, keepers, open_all = {}, {}, #steps
    for _, st in ipairs(steps) do open_steps[st.env] = (open_steps[st.env] or 0) + 1 end
    local function keep(name)
      if kept and not run.interrupted and run.copies[name] and run.copies[name].ok then
        keepers[#keepers + 1] = sched.spawn(repo.keep_copy, real, name, workdir.path, kept)
      end
    end
    local function ended(st)
      open_steps[st.env] = open_steps[st.env] - 1
      if open_steps[st.env] == 0 then keep(st.env) end
      open_all = open_all - 1
      if open_all == 0 then -- the shared folders, once no step may use them
        for _, name in ipairs(shared) do
          if shared_dirs[name] then keep(name) end
        end
      end
    end
    local order = deploy.start_order(steps, run.jobs)
    local position, remaining, dependents, ready = {}, {}, {}, {}
    for i, s in ipairs(order) do position[s] = i end
    for _, s in ipairs(steps) do
      remaining[s] = #s.needs
      for _, n in ipairs(s.needs) do
        dependents[n] = dependents[n] or {}
        table.insert(dependents[n], s)
      end
    end
    for _, s in ipairs(order) do
      if remaining[s] == 0 then ready[#ready + 1] = s end
    end
    local function settle(s) -- s has ended
      local ok = s.status == "succeeded" or s.status == "skipped"
      for _, d in ipairs(dependents[s.id] or {}) do
        if d.status == "pending" then
          if ok then
            remaining[d] = remaining[d] - 1
            if remaining[d] == 0 then -- into its place in ready (a binary search)
              local lo, hi, at = 1, #ready, position[d]
              while lo <= hi do
                local mid = (lo + hi) // 2
                if position[ready[mid]] > at then hi = mid - 1 else lo = mid + 1 end
              end
              table.insert(ready, lo, d)
            end
          elseif not stop and not run.interrupted then
            d.status, d.error = "not-run", "it needs " .. s.id .. ", which did not succeed"
            run.record(d)
            ended(d)
            settle(d)
          end
        end
      end
    end
    while true do
      while not stop and not run.interrupted and running < run.jobs and #ready > 0 do
        local s = table.remove(ready, 1)
        if s.status == "pending" then
          running = running + 1
          s.status = "running"
          s.task = sched.spawn(function()
            execute(run, s)
            finished[#finished + 1] = s
            if waiting then sched.wake(me) end
          end)
        end
      end
      if running == 0 then break end
      while #finished == 0 and not run.interrupted do
        waiting = true
        sched.suspend()
        waiting = false
      end
      if run.interrupted then
        for _, s in ipairs(steps) do
          if s.status == "running" then
            s.status, s.error, s.finished = "interrupted", "interrupted by " .. run.interrupted, time.now()
            if s.t0 then s.duration = time.monotonic() - s.t0 end
            if s.step then s.log_tail = table.concat(s.step.tail, "\n") end
            run.record(s)
          end
        end
        break
      end
      local s = table.remove(finished, 1)
      running = running - 1
      if s.status == "failed" and run.fail_fast then stop = true end
      ended(s)
      settle(s)
    end
    for _, s in ipairs(steps) do
      if s.status == "pending" then
        s.status = "not-run"
        s.error = s.error or (run.interrupted and "the run was interrupted" or "an earlier step failed (fail-fast)")
        run.record(s)
        ended(s)
      end
    end

    local status, code = "succeeded", 0
    for _, s in ipairs(steps) do
      if s.status == "failed" or s.status == "not-run" then status, code = "failed", 1 end
    end
    if run.interrupted then
      status = "interrupted"
      code = 128 + (run.interrupted == "SIGINT" and 2 or 15)
    end
    run.status = status
    if db then
      flush_records()
      history.finish_run(db, run.run_id, status)
    end
    summary(run, out)
    if run.run_id then
      out:write(string.format("\nrun %d %s\n", run.run_id, status))
    elseif run.dry_run then
      out:write("\ndry run: nothing was run\n")
    end
    out:flush()
    -- the copies given back (not after an interruption: its copies go with its folder)
    -- are in place before the run's folder is removed
    for _, k in ipairs(keepers) do k:wait() end
    release()
    if db then db:close() end
    return code, run
  end, traceback)
  if not ok then
    if failure.is(code) then
      log.error(failure.message(code))
      return 1
    end
    error(code, 0)
  end
  return code, run
end

return deploy
