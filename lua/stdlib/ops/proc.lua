-- ops.proc: run programs without a shell.
local core = require "ops.core.proc"

local proc = {}

--- proc.spawn(argv, opts) -> handle | nil, err, code
-- handle.pid, handle:wait() -> result, handle:kill([signal])
proc.spawn = core.spawn

--- proc.run(argv, opts) -> result | nil, err, code
-- result = {ok, code, signal, timed_out, stdout, stderr, duration, pid}
function proc.run(argv, opts)
  local p, err, code = core.spawn(argv, opts)
  if not p then return nil, err, code end
  local res, cb_err = p:wait()
  if not res then error(cb_err, 0) end
  return res
end

--- proc.check(argv, opts) -> result : like run, but raises unless the program succeeded
function proc.check(argv, opts)
  local res, err = proc.run(argv, opts)
  if not res then error(err, 2) end
  if not res.ok then
    local how = res.timed_out and "timed out"
      or res.signal and ("was killed by " .. res.signal)
      or ("exited with code " .. tostring(res.code))
    local tail = res.stderr and res.stderr ~= "" and (":\n" .. res.stderr:sub(-2000)) or ""
    error(string.format("%s %s%s", argv[1], how, tail), 2)
  end
  return res
end

return proc
