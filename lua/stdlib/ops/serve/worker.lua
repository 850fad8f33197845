-- ops.serve.worker: takes pushes from the store and deploys them. One loop per hook, so
-- pushes to the same target are serialised; all the deliveries waiting for a hook when
-- its loop comes round are coalesced into one deploy (oldest before .. newest after).
local ops = require "ops"
local fs = require "ops.fs"
local log = require "ops.log"
local json = require "ops.json"
local time = require "ops.time"
local sys = require "ops.sys"
local failure = require "ops.deploy.failure"
local git = require "ops.serve.git"

local worker = {}

worker.MAPPERS = {environments = "ops.serve.environments", plans = "ops.serve.plans"}

-- Log lines instead of stdout, for the deploy summary.
local function log_writer(hook)
  local buf = {}
  return {
    write = function(self, ...)
      for _, s in ipairs({...}) do buf[#buf + 1] = s end
      local text = table.concat(buf)
      buf = {}
      for line in (text .. "\n"):gmatch("([^\n]*)\n") do
        if line ~= "" then log.info(line, {hook = hook}) end
      end
      return self
    end,
    flush = function(self) return self end,
  }
end

--- worker.process(ctx, hook, items) -> status : deploys what the items' pushes changed
function worker.process(ctx, hook, items)
  local pushes = {}
  for _, it in ipairs(items) do pushes[#pushes + 1] = json.decode(it.payload) end
  local first, last = pushes[1], pushes[#pushes]
  local deliveries = {}
  for _, p in ipairs(pushes) do deliveries[#deliveries + 1] = p.delivery end
  local lg = log.with({hook = hook.name, commit = last.after:sub(1, 12)})
  if last.deleted then
    lg.info("branch deleted: nothing to deploy (deleting a branch never removes anything)")
    return "nothing"
  end
  local mirror = git.mirror(fs.join(ctx.settings.mirrors, hook.name .. ".git"), hook.repo)
  if not git.has_commit(mirror, last.after) then
    failure.raise("commit " .. last.after .. " is not in " .. hook.repo .. " after a fetch")
  end
  -- a new branch, or a before that a forced push made unreachable and gc removed:
  -- everything in the tree counts as added
  local before = first.before
  if first.created or not git.has_commit(mirror, before) then
    if not first.created then lg.warn("commit " .. before .. " is gone (forced push?): deploying everything") end
    before = nil
  end
  local changes = git.changes(mirror, before, last.after)
  local tmp <close> = fs.tempdir("opsrun-serve-")
  local checkout = fs.join(tmp.path, "repo")
  git.checkout(mirror, last.after, checkout)
  local mapper = require(worker.MAPPERS[hook.mode])
  lg.info(string.format("%d deliveries, %d changed paths", #items, #changes))
  local t0 = time.monotonic()
  local status, run_id = mapper.run({
    hook = hook, checkout = checkout, mirror = mirror, changes = changes, deliveries = deliveries,
    before = before, after = last.after, store = ctx.settings.store, out = log_writer(hook.name),
  })
  ctx.metrics.observe_run(status, time.monotonic() - t0)
  lg.info("done: " .. status .. (run_id and (" (run " .. run_id .. ")") or ""))
  if ctx.notify then ctx.notify(hook, status, run_id, deliveries, last.after) end
  return status, run_id
end

--- worker.loop(ctx, hook) : claims and processes this hook's pushes until ctx.stopping
function worker.loop(ctx, hook)
  local me = string.format("%s:%d:%s", sys.hostname(), sys.pid(), hook.name)
  local kind = "push:" .. hook.name
  while not ctx.stopping do
    local item = ctx.queue:claim(me, ctx.settings.lease, {kind})
    if not item then
      ctx.wait_for_work(hook.name)
    else
      local items = {item}
      while true do -- coalesce what else is waiting for this target
        local more = ctx.queue:claim(me, ctx.settings.lease, {kind})
        if not more then break end
        items[#items + 1] = more
      end
      ctx.slots:acquire()
      local ok, status = pcall(function()
        -- keep the leases alive while the deploy runs
        local keeper = ops.spawn(function()
          while true do
            ops.sleep(ctx.settings.lease / 3)
            for _, it in ipairs(items) do ctx.queue:extend(it.id, me, ctx.settings.lease) end
          end
        end)
        local closer <close> = setmetatable({}, {__close = function() keeper:cancel() end})
        return worker.process(ctx, hook, items)
      end)
      ctx.slots:release()
      if ok then
        for _, it in ipairs(items) do ctx.queue:complete(it.id, me) end
      else
        local msg = failure.message(status)
        log.error("deploy of a push failed before it ran: " .. msg, {hook = hook.name})
        for _, it in ipairs(items) do ctx.queue:fail(it.id, me, msg) end
        ctx.metrics.observe_run("error", 0)
      end
    end
  end
end

return worker
