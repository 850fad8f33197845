-- ops: the opsrun library. `require "ops"` (also the global `ops` in scripts).
-- Submodules load on first use: ops.proc, ops.fs, ops.yaml, ops.json, ops.log, ...
local sched = require "ops.core.sched"
local modules = require "ops.core.modules"

local ops = {}

--- ops.spawn(fn, ...) -> task : runs fn(...) as a new task on the loop
ops.spawn = sched.spawn

--- ops.sleep(seconds) : waits without blocking other tasks
function ops.sleep(seconds)
  sched.sleep(seconds)
end

--- ops.current() -> task | nil : the running task
ops.current = sched.current

--- ops.yield() : lets every other ready task run once, then continues
function ops.yield()
  if not sched.current() then error("ops.yield must be called from a task", 2) end
  coroutine.yield()
end

--- ops.wait_all(tasks [, timeout]) -> all_ok, outcomes
-- outcomes[i] = {ok = true, n = N, ...results} | {ok = false, err = e}
function ops.wait_all(tasks, timeout)
  local deadline = timeout and (require("ops.core.time").monotonic() + timeout)
  local all_ok, outcomes = true, {}
  for i, t in ipairs(tasks) do
    local left = deadline and math.max(0, deadline - require("ops.core.time").monotonic())
    local r = table.pack(t:wait(left))
    if r[1] then
      table.remove(r, 1)
      r.n = r.n - 1
      r.ok = true
      outcomes[i] = r
    else
      all_ok = false
      outcomes[i] = {ok = false, err = r[2], code = r[3]}
    end
  end
  return all_ok, outcomes
end

--- ops.builtin(name) -> the module embedded in opsrun, even when the repo overrides it
ops.builtin = modules.builtin

--- ops.secret(value) -> value : registers a value that is redacted from all output
function ops.secret(value)
  return require("ops.log").secret(value)
end

return setmetatable(ops, {
  __index = function(t, k)
    if type(k) ~= "string" or not k:match("^[%a_][%w_]*$") then return nil end
    local ok, mod = pcall(require, "ops." .. k)
    if not ok then
      if tostring(mod):find("module 'ops." .. k .. "' not found", 1, true) then return nil end
      error(mod, 2)
    end
    rawset(t, k, mod)
    return mod
  end,
})
