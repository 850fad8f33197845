-- ops.serve.environments: the BitOps mapper. A changed file under an environment folder
-- deploys that environment; a change under _default deploys every environment. Files
-- elsewhere (README.md, .github/, ...) deploy nothing.
--
-- The deploy is `opsrun --repo CHECKOUT deploy --env ...` run as a child process, exactly
-- as a person would run it: the pushed repo's own .opsrun/ overrides apply, a crash of a
-- tool cannot take the receiver down, and SIGTERM stops it the way it stops any deploy.
-- The run it records is then linked to the deliveries and the commit.
local proc = require "ops.proc"
local log = require "ops.log"
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

-- The run the child recorded: the newest run of that process on this host.
local function link_run(db, pid, job)
  local row = db:query("SELECT id FROM runs WHERE pid = ? AND host = ? ORDER BY id DESC LIMIT 1",
    pid, require("ops.sys").hostname())[1]
  if not row then return nil end
  db:exec("UPDATE runs SET trigger = 'serve', delivery = ?, args = ? WHERE id = ?",
    table.concat(job.deliveries, ","), "hook " .. job.hook.name .. " commit " .. job.after, row.id)
  return row.id
end

--- M.run(job) -> status ("succeeded" | "failed" | "interrupted" | "nothing"), run id
--- job = {hook, checkout, changes, deliveries, after, store, db, opsrun, env, log, out}
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
  local argv = {job.opsrun, "--repo", job.checkout, "--log-format", log.format(), "deploy",
    "--env", table.concat(envs, ","), "--store", job.store, "--jobs", tostring(job.hook.jobs or 4)}
  local d = job.hook.deploy or {}
  if d.fail_fast == false then argv[#argv + 1] = "--keep-going" end
  if d.timeout then argv[#argv + 1] = "--timeout"; argv[#argv + 1] = tostring(d.timeout) end
  local lg = job.log or log
  lg.info("deploying " .. table.concat(envs, ", "))
  local env = {}
  for k, v in pairs(job.env or {}) do env[k] = v end
  env.OPSRUN_DELIVERY = table.concat(job.deliveries, ",")
  env.OPSRUN_COMMIT = job.after
  env.OPSRUN_HOOK = job.hook.name
  env.OPSRUN_LOCK_SCOPE = job.hook.repo -- the same locks as a deploy from a clone of it
  local r, err = proc.run(argv, {
    cwd = job.checkout, env = env, stderr = "inherit",
    stdout = function(line) if line ~= "" then job.out:write(line, "\n") end end,
  })
  if not r then error("cannot start opsrun deploy: " .. tostring(err), 0) end
  local run_id = link_run(job.db, r.pid, job)
  if r.ok then return "succeeded", run_id end
  if r.signal or r.code == 130 or r.code == 143 then return "interrupted", run_id end
  return "failed", run_id
end

return M
