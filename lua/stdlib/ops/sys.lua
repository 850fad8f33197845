-- ops.sys: the opsrun process: environment, identity, signals.
local core = require "ops.core.sys"

local sys = {}
for k, v in pairs(core) do sys[k] = v end

-- sys.environ's table, kept until sys.setenv changes the environment
local view

--- sys.setenv(name, value | nil) : sets (nil: unsets) a variable of this process
function sys.setenv(name, value)
  view = nil
  return core.setenv(name, value)
end

--- sys.environ_view() -> {NAME = value, ...}, shared and read-only by agreement: the
--- environment read once and again only after sys.setenv; for code that looks up many
--- names at a time (a deploy step's settings), where a getenv each would scan it each time
function sys.environ_view()
  if not view then view = core.environ() end
  return view
end

--- sys.env(name [, default]) -> value or default
function sys.env(name, default)
  local v = core.getenv(name)
  if v == nil then return default end
  return v
end

return sys
