-- bench/deploy_ideal.lua REPO JOBS UNIT [ENV,...|--all]
-- The wall time a perfect `opsrun deploy --jobs JOBS` of REPO would take if every step
-- lasted UNIT seconds and nothing else cost time, for the step graph the engine builds
-- (ops.deploy.plan: the steps of one environment in order, each needing the one before).
-- Prints key=value lines:
--   steps, envs, longest_chain   the graph
--   bound          max(ceil(steps/JOBS), longest chain) * UNIT: no schedule is faster
--   engine_ideal   the engine's own schedule, simulated: whenever a slot is free it starts
--                  the first ready step in deploy.start_order (with several jobs, the step
--                  with the longest chain still to come first)
local deploy = require "ops.deploy"
local fs = require "ops.fs"

local root, jobs, unit, which = arg[1], tonumber(arg[2]), tonumber(arg[3]), arg[4] or "--all"
assert(root and jobs and unit, "usage: deploy_ideal.lua REPO JOBS UNIT [ENV,...|--all]")
root = assert(fs.realpath(root))
local envs = {}
if which == "--all" then
  envs = deploy.repo.environments(root)
else
  for e in which:gmatch("[^,]+") do envs[#envs + 1] = e end
end
local steps = deploy.plan({repo = root, envs = envs})

local by_id, depth, longest = {}, {}, 0
for _, s in ipairs(steps) do
  by_id[s.id] = s
  local d = 1
  for _, n in ipairs(s.needs) do d = math.max(d, depth[n] + 1) end
  depth[s.id] = d
  longest = math.max(longest, d)
end

-- the engine's scheduler: scan in its start order, start what is ready while a slot is free
local order = deploy.start_order(steps, jobs)
local done, finish, running, t, left = {}, {}, 0, 0, #steps
while left > 0 do
  for _, s in ipairs(order) do
    if running < jobs and not finish[s.id] then
      local ready = true
      for _, n in ipairs(s.needs) do if not done[n] then ready = false end end
      if ready then finish[s.id] = t + unit; running = running + 1 end
    end
  end
  local next_t = math.huge
  for id, f in pairs(finish) do if not done[id] and f < next_t then next_t = f end end
  t = next_t
  for id, f in pairs(finish) do
    if not done[id] and f <= t then done[id] = true; running = running - 1; left = left - 1 end
  end
end

print("steps=" .. #steps)
print("envs=" .. #envs)
print("longest_chain=" .. longest)
print(string.format("bound=%g", math.max(math.ceil(#steps / jobs), longest) * unit))
print(string.format("engine_ideal=%g", t))
