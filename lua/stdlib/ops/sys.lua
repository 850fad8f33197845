-- ops.sys: the opsrun process: environment, identity, signals.
local core = require "ops.core.sys"

local sys = {}
for k, v in pairs(core) do sys[k] = v end

--- sys.env(name [, default]) -> value or default
function sys.env(name, default)
  local v = core.getenv(name)
  if v == nil then return default end
  return v
end

return sys
