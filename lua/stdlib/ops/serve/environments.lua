-- ops.serve.environments: the BitOps mapper. A changed file under an environment folder
-- deploys that environment; a change under _default deploys every environment.
local deploy = require "ops.deploy"

local M = {}

--- M.targets(changes, checkout) -> sorted environment names to deploy
--- (removed environments are not deployed: there is nothing left to deploy from)
function M.targets(changes, checkout)
  local all = deploy.repo.environments(checkout)
  local exists = {}
  for _, e in ipairs(all) do exists[e] = true end
  local want, every = {}, false
  for _, c in ipairs(changes) do
    local top = c.path:match("^([^/]+)/")
    if top == deploy.repo.DEFAULT_DIR then every = true end
    if top and exists[top] then want[top] = true end
  end
  local out = {}
  for _, e in ipairs(all) do
    if every or want[e] then out[#out + 1] = e end
  end
  return out
end

--- M.run(job) -> status ("succeeded" | "failed" | "nothing"), run id
--- job = {hook, checkout, changes, deliveries, after, store}
function M.run(job)
  local envs = M.targets(job.changes, job.checkout)
  if job.hook.envs then -- the hook may limit which environments pushes deploy
    local allowed = {}
    for _, e in ipairs(job.hook.envs) do allowed[e] = true end
    local kept = {}
    for _, e in ipairs(envs) do if allowed[e] then kept[#kept + 1] = e end end
    envs = kept
  end
  if #envs == 0 then return "nothing" end
  local code, run = deploy.run({
    repo = job.checkout, envs = envs, jobs = job.hook.jobs or 4, store = job.store,
    trigger = "serve", delivery = table.concat(job.deliveries, ","), args = "commit " .. job.after,
    fail_fast = job.hook.deploy.fail_fast, timeout = job.hook.deploy.timeout,
    out = job.out, handle_signals = false,
  })
  return code == 0 and "succeeded" or "failed", run and run.run_id
end


return M
