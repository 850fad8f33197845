-- ops.serve.worker: takes pushes from the store and deploys them. One loop per hook (a
-- target: one repo and branch), so pushes to the same target are serialised; all the
-- deliveries waiting for a hook when its loop comes round are coalesced into one deploy
-- of the newest commit. Different hooks deploy at once, up to settings.jobs.
--
-- What a group of pushes deploys (docs/serve.md, "Which commit, which changes"):
--   deleted ref   a group that ends with a deletion deploys nothing (pushes before the
--                 deletion are superseded by it); deleting never removes anything
--   target        the `after` of the last push received, or a descendant of it that
--                 another push of the group brought (deliveries can arrive out of order)
--   changes       for each push, git diff --name-status before..target; a new branch
--                 (before all zeros), or a before that is no longer in the mirror (a
--                 forced push followed by gc), counts every file of the target as added
--   stale         a push entirely behind the commit last processed for the hook (a late
--                 redelivery of an old push) deploys nothing: it would roll back. A forced
--                 push to an older commit starts from the processed commit, so it deploys.
local ops = require "ops"
local fs = require "ops.fs"
local log = require "ops.log"
local time = require "ops.time"
local failure = require "ops.deploy.failure"
local git = require "ops.serve.git"
local verify = require "ops.serve.verify"

local worker = {}

worker.MAPPERS = {environments = "ops.serve.environments", plans = "ops.serve.plans"}
worker.MAX_GROUP = 100 -- deliveries coalesced into one deploy at most

-- Log lines instead of stdout, for the deploy summary.
local function log_writer(fields)
  local buf = {}
  return {
    write = function(self, ...)
      for _, s in ipairs({...}) do buf[#buf + 1] = s end
      local text = table.concat(buf)
      buf = {}
      for line in (text .. "\n"):gmatch("([^\n]*)\n") do
        if line ~= "" then log.info(line, fields) end
      end
      return self
    end,
    flush = function(self) return self end,
  }
end

--- worker.plan(mirror, pushes, last) -> {target, changes, before} | {status = reason}
--- pushes in the order they were received; last is the commit last processed for the hook.
function worker.plan(mirror, pushes, last)
  -- a group holds up to MAX_GROUP pushes, mostly of a few commits: ask git once per question
  local known, order = {}, {}
  local git = {
    has_commit = function(dir, sha)
      if known[sha] == nil then known[sha] = git.has_commit(dir, sha) end
      return known[sha]
    end,
    is_ancestor = function(dir, a, b)
      local k = a .. " " .. b
      if order[k] == nil then order[k] = git.is_ancestor(dir, a, b) end
      return order[k]
    end,
    changes = git.changes,
  }
  local live = {}
  for _, p in ipairs(pushes) do
    if p.deleted then live = {} else live[#live + 1] = p end
  end
  if #live == 0 then return {status = "deleted"} end
  local target = live[#live].after
  for _, p in ipairs(live) do
    if p.after ~= target and git.has_commit(mirror, p.after) and git.is_ancestor(mirror, target, p.after) then
      target = p.after
    end
  end
  if not git.has_commit(mirror, target) then
    failure.raise("commit " .. target .. " is not in the repo after a fetch (not pushed yet, or pushed to another remote)")
  end
  if last and last ~= target and git.has_commit(mirror, last) and git.is_ancestor(mirror, target, last) then
    local stale = true
    for _, p in ipairs(live) do
      if p.created or p.before == last or not git.has_commit(mirror, p.before)
        or not git.is_ancestor(mirror, p.before, last) then
        stale = false
      end
    end
    if stale then return {status = "stale", target = target} end
  end
  local seen, paths, changes, everything = {}, {}, {}, false
  for _, p in ipairs(live) do
    if p.created or not git.has_commit(mirror, p.before) then
      everything = true
    elseif not seen[p.before] then
      seen[p.before] = true
      for _, c in ipairs(git.changes(mirror, p.before, target)) do
        local prev = paths[c.path]
        if not prev then
          paths[c.path] = c
          changes[#changes + 1] = c
        elseif prev.status ~= c.status then
          prev.status = "M"
        end
      end
    end
  end
  if everything then changes = git.changes(mirror, nil, target) end
  table.sort(changes, function(a, b) return a.path < b.path end)
  return {target = target, changes = changes, everything = everything,
    before = (not everything and #live == 1) and live[1].before or nil}
end

-- The pushes of a group's items, and their delivery ids; each payload is decoded once
-- (kept in the item: worker.process asks worker.no_work first, then decodes them too).
local function decode(items)
  local pushes, deliveries = {}, {}
  for _, it in ipairs(items) do
    local p = it.push or verify.decode_json(it.payload) -- stored by the receiver: JSON of strings and booleans
    it.push = p
    pushes[#pushes + 1] = p
    deliveries[#deliveries + 1] = p.delivery
  end
  return pushes, deliveries
end

--- worker.no_work(ctx, hook, items) -> status, target commit | nil
--- A group that needs no git and no deploy, settled from the payloads alone: it ends with
--- a deleted ref (deleted), or its pushes move nothing (before == after) onto the commit
--- already processed (nothing: a redelivered or replayed push costs a store read, not a
--- git run). nil: the group needs worker.process.
function worker.no_work(ctx, hook, items)
  local pushes = decode(items)
  local newest = pushes[#pushes]
  local lg = log.with({hook = hook.name, commit = newest.after:sub(1, 12)})
  if newest.deleted then
    lg.info("branch deleted: nothing to deploy (deleting a branch never removes anything)")
    return "deleted", nil
  end
  local last = ctx.last_commit(hook.name)
  for _, p in ipairs(pushes) do
    if p.before ~= p.after or p.after ~= last then return nil end
  end
  lg.info("nothing to deploy: the pushes move nothing past " .. last:sub(1, 12))
  return "nothing", last
end

--- worker.process(ctx, hook, items) -> status, run id, target commit
--- status: succeeded | failed | interrupted (a run happened) or nothing | deleted | stale
function worker.process(ctx, hook, items)
  local settled, at = worker.no_work(ctx, hook, items)
  if settled then return settled, nil, at end
  local pushes, deliveries = decode(items)
  local last = ctx.last_commit(hook.name)
  local mirror = git.mirror(fs.join(ctx.settings.mirrors, hook.name .. ".git"), hook.repo)
  local plan = worker.plan(mirror, pushes, last)
  local lg = log.with({hook = hook.name, commit = pushes[#pushes].after:sub(1, 12)})
  if plan.status == "deleted" then
    lg.info("branch deleted: nothing to deploy (deleting a branch never removes anything)")
    return "deleted", nil, nil
  elseif plan.status == "stale" then
    lg.warn("push behind the commit already processed (a late or repeated delivery): not deployed, it would roll back",
      {deliveries = table.concat(deliveries, ",")})
    return "stale", nil, nil
  end
  lg = log.with({hook = hook.name, commit = plan.target:sub(1, 12)})
  if plan.everything then lg.info("a new branch, or its previous commit is gone (forced push): every file counts as changed") end
  lg.info(string.format("%d deliveries, %d changed paths", #items, #plan.changes))
  if #plan.changes == 0 then return "nothing", nil, plan.target end
  local tmp <close>, terr = fs.tempdir("opsrun-serve-")
  if not tmp then error("cannot make a folder for the checkout: " .. terr .. " (set TMPDIR to a writable folder)", 0) end
  local checkout = fs.join(tmp.path, "repo")
  git.checkout(mirror, plan.target, checkout)
  local mapper = require(worker.MAPPERS[hook.mode])
  local t0 = time.monotonic()
  local status, run_id = mapper.run({
    hook = hook, checkout = checkout, mirror = mirror, changes = plan.changes, deliveries = deliveries,
    before = plan.before, after = plan.target, store = ctx.settings.store, db = ctx.db,
    out = log_writer({hook = hook.name}), log = lg, opsrun = ctx.opsrun, env = ctx.child_env(),
  })
  if status ~= "nothing" then
    ctx.metrics.observe_run(status, time.monotonic() - t0)
    lg.info("done: " .. status .. (run_id and (" (run " .. run_id .. ")") or ""))
    if ctx.notify then ctx.notify(hook, status, run_id, deliveries, plan.target) end
  else
    lg.info("nothing to deploy: the changes map to no target")
  end
  return status, run_id, plan.target
end

-- Renews the leases of the items while their deploy runs; a lease lost (another
-- process took the item after a long stall) is logged, and the work goes on.
local function keep_leases(ctx, me, items)
  return ops.spawn(function()
    while true do
      ops.sleep(ctx.settings.lease / 3)
      for _, it in ipairs(items) do
        local ok = ctx.queue:extend(it.id, me, ctx.settings.lease)
        if not ok then log.warn("lost the lease of a delivery being deployed", {id = it.id}) end
      end
    end
  end)
end

--- worker.loop(ctx, name) : claims and processes hook `name`'s pushes until ctx.stopping,
--- or until a reload removes the hook
function worker.loop(ctx, name)
  local me = ctx.me .. ":" .. name
  local kind = "push:" .. name
  -- the next group, claimed in the transaction that completed the last one; the slot it
  -- was deployed in is kept for it (only when no other hook was waiting for a slot)
  local ahead = nil
  -- the last group had deliveries: the next claim waits settings.coalesce seconds first,
  -- so that a busy hook's pushes arriving meanwhile go into one group (an idle hook's
  -- first push is claimed at once; after a full group, more are waiting: no wait)
  local busy = false
  local guard <close> = setmetatable({}, {__close = function()
    if ahead then ahead = nil; ctx.slots:release() end -- leased: handed back by serve.stop, or its lease runs out
  end})
  while not ctx.stopping do
    local hook = ctx.settings.hooks[name]
    if not hook then return end
    local items, claim_err = ahead, nil
    ahead = nil
    if not items and busy and ctx.settings.coalesce > 0 then
      ctx.settle(name, ctx.settings.coalesce) -- holding no slot
      if ctx.stopping then break end
    end
    if not items then ctx.slots:acquire() end
    local released = false
    local function release()
      if not released then released = true; ctx.slots:release() end
    end
    local slot <close> = setmetatable({}, {__close = release})
    -- the group: read, not leased (peeked); a group that worker.no_work settles from its
    -- payloads alone is marked done without a lease, the others are leased before any
    -- git or deploy runs. (The group claimed with the last completion comes leased.)
    local peeked = false
    if not items then
      items = {}
      if not ctx.stopping then
        items, claim_err = ctx.queue:peek_many({kind}, worker.MAX_GROUP)
        peeked = true
      end
    end
    if not items then
      items = {}
      log.error("cannot read the deliveries waiting: " .. tostring(claim_err), {hook = name})
    end
    busy = #items > 0 and #items < worker.MAX_GROUP
    local settled, at
    if peeked and #items > 0 then
      local ok, st, tg = pcall(worker.no_work, ctx, hook, items)
      if ok then settled, at = st, tg end -- an error: leased below, and process meets it again
      if not settled then
        local ids = {}
        for i, it in ipairs(items) do ids[i] = it.id end
        items, claim_err = ctx.queue:lease_ids(ids, me, ctx.settings.lease)
        if not items then
          items = {}
          log.error("cannot lease deliveries: " .. tostring(claim_err), {hook = name})
        end
      end
    end
    if #items == 0 then
      release()
      if not ctx.stopping then ctx.wait_for_work(name) end
    elseif settled then
      ctx.finish(hook, me, items, settled, nil, at, nil, true)
    else
      ctx.busy[name] = true
      local ok, status, run_id, target = pcall(function()
        local keeper = keep_leases(ctx, me, items)
        local closer <close> = setmetatable({}, {__close = function() keeper:cancel() end})
        return worker.process(ctx, hook, items)
      end)
      ctx.busy[name] = nil
      if ok then
        local again = not ctx.stopping and #ctx.slots.waiting == 0 and ctx.settings.coalesce <= 0
          and {lease = ctx.settings.lease, kinds = {kind}, limit = worker.MAX_GROUP} or nil
        local nxt = ctx.finish(hook, me, items, status, run_id, target, again)
        if nxt and #nxt > 0 then
          ahead = nxt
          released = true -- the slot goes on to the next group
        end
      else
        release()
        local msg = failure.message(status)
        log.error("a push could not be deployed: " .. msg .. " (tried again later)", {hook = name})
        for _, it in ipairs(items) do ctx.queue:fail(it.id, me, msg) end
        ctx.metrics.push("error", #items)
      end
    end
  end
end

return worker
